#!/usr/bin/env python
"""Stable Diffusion with the UNet under MPC; see `python scripts/run_sd.py --help` and cipherdm_spu/sd_cli.py."""

from cipherdm_spu.cli_common import exit_status
from cipherdm_spu.sd_cli import main

if __name__ == "__main__":
    exit_status(main())
