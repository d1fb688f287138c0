"""protocols/coefficients.py is what scripts/fit_kernels.py produces, and its fits hold."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cipherdm_spu.protocols.coefficients import ACTIVATIONS, EXP_BASE, HORNER_ACTIVATIONS, MASKED_ACTIVATIONS
from cipherdm_spu.protocols.reference import REFERENCES, gelu_tanh

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


@pytest.mark.parametrize("name", sorted(MASKED_ACTIVATIONS))
def test_masked_square_on_the_kernels_integers_holds_the_fits_bound(name):
    """The fit's claim, re-checked independently of its LP on the integers the kernel computes with
    (protocols/cipherdm.py, `_masked_square_base` and `_scaled_square_plus_linear`): E = round(x 2^f); t's sum
    E^2 + K |E| + const truncated by k bits, off by up to one unit either way (SPU's truncation); lam t^2 + s |E|
    truncated by plain_shift bits, off by up to one unit; relu(x) plus the tail's constant beyond T. The activation
    (the `cipherdm` SiLU; the masked-square GeLU, both forms) then errs no more than the recorded bound (plus the
    constants' own 2^-18 encodings) on the whole line, and < 4.5e-3 on |x| <= 2; R is even (checked), so the
    negative side errs the same."""
    fit = MASKED_ACTIVATIONS[name]
    f, shift, t_bits, plain = fit["fraction_bits"], fit["square_shift"], fit["t_bits"], fit["plain_shift"]
    x = np.concatenate([np.linspace(0.0, 20.0, 20001), np.geomspace(20.0, 1e4, 500)])
    activation = {"silu": REFERENCES["silu"], "gelu": REFERENCES["gelu"], "gelu_tanh": gelu_tanh}[name]
    residual = activation(x) - x  # f(x) - relu(x) for x >= 0 ...
    np.testing.assert_allclose(activation(-x), residual, atol=1e-12)  # ... and f(-x) for x <= 0: R is even
    e_t = round(fit["T"] * 2**f)
    slope = fit["t1"] * 2 ** (f + shift)
    lam, s = fit["lam"] * 2 ** (f + plain - 2 * t_bits), fit["linear"] * 2**plain
    assert slope == round(slope) and lam == round(lam) and s == round(s)  # the kernel's integers, exactly
    k = 2 * f + shift - t_bits
    above, rest = divmod(e_t * e_t + round(fit["t0"] * 2 ** (2 * f + shift)), 2**k)
    e = np.round(x * 2**f)
    inside = e < e_t
    total = (e * e + slope * e - e_t * e_t + rest)[inside]  # exact in float64: below 2**53 on the window
    worst = np.zeros(inside.sum())
    for t_error in (-1.0, 0.0, 1.0):
        t = total / 2**k + t_error + above
        for p_error in (-1.0, 0.0, 1.0):
            r = ((lam * t * t + s * e[inside]) / 2**plain + p_error) * 2.0**-f + fit["constant"]
            worst = np.maximum(worst, np.abs(r - residual[inside]))
    err = np.zeros_like(x)
    err[inside] = worst
    err[~inside] = np.abs(fit["tail"] - residual[~inside])
    assert err.max() <= fit["err"] + 4 * 2.0**-f
    assert err[x <= 2].max() < 4.5e-3
    assert fit["err"] <= {"silu": 0.0095}.get(name, 0.0025) + 1e-6  # the caps the README states


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
