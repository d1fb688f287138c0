#!/usr/bin/env python
"""Stable Diffusion with the UNet under MPC; see `python scripts/run_sd.py --help` and cipherdm_spu/sd_cli.py."""

import sys

from cipherdm_spu.sd_cli import main

if __name__ == "__main__":
    sys.exit(main())
