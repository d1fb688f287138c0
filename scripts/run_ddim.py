#!/usr/bin/env python
"""Secure DDIM sampling; see `python scripts/run_ddim.py --help` and cipherdm_spu/sampling_cli.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cipherdm_spu.sampling_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("ddim"))
