"""Writing docs/results: the markdown tables every report script prints, in one form, and a report's two files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """The lines of a markdown table; ``align`` has one letter per column, ``l`` (default for the first and any
    column it leaves out: right) or ``r``. Cells are written with str(): format numbers before."""
    align = (align or "l").ljust(len(header), "r")
    rule = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_report(out: Path, result: dict, markdown: str) -> None:
    """``out``.json (the result) and ``out``.md (its report), folders made as needed; the report is also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
