#!/usr/bin/env python
"""Stable Diffusion with the UNet under MPC; see `python scripts/run_sd.py --help` and cipherdm_spu/sd_cli.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cipherdm_spu.sd_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
