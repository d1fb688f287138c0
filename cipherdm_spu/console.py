"""Warnings on a console as one line each: a party's processes (echoed by `spu-launch`, prefixed by the party's id)
and the user's and owner's commands (`cli_common.run_main`).

A compile cache's notice that it waits for a peer compiling the same program (expected on one machine) read as a
failure with Python's source line under it; and a warning may carry another party's words (why it did not confirm a
session's close), which must not write lines, colours or cursor moves of their own on the user's terminal.
"""

from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def printable(text: str) -> str:
    """``text`` with every character that is not printable (a newline, a terminal's escape) written as its escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A `warnings.showwarning`: ``warning: <message>`` (its characters that are not printable escaped), and where it
    came from when that is not this package (a library's warning is no notice of ours). A console that is gone loses
    the line, never the caller's work."""
    stream = sys.stderr if file is None else file
    if stream is None:
        return
    origin = "" if os.path.abspath(filename).startswith(_PACKAGE + os.sep) else (
        f" ({category.__name__}, {os.path.basename(filename)}:{lineno})")
    try:
        print(f"warning: {printable(str(message))}{origin}", file=stream, flush=True)
    except (OSError, ValueError):  # a closed pipe or file
        pass
