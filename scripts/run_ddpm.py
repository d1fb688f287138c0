#!/usr/bin/env python
"""Secure ancestral DDPM sampling; see `python scripts/run_ddpm.py --help` and cipherdm_spu/sampling_cli.py."""

import sys

from cipherdm_spu.sampling_cli import main

if __name__ == "__main__":
    sys.exit(main("ddpm"))
