"""CipherDM's kernels as its code publishes them: the `cipherdm-paper` protocol set.

Source of the numbers: CipherDM (arXiv 2409.05414), github Zhaoxinxinzi/CipherDM,
scripts/flax_sample_hack.py (published coefficients and thresholds, re-expressed here).

- SiLU / Mish: 0 below -6; a quadratic on [-6, -2); an even sextic plus a linear term on [-2, 6];
  x above 6. Three separate comparisons, combined by multiplying with the 0/1 masks.
  Measured defects: a jump at x = 6 (SiLU max error ~0.075, Mish ~0.127) and a bias at x = 0.
- exp inside SoftMax: a degree-7 "Chebyshev" series on [-14, 0] built from monomials of
  u = x / 7 + 1, masked to 0 below -14; softmax divides by the row sum (the paper's compiler option
  enable_optimize_denominator_with_broadcast turns that into one reciprocal per row).
  Defect, measured: the published weights are not the Chebyshev interpolant of e^x
  (error ~0.048 at x = 0, negative values below about -4.6; the true interpolant errs by ~0.007).
  Reproduced as published; the fixed design is `protocols.cipherdm`.
- Not covered by the paper (GeLU, sigmoid, rsqrt): the set uses SPU's own kernels.
Measured beside the other sets: docs/results/kernels.md; the float64 references: `reference`.
"""

from __future__ import annotations

import jax.numpy as jnp

from cipherdm_spu.registry import kernel, register_kernel

NAME = "cipherdm-paper"

# Published piecewise coefficients: quadratic on [-6, -2) as (c0, c1, c2); [-2, 6] as (c0, c1, c2, c4, c6).
SILU_QUADRATIC = (-0.52212664, -0.16910363, -0.01420163)
SILU_SEXTIC = (0.03453821, 0.49379432, 0.19784596, -0.00602401, 0.00008032)
MISH_QUADRATIC = (-0.55684445, -0.18375535, -0.01572019)
MISH_SEXTIC = (0.07559242, 0.54902050, 0.20152583, -0.00735309, 0.00010786)
# Published weights of T_0..T_7(u), u = x / 7 + 1 mapping [-14, 0] to [-1, 1].
EXP_WEIGHTS = (0.14021878, 0.27541278, 0.22122865, 0.14934221, 0.0907736, 0.04369614, 0.02087868, 0.00996535)
EXP_LOWER = -14.0


def _piecewise(x, quadratic, sextic):
    below_m6, below_m2, above_6 = x < -6.0, x < -2.0, x > 6.0
    middle = jnp.logical_not(jnp.logical_xor(below_m2, above_6))  # -2 <= x <= 6
    lower = jnp.logical_xor(below_m6, below_m2)  # -6 <= x < -2
    x2 = x * x
    x4 = x2 * x2
    x6 = x2 * x4
    q0, q1, q2 = quadratic
    s0, s1, s2, s4, s6 = sextic
    seg_lower = q2 * x2 + q1 * x + q0
    seg_middle = s6 * x6 + s4 * x4 + s2 * x2 + s1 * x + s0
    return above_6 * x + lower * seg_lower + middle * seg_middle


@register_kernel("silu", NAME)
def silu(x):
    return _piecewise(x, SILU_QUADRATIC, SILU_SEXTIC)


@register_kernel("mish", NAME)
def mish(x):
    return _piecewise(x, MISH_QUADRATIC, MISH_SEXTIC)


def _chebyshev_exp(x):
    """The published series, from the monomials of u (as the paper's code evaluates it)."""
    u = x * (1.0 / 7.0) + 1.0
    u2 = u * u
    u3 = u2 * u
    u4 = u3 * u
    u5 = u4 * u
    u6 = u5 * u
    u7 = u6 * u
    t = (
        1.0,
        u,
        2 * u2 - 1,
        4 * u3 - 3 * u,
        8 * u4 - 8 * u2 + 1,
        16 * u5 - 20 * u3 + 5 * u,
        32 * u6 - 48 * u4 + 18 * u2 - 1,
        64 * u7 - 112 * u5 + 56 * u3 - 7 * u,
    )
    return sum(w * ti for w, ti in zip(EXP_WEIGHTS, t))


@register_kernel("exp", NAME)
def exp(x, scale: float = 1.0):
    """The paper's exp of scale x, as used in its softmax: the series on [-14, 0], masked to 0 below -14 (the scale a
    public product first, none for scale 1)."""
    if scale != 1.0:
        x = x * scale
    return _chebyshev_exp(x) * (x > EXP_LOWER)


@register_kernel("softmax", NAME)
def softmax(x, axis: int, exp_impl: str, scale: float = 1.0):
    """Max subtraction, the set's exp (this module's in the `cipherdm-paper` set) of the scaled shift, division by
    the row sum."""
    shifted = x - jnp.max(x, axis=axis, keepdims=True)
    e = kernel("exp", exp_impl)(shifted, scale=scale)
    return e / jnp.sum(e, axis=axis, keepdims=True)
