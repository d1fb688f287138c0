"""Writing docs/results: the markdown tables every report script prints, in one form."""

from __future__ import annotations

from typing import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """The lines of a markdown table; ``align`` has one letter per column, ``l`` (default for the first and any
    column it leaves out: right) or ``r``. Cells are written with str(): format numbers before."""
    align = (align or "l").ljust(len(header), "r")
    rule = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
