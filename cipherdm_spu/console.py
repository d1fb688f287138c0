"""What a party's processes write on the console that `spu-launch` echoes (prefixed by the party's id).

A party, its compiler and its session's SPU worker show a warning as one line: a compile cache's notice that it waits
for a peer compiling the same program (expected on one machine) read as a failure with Python's source line under it.
"""

from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A `warnings.showwarning`: ``warning: <message>``, and where it came from when that is not this package (a
    library's warning is no notice of ours). A console that is gone loses the line, never the caller's work."""
    stream = sys.stderr if file is None else file
    if stream is None:
        return
    origin = "" if os.path.abspath(filename).startswith(_PACKAGE + os.sep) else (
        f" ({category.__name__}, {os.path.basename(filename)}:{lineno})")
    try:
        print(f"warning: {message}{origin}", file=stream, flush=True)
    except (OSError, ValueError):  # a closed pipe or file
        pass
