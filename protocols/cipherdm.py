"""Our secure kernels: the `cipherdm` protocol set (built for send actions: rounds) and the kernels that its
`cipherdm-low-byte` sibling uses instead (built for bytes).

One step away: their coefficients (`coefficients`, written by scripts/fit_kernels.py), the float64 functions
they approximate (`reference`), their measured bytes, send actions and errors (docs/results/kernels.md,
`python scripts/benchmark_kernels.py`) and what SPU's building blocks cost under ABY3/FM64
(docs/results/primitives.md, `python scripts/primitive_costs.py`). The designs rest on how those blocks
rank: a comparison (an MSB extraction: 8 send actions) costs most, then converting its bit to arithmetic
(2), then a select (its own conversion and product); the product of an arithmetic bit and a value
(`_bit_times`: an integer product, one reshare, no truncation: 1) costs least, below a secret product
(reshare and truncation: 3) and a public product (a truncation: 2). Independent comparisons are batched into
one MSB extraction, and independent products into one stacked product, because a WAN waits per round.

Activations use f(x) = step(x) + R(|x|), R fitted by minimax over the whole real line (scripts/fit_kernels.py):
  one comparison gives sign(x) and, batched with it, the window [|x| < T] (from the sign of E_T^2 - E^2 of
  the encoding E, one integer product before it: |x| < 11585); one bit product gives relu(x) and, for free,
  |x| = 2 relu(x) - x.
  SiLU and Mish (the UNets' activations), fitted error <= 9.5e-3. Mish: a second bit product clamps |x| to T
  *before* any power is taken, so no intermediate can wrap the ring, and R(min(|x|, T)) is a times a quartic in
  Knuth's adapted form, its two quartics (x > 0, x <= 0) one, with coefficients picked by the sign bit (`_pick`:
  local, on the ring encodings). SiLU (`cipherdm`): the "masked square" turns the clamp around: R = lam * t^2 +
  s * a + c with t = a^2 / 16 + t1 * a + t0 is evaluated on |x| itself, t from ONE truncation of sums of the
  window's own product E_T^2 - E^2, and the window bit multiplies R last (outside the window R may wrap the ring;
  the mask zeroes it, leaving a constant tail R(T) / 2): one product fewer than a clamp and a quartic in two
  truncations (`cipherdm-low-byte`'s "half-square": u = c * a rounded to 9 fraction bits, so (u + beta0) * u is an
  integer product; its window compared after |x| is known: as many bytes, more send actions, no range limit).
  GeLU and sigmoid (to beat SPU's Pade-based kernels on error): R is a degree-13 polynomial (sigmoid:
  two pieces, degrees 9 and 7, split by one more comparison in the same batch, one evaluation with
  picked coefficients) evaluated as E(v^2) + v O(v^2), Horner in v^2 for both halves side by side, with
  scaled accumulators; the fit errs < 2e-6 in float64, so what remains under MPC is mostly the input's own
  2^-18 encoding. GeLU's R is even too, so `cipherdm-masked-square` (a kernel outside the sets) takes the SiLU's
  masked square for it: the SiLU's cost, fitted error <= 2.5e-3.
SoftMax subtracts the row max (a tournament whose group widths, level by level, suit the call's size, a group's
candidates ANDing their comparison bits while those are boolean shares, about a byte an AND, where that saves
conversions and products; pairs in `cipherdm-low-byte`), takes exp as a clamped quartic squared three times, and
one reciprocal per row (which, where that saves time, takes the exps in its first round). "Saves time" is priced on
the benchmark's WAN; `cipherdm-lan` (a kernel outside the sets) prices the same forms on its LAN.
rsqrt and the softmax reciprocal find their input's half- or quarter-octave by one batched comparison and
evaluate per-piece quadratics in three rounds of products, with no Newton step (`_octave_polynomial`);
`cipherdm-low-byte`'s rsqrt reads the octave off the bits of the encoding (one conversion to boolean shares
and a prefix OR: fewer bytes, more rounds) and takes one Newton step.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cipherdm_spu import registry
from cipherdm_spu.linalg import batched_matmul
from cipherdm_spu.ring import bit_times as _bit_times
from cipherdm_spu.ring import encoding as _encoding
from cipherdm_spu.ring import indicator as _indicator
from cipherdm_spu.ring import int_type as _int_type
from cipherdm_spu.registry import register_kernel

from .coefficients import (
    ACTIVATIONS,
    EXP_BASE,
    HORNER_ACTIVATIONS,
    HORNER_SCALE,
    MASKED_ACTIVATIONS,
    RECIPROCAL_PIECES,
    RSQRT_GUESS,
    RSQRT_PIECES,
)

NAME = "cipherdm"

# What `cipherdm`'s softmax optimises its form for: the time a call takes on the benchmark's WAN
# (cipherdm_spu/benchmark.py, NETWORKS; the set is built for it): send actions times RTT/2, a party's bytes over the
# bandwidth, and the parties' local compute, which for a comparison (SPU's MSB extraction) outweighs its bytes' transfer
# by about four. Its building blocks' costs as measured by scripts/primitive_costs.py (docs/results/primitives.md).
REFERENCE_NETWORK = (400e6, 40e-3)  # bits per second, round-trip seconds
# The benchmark's LAN, which the `cipherdm-lan` softmax prices its forms on instead: a send action costs a hundredth
# of the WAN's there, so comparisons' compute and bytes outweigh rounds (a user's choice for such a deployment).
LAN_NETWORK = (5e9, 0.4e-3)  # bits per second, round-trip seconds


class Block(NamedTuple):
    """A building block's cost per element: bytes a party sends, send actions (rounds), and wall seconds of the three
    parties' compute as the benchmark measures a step's (three parties in one process on this project's two-core
    machines: primitives.md's ns/elem, which vary by tens of % between runs; they steer a choice, nothing else). The
    seconds below are one run's (primitives.md at 2dcf415), the run whose forms the committed benchmarks measure; later
    runs measured the blocks lower and pick the same forms but at two SD shapes (docs/performance.md, "Rounds")."""

    bytes: float
    actions: int
    seconds: float


COMPARISON = Block(36.0, 8, 3.1e-6)
CONVERSION = Block(32.0 / 3, 2, 0.4e-6)  # of a comparison's bit to arithmetic
BIT_AND = Block(1.0, 1, 0.0)  # of two comparison bits, boolean shares of one bit (its seconds: below the run's noise)
INTEGER_PRODUCT = Block(8.0, 1, 1.8e-7)
SECRET_PRODUCT = Block(52.0 / 3, 3, 3.5e-7)
PUBLIC_PRODUCT = Block(28.0 / 3, 2, 3.3e-7)
MAX_TOURNAMENT_ARITY = 8  # groups of up to 8: a candidate's 7 bits and a difference in 3 product rounds (4 with ANDs)
# rsqrt: the octaves k of x in [2**k, 2**(k+1)) it tells apart (in halves) (x from 2**-18, SPU's smallest positive
# value, to 2**22 = 4.2e6: a GroupNorm of 16 * variances up to 2.6e5).
RSQRT_OCTAVES = (-18, 21)
# `_octave_polynomial` without a secret factor: the bits its sum is kept larger by until one public product.
HEADROOM_BITS = 8
# The largest |value| the masked square truncates by a tiny public constant (2**-28 at 18 fraction bits), which SPU
# multiplies at extra precision first and gets wrong for large inputs: a bit under the largest that
# docs/results/primitives.md measures it exact for.
MAX_TINY_TRUNCATION = 2.0**43
# rsqrt_low_byte: inputs normalised into [1, 4) by 4**j for j in this range (covers ~4e-6 .. 2.6e5).
RSQRT_LOW_BYTE_EXPONENTS = np.arange(-9, 9)


# ----------------------------------------------------------------------------------------------
# building blocks


def _batched_bits(x, thresholds):
    """(len(thresholds), *x.shape) booleans x >= threshold_j, from one batched comparison. Under SPU each threshold
    is first rounded up onto the encoding's 2**-f grid, where x >= t holds exactly as for t itself; SPU would
    truncate it (a threshold of 2**-16.5 became 2**-17)."""
    thresholds = np.asarray(thresholds, np.float64)
    fraction_bits = registry.fixed_point_bits()
    if fraction_bits is not None:
        thresholds = np.ceil(thresholds * 2.0**fraction_bits) * 2.0**-fraction_bits
    return x[None] >= jnp.asarray(thresholds, dtype=x.dtype).reshape((-1,) + (1,) * x.ndim)


def _quartic(a, alpha):
    """alpha4 * ((y + a + alpha2) * y + alpha3), y = (a + alpha0) * a + alpha1: a quartic, 2 products."""
    a0, a1, a2, a3, a4 = alpha
    y = (a + a0) * a + a1
    return ((y + a + a2) * y + a3) * a4


def _select(bit, when_one, when_zero):
    """where(bit, when_one, when_zero) for a 0/1 integer bit, as one `_bit_times`."""
    return when_zero + _bit_times(bit, when_one - when_zero)


def _ring_tables(bits, tables, as_int):
    """values[k] per element for each of ``tables``, as ring integers stacked on axis 0, k = sum of the 0/1
    integer ``bits`` (stacked on axis 0) for bits that are monotone (bits[j] = [x >= t_j] for rising t_j: k
    counts the thresholds passed): values[0] plus sum_j bits[j] * (values[j+1] - values[j]). Local: the product of
    a public integer matrix (tables x thresholds) with the secret bits, one per 16-bit limb (so that no constant
    overflows ``as_int`` and XLA cannot fold two into one)."""
    tables = [[int(v) for v in values] for values in tables]
    for values in tables:
        if len(values) != bits.shape[0] + 1:
            raise ValueError(f"{bits.shape[0]} bits select among {bits.shape[0] + 1} values, not {len(values)}")
        if max(abs(v) for v in values) >= 1 << 62:
            raise ValueError(f"a table value beyond the ring: {max(values, key=abs)}")
    base = [values[0] for values in tables]
    diffs = [[b - a for a, b in zip(values, values[1:])] for values in tables]
    limit = 1 << (8 * jnp.dtype(as_int).itemsize - 1)
    fits = lambda vs: all(-limit <= v < limit for v in vs)  # noqa: E731
    limbs = []  # (diff limbs, base limbs), least significant first; the last keeps the signs
    while not (fits(base) and all(fits(d) for d in diffs)):
        low = [[d % (1 << 16) for d in row] for row in diffs]
        diffs = [[d >> 16 for d in row] for row in diffs]
        limbs.append((low, [b % (1 << 16) for b in base]))
        base = [b >> 16 for b in base]
    limbs.append((diffs, base))
    flat = bits.astype(as_int).reshape(bits.shape[0], -1)
    ring = None
    for ds, bs in reversed(limbs):  # (tables, bits) @ (bits, elements): one product with a public matrix per limb
        term = jnp.asarray(ds, as_int) @ flat + jnp.asarray(bs, as_int)[:, None]
        ring = term if ring is None else jnp.left_shift(ring, as_int(16)) + term
    return ring.reshape((len(tables),) + bits.shape[1:])


def _tables(bits, tables, dtype):
    """Per element, the public constant values[k] of each of ``tables`` (k as in `_ring_tables`), stacked on axis
    0: local, no communication (a select would convert the bits again and multiply).

    Under SPU (`registry.fixed_point_bits()` set while a session compiles) they are built on the ring from the
    constants' encodings as SPU encodes a public constant (c * 2**f truncated toward zero); in plain JAX,
    values indexed by k."""
    fraction_bits = registry.fixed_point_bits()
    if fraction_bits is None:
        k = jnp.sum(bits.astype(jnp.int32), axis=0)
        return jnp.stack([jnp.take(jnp.asarray(values, dtype), k) for values in tables])
    scale = 2.0**fraction_bits
    encodings = [[np.trunc(v * scale) for v in values] for values in tables]
    if max(abs(e) for row in encodings for e in row) >= 2.0**62:
        raise ValueError(f"cannot encode {max((v for t in tables for v in t), key=abs)} with {fraction_bits} "
                         "fraction bits in the ring")
    return jax.lax.bitcast_convert_type(_ring_tables(bits, encodings, _int_type(dtype)), dtype)


def _table(bits, values, dtype):
    """One of `_tables`."""
    return _tables(bits, [values], dtype)[0]


def _pick(bit, when_one, when_zero, dtype):
    """Per element, the public constant ``when_one`` where the 0/1 integer bit is 1, else ``when_zero``: a
    `_table` of one bit."""
    return _table(bit[None], [when_zero, when_one], dtype)


def _relu_and_abs(x):
    """(sign bit, relu(x), |x|) with one comparison, one conversion and one integer product."""
    positive = _indicator(x > 0)
    relu = _bit_times(positive, x)
    return positive, relu, relu + relu - x


def _relu(x):
    return _relu_and_abs(x)[1]


def _relu_and_clamped_abs(x, T: float):
    """(sign bit, relu(x), min(|x|, T)) with two comparisons and two integer products."""
    positive, relu, magnitude = _relu_and_abs(x)
    return positive, relu, _select(_indicator(magnitude < T), magnitude, T)


def _relu_plus_a_quartic(x, name: str):
    """relu(x) + a * quartic(a), a = min(|x|, T); the sign bit picks the quartic's coefficients (R differs by
    sign), so one quartic is evaluated instead of two. Sign and window from one comparison
    (`_sign_and_window`: |x| < 11585)."""
    c = ACTIVATIONS[name]
    positive, relu, a = _relu_and_clamped_abs_low_round(x, c["T"])
    alpha = [_pick(positive, p, m, x.dtype) for p, m in zip(c["plus"], c["minus"])]
    return relu + a * _quartic(a, alpha)


def _rounded_integer(a, scale: int):
    """round(a * scale) as an integer array, with one truncation: under SPU the public product of a by
    scale * 2**-f, whose ring element *is* a * scale (SPU's probabilistic truncation errs by < 1 unit)."""
    fraction_bits = registry.fixed_point_bits()
    if fraction_bits is None:
        return jnp.round(a * scale).astype(_int_type(a.dtype))
    return _encoding(a * (scale * 2.0**-fraction_bits))


def _from_integer(n, bits: int, dtype):
    """The integer n read as a fixed-point number with ``bits`` fraction bits: under SPU, local (a shift to
    the session's fraction bits, by an integer product with a public power of two, and a reinterpretation)."""
    fraction_bits = registry.fixed_point_bits()
    if fraction_bits is None:
        return n.astype(dtype) * 2.0**-bits
    if fraction_bits < bits:
        raise NotImplementedError(f"needs at least {bits} fraction bits; the session has {fraction_bits}")
    return jax.lax.bitcast_convert_type(n * n.dtype.type(2 ** (fraction_bits - bits)), dtype)


def _product_plus_linear(p, q, v, s: float):
    """p * q + s * v with one truncation: under SPU the integer product of p's and q's encodings (2f fraction
    bits) plus v's encoding times the integer s * 2**f, then one truncation by f bits (a public product by
    2**-f). A separate s * v would cost a truncation of its own."""
    fraction_bits = registry.fixed_point_bits()
    if fraction_bits is None:
        return p * q + s * v
    wide = _encoding(p) * _encoding(q) + _encoding(v) * _int_type(p.dtype)(round(s * 2.0**fraction_bits))
    return jax.lax.bitcast_convert_type(wide, p.dtype) * 2.0**-fraction_bits


def _sign_and_windows(x, thresholds):
    """Arithmetic bits [x > 0] and, stacked, [|x| < T] for each of ``thresholds`` from ONE batched comparison, so the
    windows do not wait for |x|; and the windows' products, stacked (None in float).

    Under SPU a window is the sign of (E_T - E)(E + E_T) = E_T^2 - E^2, an integer product of the encodings E = x *
    2**f and E_T = T * 2**f (all windows' in one stacked product; no constant beyond 32 bits, so nothing for XLA to
    fold). Its square must fit the ring: correct for |x| < 2**(31.5 - f) (11585 at f = 18); beyond, a window's bit is
    that of a wrapped square (`_relu_and_clamped_abs` has no such limit, at 9 more send actions)."""
    fraction_bits = registry.fixed_point_bits()
    if fraction_bits is None:
        bits = _indicator(jnp.stack([x > 0] + [jnp.abs(x) < T for T in thresholds]))
        return bits[0], bits[1:], None
    e = _encoding(x)
    ends = jnp.asarray([round(T * 2.0**fraction_bits) for T in thresholds], e.dtype).reshape((-1,) + (1,) * e.ndim)
    gaps = (ends - e) * (e + ends)
    bits = _indicator(jnp.concatenate([e[None], gaps]) > 0)  # one comparison, one conversion for all the bits
    return bits[0], bits[1:], gaps


def _sign_and_window(x, T: float):
    """(`_sign_and_windows` of one threshold) [x > 0], [|x| < T] and the window's product E_T^2 - E^2."""
    positive, inside, gaps = _sign_and_windows(x, [T])
    return positive, inside[0], None if gaps is None else gaps[0]


def _relu_and_clamped_abs_low_round(x, T: float):
    """(sign bit, relu(x), min(|x|, T)) as `_relu_and_clamped_abs`, its two bits from one comparison
    (`_sign_and_window`)."""
    positive, inside, _ = _sign_and_window(x, T)
    relu = _bit_times(positive, x)
    return positive, relu, _select(inside, relu + relu - x, T)


def _relu_plus_half_square(x, name: str):
    """relu(x) + (z + gamma1) * z + s * a + gamma0, a = min(|x|, T), z = (u + beta0) * u, u = c * a rounded
    to ``bits`` = 9 fraction bits: z is an integer product at 18 bits (no truncation), so the quartic costs
    two truncations (u's and the last product's) where Knuth's form costs three. u's rounding is part of
    the fit (scripts/fit_kernels.py); the exact a carries R's linear term, so it moves R by < 4.4e-3.
    The window is compared after |x| is known (`_relu_and_clamped_abs`: no range limit)."""
    c = ACTIVATIONS[name]
    _, relu, a = _relu_and_clamped_abs(x, c["T"])
    u = _rounded_integer(a, c["scale"])  # u * 2**bits
    z = _from_integer((u + c["beta0"]) * u, 2 * c["bits"], x.dtype)
    return relu + _product_plus_linear(z + c["gamma1"], z, a, c["linear"]) + c["gamma0"]


def _masked_square_base(magnitude, gap, c: dict):
    """t = a^2 / 2**shift + t1 * a + t0 for a = |x| (``magnitude``), as an integer at t_bits fraction bits.

    Under SPU from ONE truncation: t * 2**(2f + shift) = E^2 + K * |E| + t0 * 2**(2f + shift) with K = t1 * 2**(f +
    shift), and E^2 = E_T^2 - gap comes from the window's product, so the only products are by public integers. The
    constant's multiple of 2**k (k the truncation's shift) is added after it, so no constant passes 32 bits; the rest
    is truncated by a public product by 2**-k (k > 16: SPU's tiny-constant path), whose input must stay below
    MAX_TINY_TRUNCATION on the window: t's leading coefficient is 2**-shift for that reason (scripts/fit_kernels.py).
    The coefficients are on the grids of one session's fraction bits (c["fraction_bits"]); another is refused.

    In a loop's body (`registry.in_loop_body`) SPU would multiply by that tiny constant's encoding, zero
    (`cipherdm_spu.public_constants`), so the truncation is two plain ones, of k//2 and k - k//2 bits: one more public
    product (docs/results/primitives.md prices one). The constant's multiple of 2**(k - k//2) is added between them,
    which also keeps the compiler from folding the two constants back into one."""
    fraction_bits = registry.fixed_point_bits()
    t_bits, shift = c["t_bits"], c["square_shift"]
    if fraction_bits is None:
        a = magnitude
        return jnp.round((a * a * 2.0**-shift + c["t1"] * a + c["t0"]) * 2.0**t_bits).astype(_int_type(a.dtype))
    if fraction_bits != c["fraction_bits"]:
        raise NotImplementedError(f"the masked square's constants are fitted on the grid of {c['fraction_bits']} "
                                  f"fraction bits; the session has {fraction_bits}")
    as_int = _int_type(magnitude.dtype)
    k = 2 * fraction_bits + shift - t_bits
    e_t = round(c["T"] * 2.0**fraction_bits)
    slope = round(c["t1"] * 2.0 ** (fraction_bits + shift))
    above, rest = divmod(e_t * e_t + round(c["t0"] * 2.0 ** (2 * fraction_bits + shift)), 2**k)
    # the truncated sum on the window, v^2 + slope v - e_t^2 + rest for v = |E| in [0, e_t): a quadratic, largest in
    # magnitude at an end or at its vertex
    ends = [0.0, float(e_t), min(max(-slope / 2.0, 0.0), float(e_t))]
    largest = max(abs(v * v + slope * v - e_t * e_t + rest) for v in ends)
    if largest >= MAX_TINY_TRUNCATION:
        raise NotImplementedError(f"the masked square's truncated sum reaches 2**{math.log2(largest):.1f}, past "
                                  f"2**{math.log2(MAX_TINY_TRUNCATION):.0f}")
    total = _encoding(magnitude) * as_int(slope) - gap + as_int(rest)
    if registry.in_loop_body():
        half = k // 2
        if abs(above << (k - half)) >= 2**31 or k - half > 16:
            raise NotImplementedError(f"the masked square's loop form cannot truncate {k} bits in two plain public "
                                      "products with a constant within 32 bits")
        partly = _encoding(jax.lax.bitcast_convert_type(total, magnitude.dtype) * 2.0**-half)
        partly = partly + as_int(above << (k - half))
        return _encoding(jax.lax.bitcast_convert_type(partly, magnitude.dtype) * 2.0 ** -(k - half))
    return _encoding(jax.lax.bitcast_convert_type(total, magnitude.dtype) * 2.0**-k) + as_int(above)


def _scaled_square_plus_linear(t, magnitude, c: dict):
    """lam * t^2 + s * a for t an integer at t_bits fraction bits: under SPU one integer product and one plain
    truncation (a public product by 2**-plain_shift) of lam's integer times t^2 plus s's integer times |E|, both at
    f + plain_shift fraction bits (lam and s are on those integers' grids: scripts/fit_kernels.py)."""
    fraction_bits = registry.fixed_point_bits()
    t_bits, plain_shift = c["t_bits"], c["plain_shift"]
    if fraction_bits is None:
        real_t = t.astype(magnitude.dtype) * 2.0**-t_bits
        return c["lam"] * real_t * real_t + c["linear"] * magnitude
    as_int = _int_type(magnitude.dtype)
    lam = as_int(round(c["lam"] * 2.0 ** (fraction_bits + plain_shift - 2 * t_bits)))
    total = t * t * lam + _encoding(magnitude) * as_int(round(c["linear"] * 2.0**plain_shift))
    return jax.lax.bitcast_convert_type(total, magnitude.dtype) * 2.0**-plain_shift


def _relu_plus_masked_square(x, name: str):
    """relu(x) + tail + [|x| < T] (lam * t^2 + s * a + c - tail), a = |x|, t = a^2 / 2**shift + t1 * a + t0 held at
    t_bits fraction bits (MASKED_ACTIVATIONS, scripts/fit_kernels.py).

    Sign and window from one comparison (`_sign_and_window`: |x| < 11585), relu and so |x| from one bit product;
    t from one truncation of sums of the window's own product (`_masked_square_base`), lam * t^2 + s * a from an
    integer product and one truncation (`_scaled_square_plus_linear`), and the window bit masks them (a bit
    product): no clamp of |x| before the powers, since outside the window they may wrap the ring and the mask
    zeroes them; there f(x) = relu(x) + tail. Three bit or integer products and two truncations after the
    comparison, where the clamped half-square (`_relu_plus_half_square`) takes four and two."""
    c = MASKED_ACTIVATIONS[name]
    positive, inside, gap = _sign_and_window(x, c["T"])
    relu = _bit_times(positive, x)
    magnitude = relu + relu - x
    r = _scaled_square_plus_linear(_masked_square_base(magnitude, gap, c), magnitude, c)
    return relu + _bit_times(inside, r + (c["constant"] - c["tail"])) + c["tail"]


def _polynomial(m, coef):
    """sum_k coef[k] m^k by Horner (the first product is by a public constant)."""
    r = coef[-1]
    for c in coef[-2::-1]:
        r = r * m + c
    return r


def _even_odd_polynomial(v, coef):
    """sum_k coef[k] v^k as E(w) + v O(w), w = v^2, E and O (the even and odd coefficients) by Horner in w side by
    side: one stacked product per step, so degree d takes floor(d / 2) + 2 rounds of products (w, the steps,
    v O) where Horner in v takes d. Coefficients may be public or secret (picked per element)."""
    even, odd = list(coef[0::2]), list(coef[1::2])
    odd += [0.0] * (len(even) - len(odd))  # an even degree: O's top coefficient is 0
    pair = lambda e, o: jnp.stack([jnp.broadcast_to(jnp.asarray(c, v.dtype), v.shape) for c in (e, o)])  # noqa: E731
    w = v * v
    acc = pair(even[-1], odd[-1])
    for e, o in zip(even[-2::-1], odd[-2::-1]):
        acc = acc * w + pair(e, o)
    return acc[0] + v * acc[1]


def _horner_scaled(v, coef):
    """sum_k coef[k] v^k (`_even_odd_polynomial`), the accumulators kept times HORNER_SCALE: each product's
    truncation error (one unit of 2^-18) weighs 1 / HORNER_SCALE in the result before later steps multiply it by
    w^k = v^(2k) (scripts/fit_kernels.py checks that these, w's own rounding and the last unscaling add up to less
    than two units)."""
    return _even_odd_polynomial(v, [HORNER_SCALE * c for c in coef]) * (1.0 / HORNER_SCALE)


def _piecewise_horner(x, name: str):
    """step(x) + R(|x|) with R piecewise (one or two pieces); the sign and the bits |x| < T and |x| < split come
    from one batched comparison (`_sign_and_windows`: |x| < 11585). With two pieces the split bit picks the centre
    and the coefficients, so one evaluation (of the higher degree) serves both."""
    fit = HORNER_ACTIVATIONS[name]
    pieces = fit["pieces"]
    if len(pieces) > 2:
        raise NotImplementedError(f"{name}: more than two pieces")
    bounds = [pieces[-1]["hi"]] + [p["hi"] for p in pieces[:-1]]
    positive, below, _ = _sign_and_windows(x, bounds)  # [x > 0], [|x| < bound]
    relu = _bit_times(positive, x)
    magnitude = relu + relu - x
    a = _select(below[0], magnitude, bounds[0])
    if len(pieces) == 1:
        r = _horner_scaled(a - pieces[0]["center"], pieces[0]["coef"])
    else:
        first, second = pieces
        in_first = below[1]
        degree = max(len(first["coef"]), len(second["coef"]))
        coefs = [list(p["coef"]) + [0.0] * (degree - len(p["coef"])) for p in pieces]
        v = a - _pick(in_first, first["center"], second["center"], x.dtype)
        scaled = [_pick(in_first, HORNER_SCALE * c1, HORNER_SCALE * c2, x.dtype) for c1, c2 in zip(*coefs)]
        r = _even_odd_polynomial(v, scaled) * (1.0 / HORNER_SCALE)
    if fit["step"] == "relu":
        return relu + r
    return r + _bit_times(positive, 1.0 - r - r)


# ----------------------------------------------------------------------------------------------
# kernels


@register_kernel("silu", NAME)
def silu(x):
    """The masked square: sign and window from one comparison, correct for |x| < 11585 (see `_sign_and_window`)."""
    return _relu_plus_masked_square(x, "silu")


@register_kernel("silu", f"{NAME}-low-byte")
def silu_low_byte(x):
    """The clamped half-square, the window compared after |x|: as many bytes, more send actions
    (docs/results/kernels.md), no range limit."""
    return _relu_plus_half_square(x, "silu")


@register_kernel("mish", NAME)
def mish(x):
    return _relu_plus_a_quartic(x, "mish")


@register_kernel("gelu", NAME)
def gelu(x, approximate: bool = False):
    """The exact (erf) GeLU, or its tanh form with ``approximate`` (they differ by up to 5e-4)."""
    return _piecewise_horner(x, "gelu_tanh" if approximate else "gelu")


@register_kernel("gelu", f"{NAME}-masked-square")
def gelu_masked_square(x, approximate: bool = False):
    """GeLU as the SiLU's masked square (its R(a) = -a Phi(-a), even as the SiLU's): the SiLU's bytes and send actions
    at the fit's cap on the whole line (scripts/fit_kernels.py, MASKED_GELU_CAP) instead of the Horner GeLU's
    precision; not in a set, a user's trade-off: ``overrides={"gelu": "cipherdm-masked-square"}``. Correct for
    |x| < 11585 (`_sign_and_window`)."""
    return _relu_plus_masked_square(x, "gelu_tanh" if approximate else "gelu")


@register_kernel("sigmoid", NAME)
def sigmoid(x):
    return _piecewise_horner(x, "sigmoid")


@register_kernel("exp", NAME)
def exp_nonpositive(x, scale: float = 1.0):
    """e^(scale x) for x <= 0 (softmax's domain after max subtraction; ``scale`` a public constant > 0, softmax's,
    folded into the first product) as Q(t) ** reach with t = EXP_BASE's scale * max(scale x, clamp)
    (`coefficients.EXP_BASE`, fitted by scripts/fit_kernels.py to the final absolute error, its constants on SPU's
    grid; a softmax scale moves the product's constant off the grid, by a relative 2**-18 / constant, which moves
    e^x by at most that over e): below the clamp it is the tail value, the right limit, never a wrapped one.

    The clamp is one comparison, one conversion and one bit product (`_relu` of t - t_clamp) after one public
    product; Q, a quartic in Knuth's form monic in t, takes two secret products, and reach = 8 three squarings.
    It is not built for x > 0 (12 % low at x = 8): callers subtract a max first.
    """
    reach, base_scale, (a0, a1, a2, a3) = EXP_BASE["reach"], EXP_BASE["scale"], EXP_BASE["alpha"]
    if reach & (reach - 1):
        raise ValueError(f"exp's reach must be a power of two (its squarings), not {reach}")
    t_clamp = base_scale * EXP_BASE["clamp"]
    t = _relu(x * (base_scale * scale) - t_clamp) + t_clamp
    y = (t + a0) * t + a1
    q = (y + t + a2) * y + a3
    for _ in range(reach.bit_length() - 1):
        q = q * q
    return q


def _octave_bits(x, bases):
    """Bits x >= bases[j] for j >= 1, x > 0, for bases that are powers of two (below bases[1], all are 0).

    Under SPU, from x's encoding E = x * 2**f: x >= 2**k iff E has a bit at or above k + f. One conversion
    of E to boolean shares (a shift), a prefix OR (six ORs of whole words: 6 ANDs) and local shifts give
    every threshold's bit at once, where a batched comparison pays one MSB extraction per threshold (more
    bytes, fewer send actions). The bits stay boolean: `_scale` converts them once. In plain JAX, the
    comparisons themselves.
    """
    fraction_bits = registry.fixed_point_bits()
    if fraction_bits is None:
        return _batched_bits(x, bases[1:]).astype(jnp.int32)
    exponents = np.log2(np.asarray(bases[1:], dtype=np.float64)) + fraction_bits
    if not np.all(exponents == np.round(exponents)) or exponents.min() < 0:
        raise ValueError(f"octave bases must be powers of two representable with {fraction_bits} fraction bits")
    shifts = exponents.astype(int) - int(exponents.min())
    as_int = _int_type(x.dtype)
    shift = lambda v, k: jax.lax.shift_right_logical(v, as_int(k))  # noqa: E731
    above = shift(_encoding(x), int(exponents.min()))
    for k in (1, 2, 4, 8, 16, 16):  # bit i becomes the OR of bits i .. i + 47
        above = above | shift(above, k)
    return jnp.stack([shift(above, int(k)) & 1 for k in shifts])


def _scale(bits, dtype, *factor_tables):
    """For each table, factors[k] with k = sum(bits) the octave of x (bits from _octave_bits, one fewer than
    factors): factors[-1] + sum_j [x < bases[j+1]] * (factors[j] - factors[j+1]). For monotone tables the
    terms share a sign, so the float simulation cannot cancel (f[0] plus steps down from 4**9 did); all
    tables come from one product with the bits, so SPU converts each bit to arithmetic once."""
    f = np.asarray(factor_tables, dtype=np.float64)
    steps = jnp.asarray(f[:, :-1] - f[:, 1:], dtype=dtype)
    scales = jnp.tensordot(steps, (1 - bits).astype(dtype), axes=1)
    return tuple(scales + f[:, -1].reshape((-1,) + (1,) * (bits.ndim - 1)).astype(dtype))


@register_kernel("rsqrt", f"{NAME}-low-byte")
def rsqrt_low_byte(x, times=None, *, scale: float = 1.0):
    """1/sqrt(x) for x > 0 normalised by powers of 4 read off the bits of its encoding (one conversion to boolean
    shares and a prefix OR), a cubic guess and one Newton step: fewer bytes than `rsqrt`, 14 more send actions
    (docs/results/kernels.md); covers scale * x in 4**-9 .. 4**9, ``scale`` and ``times`` applied as plain
    arithmetic."""
    if scale != 1.0:
        x = x * scale
    js = RSQRT_LOW_BYTE_EXPONENTS
    bits = _octave_bits(x, 4.0 ** js)
    to_half_m, to_result = _scale(bits, x.dtype, 0.5 * 4.0 ** -js, 2.0 ** -js)  # 0.5 in the table: no product
    half_m = x * to_half_m
    m = half_m + half_m  # in [1, 4) for 4**js[0] <= x < 4**(js[-1] + 1)
    r = _polynomial(m, RSQRT_GUESS)
    r = r * (1.5 - half_m * (r * r))
    return r * to_result if times is None else (r * to_result) * times


def _octave_polynomial(x, octaves, pieces, *, unit_bits: int, factor: float = 1.0, times=None):
    """x**-power for x > 0 from one batched comparison and three rounds of secret products, no Newton step:
    piecewise quadratics on [1, 2**unit_bits), one piece per threshold.

    With p = len(pieces) and s = unit_bits, the thresholds are t_k = 2**(s k / p) for k in ``octaves``
    (lo..hi: x in [t_lo, t_(hi+1))); their bits [x >= t_k] come from one comparison, converted once, and every
    factor below is a `_table` of them, local. x = m * 2**(s k') with k' = floor(k / p) and m in [1, 2**s);
    pieces[k % p] covers m in [2**(s (k % p) / p), 2**(s (k % p + 1) / p)). The result is R * P(m) with
    R = 2**(-k') (the pieces' power is the caller's: rsqrt's s = 2 makes 2**(-k') the root of 4**(-k'), the
    reciprocal's s = 1 the reciprocal of 2**k'; R must stay >= 2**-f). P is its piece's quadratic in
    u = 4m - (the piece's middle), so |u| stays small and the coefficients' 2**-f rounding is not magnified,
    and it is never formed: R P = c0 R + (c1 + c2 u)(R u), so round 1 is u (x times 4 * 2**(-s k')),
    round 2 R u and c2 u stacked, round 3 one product. A cubic would need a fourth round (its term
    R c3 u^3 has four factors that each take a round); a quadratic needs twice the pieces for the same error,
    which only adds thresholds to the one comparison.

    A public ``factor`` multiplies the coefficients (free). A secret ``times`` multiplies the result: R times
    it rides in round 1's product (one multiply of both, concatenated), and c0 R joins round 2's, so it costs
    no round of its own. Without ``times`` the sum is taken 2**HEADROOM_BITS times larger and scaled down by
    one public product (a truncation: two send actions): its terms are each rounded to 2**-f, which a result of
    2**-10 (the reciprocal of a 1024-wide row's sum, shared by the whole row) would feel as 0.8 %.
    """
    lo, hi = octaves
    per_unit = len(pieces)
    ks = np.arange(lo, hi + 1)
    k_out = ks // per_unit
    piece = ks % per_unit
    middle = 2.0 * (2.0 ** (unit_bits * piece / per_unit) + 2.0 ** (unit_bits * (piece + 1) / per_unit))  # of 4m
    # sum_i c_i v^i = sum_j (sum_(i>=j) c_i C(i, j) middle^(i-j)) u^j with v = 4m, u = v - middle
    in_v = np.asarray(pieces, np.float64)[piece] * 4.0 ** -np.arange(3) * factor
    coef = np.stack([sum(in_v[:, i] * math.comb(i, j) * middle ** (i - j) for i in range(j, 3)) for j in range(3)], 1)
    to_v = 4.0 * 2.0 ** (-unit_bits * k_out)
    thresholds = 2.0 ** (unit_bits * ks[1:] / per_unit)
    if times is None:  # R is a table, and so is c0 R
        flat = x.reshape(-1)
        r_table = 2.0 ** (HEADROOM_BITS - k_out)
        tables = _tables(_indicator(_batched_bits(flat, thresholds)),
                         [to_v, -middle, coef[:, 0] * r_table, coef[:, 1], r_table, coef[:, 2]], x.dtype)
        u = flat * tables[0] + tables[1]
        r_u, c2_u = tables[4:] * u
        return ((tables[2] + (tables[3] + c2_u) * r_u) * 2.0**-HEADROOM_BITS).reshape(x.shape)
    # every array is laid out as rows and columns, a row per element of x and its columns the elements of the result
    # that element scales, so that each round is one product of concatenated columns; the bits and tables are x's
    shape = jnp.broadcast_shapes(x.shape, times.shape)
    tables = _tables(_indicator(_batched_bits(x.reshape(-1), thresholds)),
                     [to_v, 2.0 ** -k_out, -middle, *coef[:, [0, 2, 1]].T], x.dtype)
    if not _repeats_along_trailing_axes(x.shape, shape):  # a row per element of the result: broadcast x and its tables
        at_x = tables.reshape((len(tables),) + (1,) * (len(shape) - x.ndim) + x.shape)
        tables = jnp.broadcast_to(at_x, (len(tables),) + shape).reshape(len(tables), -1)
        x = jnp.broadcast_to(x, shape)
    rows = x.size
    columns = math.prod(shape) // rows if rows else 0
    by_row = tables.T
    to_v, r, minus_middle, c0, c2, c1 = (by_row[:, j:j + 1] for j in range(len(tables)))
    wide = lambda v: jnp.broadcast_to(v, (rows, columns))  # noqa: E731
    v_rt = (jnp.concatenate([x.reshape(rows, 1), wide(r)], 1)
            * jnp.concatenate([to_v, jnp.broadcast_to(times, shape).reshape(rows, columns)], 1))
    u, rt = v_rt[:, :1] + minus_middle, v_rt[:, 1:]
    products = jnp.concatenate([rt, rt, c2], 1) * jnp.concatenate([wide(u), wide(c0), u], 1)
    r_u, c0_r, c2_u = products[:, :columns], products[:, columns:-1], products[:, -1:]
    return (c0_r + (c1 + c2_u) * r_u).reshape(shape)


def _repeats_along_trailing_axes(shape, result_shape) -> bool:
    """Whether broadcasting an array of ``shape`` to ``result_shape`` repeats each of its elements over a block of
    consecutive elements of the result (its axes are the result's leading ones, then only ones), so that the result
    reshapes to rows of one element's block each."""
    shape = (1,) * (len(result_shape) - len(shape)) + tuple(shape)
    lead = len(shape)
    while lead and shape[lead - 1] == 1:
        lead -= 1
    return shape[:lead] == tuple(result_shape[:lead])


@register_kernel("rsqrt", NAME)
def rsqrt(x, times=None, *, scale: float = 1.0):
    """times / sqrt(scale * x) for x in [2**-18, 2**22) (`_octave_polynomial`: half-octaves of x by comparison,
    piecewise quadratics (their fit's relative error: `coefficients.RSQRT_PIECES`); scale**-1/2 folded into
    their coefficients, ``times`` into round 1): fewer send actions than the encoding-read octave of
    `rsqrt_low_byte`, more bytes; the norms call it once per group, so its bytes are a rounding error of a
    step's."""
    per_octave = len(RSQRT_PIECES) // 2  # pieces per octave: the pieces cover a factor of 4
    thresholds = (per_octave * RSQRT_OCTAVES[0], per_octave * (RSQRT_OCTAVES[1] + 1) - 1)
    return _octave_polynomial(x, thresholds, RSQRT_PIECES, unit_bits=2, factor=scale**-0.5, times=times)


@register_kernel("rsqrt", f"{NAME}-centred")
def rsqrt_centred(x, times=None, *, scale: float = 1.0):
    """`rsqrt`, with the norms around it taking their deviations from the mean in one truncation instead of the
    mean's two in a row (``centres_norms_in_one_truncation``: `models.normalization._scaled_deviations`): a round
    fewer per norm, and no error from the mean, for one more truncation per element of every norm's input. A user's
    choice where rounds are scarce (`--override rsqrt=cipherdm-centred`); docs/results/centred-norms/benchmark.md
    measures it beside `cipherdm`."""
    return rsqrt(x, times, scale=scale)


rsqrt_centred.centres_norms_in_one_truncation = True  # read by models.normalization (see cipherdm_spu.registry)


def reciprocal_in_range(x, lo: float, hi: float, times=None):
    """times / x (1 / x without ``times``) for x in [lo, hi] (lo > 0): `_octave_polynomial` with quarter-octave
    pieces over [lo, hi] (their fit's relative error: `coefficients.RECIPROCAL_PIECES`). Used for softmax
    denominators, which lie in [1, row length]: one per row, so its bytes spread over the row; ``times`` (a
    row's exps) rides in its rounds, saving the round of a separate product. Below 2**floor(log2 lo) it
    extrapolates the lowest quadratic; beyond hi, the top piece's."""
    if not 0 < lo <= hi <= 2**16:
        raise ValueError(f"reciprocal over [{lo}, {hi}]: needs 0 < lo <= hi <= 2**16 (its last factor 2**-k' is kept "
                         "to 18 fraction bits)")
    per_unit = len(RECIPROCAL_PIECES)
    octaves = (per_unit * math.floor(math.log2(lo)), per_unit * math.ceil(math.log2(hi)))
    return _octave_polynomial(x, octaves, RECIPROCAL_PIECES, unit_bits=1, times=times)


@functools.lru_cache(maxsize=None)
def _round_robin(k: int):
    """The pairs of a group of k in `_row_max`, laid out so that every candidate's bits come from slices: for each
    shift s = 1 .. ceil(k/2) - 1, the k pairs (i, (i + s) % k), then for even k the k/2 pairs (i, i + k/2); k(k-1)/2
    in all, each once. Returns ``matrix`` (k, P), whose column for (i, j) gives g_i - g_j; ``strict`` (P,), 1 where
    i > j: there the bit "g_i beats g_j" is g_i > g_j, elsewhere g_i >= g_j (ties go to the earlier element, a
    strict order: exactly one element of a group beats all others); and, for 0/1 integer bits b, ``signs`` (P,
    (k-1)^2) and ``offsets`` ((k-1)^2,) with offsets + b @ signs = `_candidates_bits` (b, 1 - b), flattened: one
    product with a public matrix instead of its slices."""
    pairs = [(i, (i + s) % k) for s in range(1, (k - 1) // 2 + 1) for i in range(k)]
    if k % 2 == 0:
        pairs += [(i, i + k // 2) for i in range(k // 2)]
    matrix = np.zeros((k, len(pairs)), np.int32)
    for column, (i, j) in enumerate(pairs):
        matrix[i, column], matrix[j, column] = 1, -1
    strict = np.array([int(i > j) for i, j in pairs], np.int32)
    with jax.ensure_compile_time_eval():  # constants, also when first called inside a trace
        factors = np.asarray(_candidates_bits(np.eye(len(pairs) + 1, len(pairs), -1, np.int32), k, lambda v: 1 - v))
    offsets = factors[0].reshape(-1)  # from the zero row; the others add one pair's bit each
    signs = factors[1:].reshape(len(pairs), -1) - offsets
    for array in (matrix, strict, signs, offsets):
        array.flags.writeable = False  # shared by every call (cached)
    return matrix, strict, signs, offsets


def _candidates_bits(bits, k: int, negate):
    """(..., k - 1, k - 1): candidate i's bits against its k - 1 opponents on axis -2 (a column per candidate i <
    k - 1), from the bits of `_round_robin`'s pairs on the last axis: against (i + s) % k the pair's own bit,
    against (i - s) % k the negation of that pair's, its row rolled by s. Slices, rolls and one stack: local."""
    shifts = (k - 1) // 2
    rows = []
    for s in range(1, shifts + 1):
        row = bits[..., (s - 1) * k:s * k]
        rows += [row, negate(jnp.roll(row, s, axis=-1))]
    if k % 2 == 0:  # the opposite pairs, once: i < k/2 holds their bits, i + k/2 the negations
        half = bits[..., shifts * k:]
        rows.append(jnp.concatenate([half, negate(half)], axis=-1))
    return jnp.stack(rows, axis=-2)[..., :k - 1]


def _pairwise(values, op):
    """One round of a tree over axis -2: op of its first and second halves, stacked (one op under SPU, one round),
    an odd last row carried as it is."""
    half = values.shape[-2] // 2
    return jnp.concatenate([op(values[..., :half, :], values[..., half:2 * half, :]), values[..., 2 * half:, :]],
                           axis=-2)


def _checked_levels(levels) -> tuple:
    """``levels`` as (k, and_rounds) pairs; a bare k is (k, 0)."""
    levels = tuple((level, 0) if isinstance(level, (int, np.integer)) else tuple(level) for level in levels)
    if not levels or min(k for k, _ in levels) < 2:
        raise ValueError(f"a tournament needs groups of at least 2, not {levels}")
    for k, rounds in levels:
        if not 0 <= rounds <= _most_and_rounds(k):
            raise ValueError(f"a group of {k} ANDs its candidates' {k - 1} bits in 0..{_most_and_rounds(k)} rounds, "
                             f"not {rounds}")
    return levels


def _most_and_rounds(k: int) -> int:
    """The AND rounds that leave a candidate of a group of k one bit: ceil(log2(k - 1))."""
    return (k - 2).bit_length()


def _and_rounds_left(bits_per_candidate: int, rounds: int) -> int:
    """The bits a candidate has left after ``rounds`` rounds of pairwise ANDs."""
    return -(-bits_per_candidate // 2**rounds)


def _row_max(x, axis: int, levels):
    """max over ``axis`` (kept as size 1) by a tournament, exact (an element of the row): level i compares in
    groups of k = levels[i][0] (the last level repeats while more than one candidate is left).

    Each level compares every pair of every group in one batched comparison. In a group g_0 .. g_{k-1}, g_i wins
    if g_i >= g_j for every later j and g_i > g_j for every earlier j (ties go to the earlier element), so exactly
    one wins, and the max is g_{k-1} + sum_{i < k-1} win_i * (g_i - g_{k-1}): win_i is the AND of candidate i's
    k - 1 bits. A level (k, r) first ANDs each candidate's bits pairwise for r rounds while they are boolean
    shares (an AND costs about a byte: docs/results/primitives.md), then converts what is left, m = ceil((k-1) /
    2**r) bits per candidate, to arithmetic and multiplies them and the difference in ceil(log2(m + 1)) rounds
    of stacked integer products (`_bit_times` on ring integers). With r = 0 the k(k-1)/2 pair bits are converted
    once each and the candidates' factors formed from them arithmetically (1 - b is local). A level costs
    k(k-1)/2 comparisons per group, then (r = 0) as many conversions and (k-1)^2 products, or (r > 0) (k-1)(k-1-m)
    ANDs and (k-1) m conversions and products: wider groups mean fewer levels (log_k of the row) and more
    comparisons per element; r AND rounds replace up to r product rounds (r + ceil(log2(m + 1)) >= ceil(log2 k)),
    so ANDs save bytes in as many rounds or one more (`level_cost`).

    The pairs' differences are a product with a public integer matrix (`_round_robin`: local under SPU, on the ring
    encodings), and the candidates' bits slices and rolls of its result (`_candidates_bits`, r > 0) or, converted,
    one more product with public matrices (r = 0); no gather, which SPU runs slowly. So a level is a few dozen ops
    of the SPU program however wide its groups (each op costs the runtime time of its own, communication or not).
    """
    levels = _checked_levels(levels)
    under_spu = registry.fixed_point_bits() is not None
    as_int = _int_type(x.dtype)
    a = jnp.moveaxis(x, axis, -1)
    level = 0
    while a.shape[-1] > 1:
        k, and_rounds = levels[min(level, len(levels) - 1)]
        k = min(k, a.shape[-1])
        and_rounds = min(and_rounds, _most_and_rounds(k))
        level += 1
        pad = (-a.shape[-1]) % k
        if pad:  # repeat the last element: it cannot change the max
            a = jnp.concatenate([a, jnp.repeat(a[..., -1:], pad, axis=-1)], axis=-1)
        groups = a.reshape(a.shape[:-1] + (a.shape[-1] // k, k))  # consecutive runs of k
        matrix, strict, signs, offsets = _round_robin(k)
        if under_spu:  # g_i - g_j on the encodings, less 1 where strict: exact in the ring, no truncation
            differences = _encoding(groups) @ jnp.asarray(matrix, as_int) - jnp.asarray(strict, as_int)
            bits = differences >= 0
        else:  # in float, the differences themselves (a float product could round them, or meet an inf)
            first, second = np.nonzero(matrix.T > 0)[1], np.nonzero(matrix.T < 0)[1]
            differences = groups[..., first] - groups[..., second]
            bits = jnp.where(strict.astype(bool), differences > 0, differences >= 0)
        if and_rounds:  # each candidate's bits, ANDed pairwise while boolean, then converted
            factors = _candidates_bits(bits, k, jnp.logical_not)
            for _ in range(and_rounds):
                factors = _pairwise(factors, jnp.logical_and)
            factors = _indicator(factors).astype(as_int)
        else:  # every pair's bit converted once, the candidates' factors from them (1 - b: local)
            converted = _indicator(bits).astype(as_int)
            factors = jnp.asarray(offsets, as_int) + converted @ jnp.asarray(signs, as_int)
            factors = factors.reshape(groups.shape[:-1] + (k - 1, k - 1))
        last = groups[..., -1]
        lead = _encoding(groups[..., :-1] - last[..., None])[..., None, :]  # the candidates' differences
        factors = jnp.concatenate([factors, lead], axis=-2)
        while factors.shape[-2] > 1:  # one stacked integer product per tree level
            factors = _pairwise(factors, jnp.multiply)
        a = last + jnp.sum(jax.lax.bitcast_convert_type(factors[..., 0, :], x.dtype), axis=-1)
    return jnp.moveaxis(a, -1, axis)


def _call_seconds(send_actions: float, bytes_per_element: float, seconds_per_element: float, elements: int,
                  network: tuple = REFERENCE_NETWORK) -> float:
    """A call's time on ``network`` (bits per second, round-trip seconds): its send actions' latency, its bytes'
    transfer, its compute."""
    bandwidth, rtt = network
    return send_actions * rtt / 2 + elements * (bytes_per_element * 8 / bandwidth + seconds_per_element)


def level_cost(k: int, and_rounds: int) -> tuple:
    """(send actions, bytes per party, seconds) of one group of k at one level of `_row_max`, from the building
    blocks: one comparison of the k(k-1)/2 pairs; with ``and_rounds`` = 0 their bits converted and (k-1)^2 integer
    products in ceil(log2 k) rounds; else (k-1)(k-1-m) ANDs in ``and_rounds`` rounds, then (k-1) m conversions and
    as many products in ceil(log2(m + 1)) rounds, m = ceil((k-1) / 2**and_rounds)."""
    pairs = k * (k - 1) // 2
    if and_rounds == 0:
        actions = COMPARISON.actions + CONVERSION.actions + math.ceil(math.log2(k)) * INTEGER_PRODUCT.actions
        counts = {COMPARISON: pairs, CONVERSION: pairs, INTEGER_PRODUCT: (k - 1) ** 2}
    else:
        m = _and_rounds_left(k - 1, and_rounds)
        actions = (COMPARISON.actions + and_rounds * BIT_AND.actions + CONVERSION.actions
                   + math.ceil(math.log2(m + 1)) * INTEGER_PRODUCT.actions)
        counts = {COMPARISON: pairs, BIT_AND: (k - 1) * (k - 1 - m), CONVERSION: (k - 1) * m,
                  INTEGER_PRODUCT: (k - 1) * m}
    return (actions, sum(n * block.bytes for block, n in counts.items()),
            sum(n * block.seconds for block, n in counts.items()))


def tournament_cost(width: int, levels) -> tuple:
    """(send actions, bytes per party per row element, seconds per row element) of `_row_max` over rows of ``width``
    in ``levels`` (`level_cost` per level, times its groups)."""
    levels = _checked_levels(levels)
    candidates, actions, total_bytes, seconds, level = width, 0, 0.0, 0.0, 0
    while candidates > 1:
        k, and_rounds = levels[min(level, len(levels) - 1)]
        k = min(k, candidates)
        level_actions, group_bytes, group_seconds = level_cost(k, min(and_rounds, _most_and_rounds(k)))
        groups = -(-candidates // k)
        actions += level_actions
        total_bytes += groups * group_bytes
        seconds += groups * group_seconds
        candidates, level = groups, level + 1
    return actions, total_bytes / width, seconds / width


def _level_costs() -> dict:
    """`level_cost` of every level a tournament may take: groups of 2..MAX_TOURNAMENT_ARITY, every AND round count."""
    return {(k, r): level_cost(k, r) for k in range(2, MAX_TOURNAMENT_ARITY + 1) for r in range(_most_and_rounds(k) + 1)}


def tournament_frontier(width: int) -> list:
    """The tournaments over rows of ``width`` that no other beats on both send actions and bytes (by `level_cost`), as
    (send actions, bytes per party per row, levels), fewest send actions first: the trades between rounds and bytes
    (`tournament_levels`, which also prices compute, may choose off it). Found as it finds its best, from one
    candidate up: a tournament from n candidates is a level of groups of k, then one from ceil(n / k), and only that
    one's frontier can be on n's."""
    costs, front = _level_costs(), {1: [(0, 0.0, ())]}
    for candidates in range(2, max(width, 2) + 1):
        options = []
        for (k, and_rounds), (actions, group_bytes, _) in costs.items():
            if k <= candidates:
                groups = -(-candidates // k)
                options += [(actions + a, groups * group_bytes + b, ((k, and_rounds),) + levels)
                            for a, b, levels in front[groups]]
        front[candidates] = pareto_front(options)
    return front[max(width, 2)]


def pareto_front(points) -> list:
    """The points (send actions, bytes, ...) that no other point beats (as many or fewer of both, fewer of one; of
    equal points, the first), fewest send actions first."""
    front, fewest = [], math.inf
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if point[1] < fewest:
            front.append(point)
            fewest = point[1]
    return front


@functools.lru_cache(maxsize=None)
def tournament_levels(width: int, elements: int, network: tuple = REFERENCE_NETWORK) -> tuple:
    """The levels ((k, AND rounds) each) of the row max for a call of ``elements`` in rows of ``width`` that take
    the least time on ``network`` (`tournament_cost`), over groups of 2..MAX_TOURNAMENT_ARITY and every AND
    round count: a level's time depends only on the candidates it starts with, so the least time from each count
    of candidates down to one, found from one candidate up, gives the whole tournament's. Small calls take few
    levels of wide groups; large ones, where bytes and comparisons' compute weigh more, more levels of narrower
    groups; either may AND. Bytes are a mean party's (the busiest sends a few % more)."""
    costs, rows = _level_costs(), elements / max(width, 1)
    best = {1: (0.0, ())}
    for candidates in range(2, max(width, 2) + 1):
        options = []
        for (k, and_rounds), (actions, group_bytes, group_seconds) in costs.items():
            if k <= candidates:
                groups = -(-candidates // k)
                seconds = _call_seconds(actions, groups * group_bytes, groups * group_seconds, rows, network)
                options.append((seconds + best[groups][0], ((k, and_rounds),) + best[groups][1]))
        best[candidates] = min(options)
    return best[max(width, 2)][1]


def fold_exps_pays(elements: int, network: tuple = REFERENCE_NETWORK) -> bool:
    """Whether the ``elements`` numbers the row sums divide (the exps, or their product with the values) should ride in
    the reciprocal's first round (`softmax_in_form`), on ``network``: that saves their product with the
    reciprocal and the reciprocal's own scaling down (a public product: see `_octave_polynomial`) for three more
    secret products per number."""
    saved = SECRET_PRODUCT.actions + PUBLIC_PRODUCT.actions
    return (_call_seconds(saved, 0.0, 0.0, elements, network)
            > _call_seconds(0, 3 * SECRET_PRODUCT.bytes, 3 * SECRET_PRODUCT.seconds, elements, network))


def softmax_in_form(x, axis: int, exp_impl: str, levels, fold_exps: bool, scale: float = 1.0, values=None):
    """e / sum(e), e = exp(scale (x - max)), the max by a tournament in ``levels`` (`_row_max`); with
    ``values`` (rows on the last axis), (e @ values) / sum(e): the division after the product, on the values'
    width instead of the row's. With ``fold_exps`` what is divided rides in the reciprocal's first round (the
    product apart and the reciprocal's scaling saved, three more products per number: `fold_exps_pays`), else a
    product of it and the reciprocal; ``scale`` goes to the exp (ours folds it into its input product). The
    softmax kernels are its forms; the benchmark measures them side by side."""
    if values is not None and axis % x.ndim != x.ndim - 1:
        raise ValueError(f"a softmax weighs values by rows on the last axis, not axis {axis} of rank {x.ndim}")
    shifted = x - _row_max(x, axis, levels)
    e = registry.kernel("exp", exp_impl)(shifted, scale=scale)
    total = jnp.sum(e, axis=axis, keepdims=True)  # in [1, n]: the max entry contributes exactly 1
    divided = e if values is None else batched_matmul(e, values)
    if fold_exps:
        return reciprocal_in_range(total, 1.0, float(x.shape[axis]), times=divided)
    return divided * reciprocal_in_range(total, 1.0, float(x.shape[axis]))


def softmax_for_call_size(elements: int, network: tuple = REFERENCE_NETWORK):
    """`softmax` (on ``network``: `softmax_lan` on LAN_NETWORK) as a call of ``elements`` elements runs it, on an input
    of any size: its form (the tournament's levels, group widths and AND rounds, for the input's row length; whether
    what the row sums divide rides in their reciprocal) is the one chosen on ``network`` for ``elements`` (with values,
    for the call's result: ``elements`` over the row length, times the values' width)."""
    def kernel(x, axis: int, exp_impl: str, scale: float = 1.0, values=None):
        divided = elements if values is None else elements // x.shape[axis] * values.shape[-1]
        return softmax_in_form(x, axis, exp_impl, tournament_levels(x.shape[axis], elements, network),
                               fold_exps_pays(divided, network), scale, values)
    return kernel


@register_kernel("softmax", NAME)
def softmax(x, axis: int, exp_impl: str, scale: float = 1.0, values=None):
    """Max subtraction (`_row_max`), the set's exp (`exp_nonpositive` in the `cipherdm` set), one reciprocal per
    row (over [1, row length]), in the form that spends the least time on REFERENCE_NETWORK for the call's size
    (`tournament_levels`, `fold_exps_pays`); with ``values``, the division by the row sums after the product with
    them (`softmax_in_form`)."""
    return softmax_for_call_size(x.size)(x, axis, exp_impl, scale, values)


softmax.for_call_size = softmax_for_call_size  # see cipherdm_spu.registry: a cost model prices large calls by it


@register_kernel("softmax", f"{NAME}-lan")
def softmax_lan(x, axis: int, exp_impl: str, scale: float = 1.0, values=None):
    """As `softmax`, in the form that its cost model says spends the least time on LAN_NETWORK (the benchmark's LAN)
    instead: there a send action costs a hundredth of the WAN's, so the tournament takes narrower groups in more levels
    (fewer comparisons, their compute and bytes, for more send actions) and all but the smallest calls divide apart.
    A user's choice where bytes or compute, not rounds, are scarce (`--override softmax=cipherdm-lan`);
    docs/results/lan-softmax/benchmark.md measures it beside `cipherdm` on the benchmark's steps."""
    return softmax_for_call_size(x.size, LAN_NETWORK)(x, axis, exp_impl, scale, values)


softmax_lan.for_call_size = functools.partial(softmax_for_call_size, network=LAN_NETWORK)


@register_kernel("softmax", f"{NAME}-low-byte")
def softmax_low_byte(x, axis: int, exp_impl: str, scale: float = 1.0, values=None):
    """As `softmax` with a pairwise tournament for the max (a third fewer comparisons than threes) and a separate
    product by the reciprocal: fewer bytes, more rounds."""
    return softmax_in_form(x, axis, exp_impl, (2,), fold_exps=False, scale=scale, values=values)
