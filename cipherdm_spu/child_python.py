"""How the cluster's processes start Python: never importing from the folder they were started in.

``python -m`` and multiprocessing's spawned children (``python -c ...``) put the current folder first on their import
path, so a ``pickle.py`` that another local user left in a folder a party was started in (a sticky /tmp takes anyone's
new files) would run inside that party, with its shares and its key (an independent review's finding). The parties'
commands take ``-P``, and every process a party or the launcher spawns inherits PYTHONSAFEPATH, which does the same;
a PYTHONPATH entry that is not absolute, which both still honour, is refused.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, List

from .errors import PartyError

SAFE_PATH = "PYTHONSAFEPATH"


def module_command(module: str) -> List[str]:
    """The command that runs ``module`` (``python -m``) without the current folder on its import path."""
    return [sys.executable, "-P", "-m", module]


def check_python_path() -> None:
    """Refuse (PartyError) a PYTHONPATH with an empty or relative entry: Python puts the current folder (or one under
    it) on the import path for those, -P and PYTHONSAFEPATH notwithstanding (``export PYTHONPATH=$PYTHONPATH:/x`` with
    PYTHONPATH unset leaves one)."""
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.environ.get("PYTHONPATH") else []
    unsafe = [entry for entry in entries if not os.path.isabs(entry)]
    if unsafe:
        raise PartyError(f"PYTHONPATH has entries {unsafe} that name the current folder or one under it, whatever "
                         "folder a process starts in: drop them (every entry an absolute path)")


@contextlib.contextmanager
def safe_import_path() -> Iterator[None]:
    """Within the block, every process started (spawned or not) leaves the current folder off its import path; the
    environment is put back after (the tests call the launcher in their own process)."""
    before = os.environ.get(SAFE_PATH)
    os.environ[SAFE_PATH] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SAFE_PATH, None)
        else:
            os.environ[SAFE_PATH] = before
