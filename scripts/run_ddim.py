#!/usr/bin/env python
"""Secure DDIM sampling; see `python scripts/run_ddim.py --help` and cipherdm_spu/sampling_cli.py."""

from cipherdm_spu.cli_common import exit_status
from cipherdm_spu.sampling_cli import main

if __name__ == "__main__":
    exit_status(main("ddim"))
