"""protocols/coefficients.py is what scripts/fit_kernels.py produces, and its fits hold."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from cipherdm_spu.protocols.coefficients import ACTIVATIONS, EXP_BASE, HORNER_ACTIVATIONS, MASKED_ACTIVATIONS

ROOT = Path(__file__).resolve().parent.parent


def test_committed_coefficients_match_a_fresh_fit():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "fit_kernels.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_fit_is_within_1e2_everywhere_and_4_5e3_on_the_bulk_in_float64():
    for name, fit in ACTIVATIONS.items():
        assert fit["err"] < 1e-2, name
        assert fit["bulk_err"] < 4.5e-3, name
        assert fit["T"] > 0
    assert len(ACTIVATIONS["mish"]["plus"]) == len(ACTIVATIONS["mish"]["minus"]) == 5


def test_half_square_silu_holds_its_bound_with_u_rounded_either_way():
    """The fit's claim, re-checked here independently of its LP: with u = c * a off its exact value by up
    to one unit of 2^-bits (SPU's truncation), SiLU errs < 1e-2 on the whole line and < 5e-3 on |x| <= 2."""
    fit = ACTIVATIONS["silu"]
    x = np.concatenate([np.linspace(0.0, 20.0, 20001), np.geomspace(20.0, 1e4, 500)])
    a = np.minimum(x, fit["T"])
    silu = x / (1.0 + np.exp(-x))
    worst = np.zeros_like(x)
    for off in np.linspace(-1.0, 1.0, 9):
        u = (a * fit["scale"] + off) / 2.0 ** fit["bits"]
        z = (u + fit["beta0"] / 2.0 ** fit["bits"]) * u
        r = (z + fit["gamma1"]) * z + fit["linear"] * a + fit["gamma0"]
        # the same on the negative side: silu(-x) = silu(x) - x, relu(-x) = 0
        worst = np.maximum(worst, np.maximum(np.abs(x + r - silu), np.abs(r - (silu - x))))
    assert worst.max() < 1e-2
    assert worst[x <= 2].max() < 5e-3


def test_masked_square_silu_holds_its_bound_with_t_rounded_either_way():
    """The fit's claim, re-checked here independently of its LP: with t off its exact value by up to one unit of
    2^-t_bits (SPU's truncation), and the tail's constant beyond T, SiLU errs < 1e-2 on the whole line and
    < 4.5e-3 on |x| <= 2."""
    fit = MASKED_ACTIVATIONS["silu"]
    x = np.concatenate([np.linspace(0.0, 20.0, 20001), np.geomspace(20.0, 1e4, 500)])
    silu = x / (1.0 + np.exp(-x))
    worst = np.zeros_like(x)
    for off in np.linspace(-1.0, 1.0, 9):
        t = x * x * 2.0 ** -fit["square_shift"] + fit["t1"] * x + fit["t0"] + off * 2.0 ** -fit["t_bits"]
        r = np.where(x < fit["T"], fit["lam"] * t * t + fit["linear"] * x + fit["constant"], fit["tail"])
        # the same on the negative side: silu(-x) = silu(x) - x, relu(-x) = 0
        worst = np.maximum(worst, np.maximum(np.abs(x + r - silu), np.abs(r - (silu - x))))
    assert worst.max() < 1e-2
    assert worst[x <= 2].max() < 4.5e-3
    assert fit["lam"] * 2**10 == round(fit["lam"] * 2**10)  # on its integer product's grid


def test_horner_fits_are_within_2e6_and_their_pieces_tile_the_half_line():
    for name, fit in HORNER_ACTIVATIONS.items():
        assert fit["err"] < 2e-6, name
        pieces = fit["pieces"]
        assert pieces[0]["lo"] == 0.0
        assert all(p["hi"] == q["lo"] for p, q in zip(pieces, pieces[1:])), name
        assert all(p["center"] == (p["lo"] + p["hi"]) / 2 for p in pieces), name


def test_exp_base_errs_2_5e5_with_its_constants_as_spu_encodes_them():
    """Re-checked independently of the fit, on the whole half line, with the constants SPU computes with (they are
    on its 2**-18 grid, so its truncation keeps them): near the max entry of a softmax row the error is relative;
    elsewhere absolute, 2.5e-5, as each entry adds its error to the row's sum (>= 1: the max entry's exp); below the
    clamp, where all of a masked or one-hot row may sit (4096 entries in SD's attention), < 1e-7."""
    reach, scale, alpha = EXP_BASE["reach"], EXP_BASE["scale"], EXP_BASE["alpha"]
    for c in [scale, *alpha]:
        assert c * 2.0**18 == round(c * 2.0**18)
    a0, a1, a2, a3 = alpha
    x = np.concatenate([np.linspace(-60.0, 0.0, 600001), -np.geomspace(60.0, 1e4, 1000)])
    t = scale * np.maximum(x, EXP_BASE["clamp"])
    y = (t + a0) * t + a1
    approx = ((y + t + a2) * y + a3) ** reach
    err = np.abs(approx - np.exp(x))
    assert err.max() < 2.5e-5
    near = x >= -1
    assert (err[near] / np.exp(x[near])).max() < 1e-4
    assert np.all(approx > 0) and approx[x <= EXP_BASE["clamp"]].max() < 1e-7
