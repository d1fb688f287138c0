#!/usr/bin/env python
"""Secure DDIM sampling; see `python scripts/run_ddim.py --help` and cipherdm_spu/sampling_cli.py."""

import sys

from cipherdm_spu.sampling_cli import main

if __name__ == "__main__":
    sys.exit(main("ddim"))
