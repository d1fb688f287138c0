"""protocols/coefficients.py is what scripts/fit_kernels.py produces, and its fits hold."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from protocols.coefficients import ACTIVATIONS, HORNER_ACTIVATIONS

ROOT = Path(__file__).resolve().parent.parent


def test_committed_coefficients_match_a_fresh_fit():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "fit_kernels.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_fit_is_within_1e2_everywhere_and_4_5e3_on_the_bulk_in_float64():
    for name, fit in ACTIVATIONS.items():
        assert fit["err"] < 1e-2, name
        assert fit["bulk_err"] < 4.5e-3, name
        assert fit["T"] > 0 and len(fit["plus"]) == 5


def test_horner_fits_are_within_2e6_and_their_pieces_tile_the_half_line():
    for name, fit in HORNER_ACTIVATIONS.items():
        assert fit["err"] < 2e-6, name
        pieces = fit["pieces"]
        assert pieces[0]["lo"] == 0.0
        assert all(p["hi"] == q["lo"] for p, q in zip(pieces, pieces[1:])), name
        assert all(p["center"] == (p["lo"] + p["hi"]) / 2 for p in pieces), name
