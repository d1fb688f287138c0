"""Our secure kernels: the `cipherdm` protocol set.

One step away: their coefficients (`coefficients`, written by scripts/fit_kernels.py), the float64 functions
they approximate (`reference`), their measured bytes, send actions and errors (docs/results/kernels.md,
`python scripts/benchmark_kernels.py`) and what SPU's building blocks cost under ABY3/FM64
(docs/results/primitives.md, `python scripts/primitive_costs.py`). The designs rest on how those blocks
rank: a comparison (an MSB extraction) costs most, then converting its bit to arithmetic, then a select (its
own conversion and product); the product of an arithmetic bit and a value (`_bit_times`: an integer product,
one reshare, no truncation) costs least, below a secret product (reshare and truncation) and a public
product (a truncation).

Activations use f(x) = step(x) + R(min(|x|, T)):
  one comparison gives sign(x); one bit product gives relu(x) and, for free, |x| = 2 relu(x) - x;
  a second comparison clamps |x| to T *before* any power is taken, so no intermediate can wrap the
  ring for any input; R is fitted by minimax over the whole real line including the clamped tail
  (scripts/fit_kernels.py).
  SiLU and Mish (the UNets' activations, where bytes decide), fitted error <= 9.5e-3. SiLU: R is a quartic
  with 2 truncations ("half-square": u = c * a rounded to 9 fraction bits, so (u + beta0) * u is an
  integer product, and the linear term rides in the last product's truncation). Mish: a times a quartic
  in Knuth's adapted form, its two quartics (x > 0, x <= 0) one, with coefficients picked by the sign
  bit (`_pick`: local, on the ring encodings).
  GeLU and sigmoid (to beat SPU's Pade-based kernels on error): R is a degree-13 polynomial (sigmoid:
  two pieces, degrees 9 and 7, split by one more comparison in the same batch, one Horner chain with
  picked coefficients) evaluated by Horner with a scaled accumulator; the fit errs < 2e-6 in float64, so
  what remains under MPC is mostly the input's own 2^-18 encoding.
SoftMax subtracts the row max, takes exp by a clamped squaring scheme, and one reciprocal per row.
rsqrt normalises its input by powers of 4 read off the bits of its encoding (one conversion to boolean
shares and a prefix OR, instead of a comparison per power), then a cubic guess and one Newton step; its
variant `cipherdm-low-round` (an override) finds the power by comparisons: more bytes, fewer rounds.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cipherdm_spu import registry
from cipherdm_spu.registry import register_kernel

from .coefficients import ACTIVATIONS, HORNER_ACTIVATIONS, HORNER_SCALE, RECIPROCAL_GUESS, RSQRT_GUESS

NAME = "cipherdm"

# exp(x) for x <= 0 as p(z) ** (2**EXP_SQUARINGS), z = relu(1 + x / 2**EXP_SQUARINGS), where
# p(z) = (z^3 + 3z + 2) / 6 = 1 + y + y^2/2 + y^3/6 with y = z - 1: the 3rd-order Taylor base
# (relative error ~ x^4 / (24 * 32^3); a 2nd-order base erred 0.4 % at x = -3, enough to bias the
# denominator of a 1024-wide softmax row). Below x = -2**EXP_SQUARINGS the base is 1/3, so the result
# is 3**-32 (5e-16): the right limit, never a wrapped value.
EXP_SQUARINGS = 5
# rsqrt: inputs are normalised into [1, 4) by 4**j for j in this range (covers ~4e-6 .. 2.6e5).
RSQRT_EXPONENTS = np.arange(-9, 9)


# ----------------------------------------------------------------------------------------------
# building blocks


def _batched_bits(x, thresholds):
    """(len(thresholds), *x.shape) booleans x >= threshold_j, from one batched comparison."""
    t = jnp.asarray(thresholds, dtype=x.dtype).reshape((-1,) + (1,) * x.ndim)
    return x[None] - t >= 0


def _quartic(a, alpha):
    """alpha4 * ((y + a + alpha2) * y + alpha3), y = (a + alpha0) * a + alpha1: a quartic, 2 products."""
    a0, a1, a2, a3, a4 = alpha
    y = (a + a0) * a + a1
    return ((y + a + a2) * y + a3) * a4


_INT_OF_FLOAT = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}  # the integer type a float's bits are cast to


def _int_type(dtype):
    return _INT_OF_FLOAT[jnp.dtype(dtype).itemsize]


def _encoding(v):
    """v's bits as an integer of its width: under SPU its ring element (the fixed-point encoding), free."""
    return jax.lax.bitcast_convert_type(v, _int_type(v.dtype))


def _indicator(pred):
    """A comparison's result as an arithmetic 0/1 integer: SPU converts the bit once (B2A)
    and `_bit_times` then reuses it, where every `jnp.where` on the boolean would convert it again."""
    return jnp.where(pred, jnp.int32(1), jnp.int32(0))


def _bit_times(bit, v):
    """bit * v for a 0/1 integer bit: the product of ``bit`` and v's bits reinterpreted as an integer.

    Under SPU that is an integer product of ring elements (one reshare, no truncation, exact for any |v|),
    cheaper than a select's product (rows `relu` and `select_relu` of docs/results/primitives.md); in plain
    JAX it is exact too (v's own bits or +0.0), so the kernels still run, and can be checked, in float.
    """
    product = bit.astype(_int_type(v.dtype)) * _encoding(v)
    return jax.lax.bitcast_convert_type(product, v.dtype)


def _select(bit, when_one, when_zero):
    """where(bit, when_one, when_zero) for a 0/1 integer bit, as one `_bit_times`."""
    return when_zero + _bit_times(bit, when_one - when_zero)


def _pick(bit, when_one, when_zero, dtype):
    """Per element, the public constant ``when_one`` where the 0/1 integer bit is 1, else ``when_zero``:
    local, no communication (a select would convert the bit again and multiply).

    Under SPU (`registry.fixed_point_bits()` set while a session compiles) it is built on the ring: the
    encoding of when_zero plus the bit times the difference of encodings, both encoded as SPU encodes a
    public constant (c * 2**f truncated toward zero), assembled from 16-bit limbs so that no int constant
    overflows and XLA cannot fold two of them into one. In plain JAX, the same selection in float.
    """
    fraction_bits = registry.fixed_point_bits()
    if fraction_bits is None:
        return jnp.where(bit == 1, jnp.asarray(when_one, dtype), jnp.asarray(when_zero, dtype))
    as_int = _int_type(dtype)
    scale = 2.0**fraction_bits
    zero = int(np.trunc(when_zero * scale))
    diff = int(np.trunc(when_one * scale)) - zero
    if max(abs(zero), abs(zero + diff)) >= 1 << 62:
        raise ValueError(f"cannot encode {when_one} / {when_zero} with {fraction_bits} fraction bits in the ring")
    limit = 1 << (8 * jnp.dtype(as_int).itemsize - 1)
    limbs = []  # (diff limb, zero limb), least significant first; the last pair keeps the signs
    while not (-limit <= diff < limit and -limit <= zero < limit):
        diff, d = divmod(diff, 1 << 16)
        zero, z = divmod(zero, 1 << 16)
        limbs.append((d, z))
    limbs.append((diff, zero))
    ring = None
    for d, z in reversed(limbs):
        term = bit.astype(as_int) * as_int(d) + as_int(z)
        ring = term if ring is None else jnp.left_shift(ring, as_int(16)) + term
    return jax.lax.bitcast_convert_type(ring, dtype)


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
    sign), so one quartic is evaluated instead of two."""
    c = ACTIVATIONS[name]
    positive, relu, a = _relu_and_clamped_abs(x, c["T"])
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


def _relu_plus_half_square(x, name: str):
    """relu(x) + (z + gamma1) * z + s * a + gamma0, a = min(|x|, T), z = (u + beta0) * u, u = c * a rounded
    to ``bits`` = 9 fraction bits: z is an integer product at 18 bits (no truncation), so the quartic costs
    two truncations (u's and the last product's) where Knuth's form costs three. u's rounding is part of
    the fit (scripts/fit_kernels.py); the exact a carries R's linear term, so it moves R by < 4.4e-3."""
    c = ACTIVATIONS[name]
    _, relu, a = _relu_and_clamped_abs(x, c["T"])
    u = _rounded_integer(a, c["scale"])  # u * 2**bits
    z = _from_integer((u + c["beta0"]) * u, 2 * c["bits"], x.dtype)
    return relu + _product_plus_linear(z + c["gamma1"], z, a, c["linear"]) + c["gamma0"]


def _polynomial(m, coef):
    """sum_k coef[k] m^k by Horner (the first product is by a public constant)."""
    r = coef[-1]
    for c in coef[-2::-1]:
        r = r * m + c
    return r


def _horner_scaled(v, coef):
    """sum_k coef[k] v^k by Horner, the accumulator kept times HORNER_SCALE: each product's truncation
    error (one unit of 2^-18) weighs 1 / HORNER_SCALE in the result before later steps multiply it by
    |v|^k (scripts/fit_kernels.py checks that these add up to less than one unit)."""
    return _polynomial(v, [HORNER_SCALE * c for c in coef]) * (1.0 / HORNER_SCALE)


def _piecewise_horner(x, name: str):
    """step(x) + R(|x|) with R piecewise (one or two pieces); the bits |x| <= T and |x| <= split come
    from one batched comparison. With two pieces the split bit picks the centre and the coefficients, so
    one Horner chain (of the higher degree) serves both."""
    fit = HORNER_ACTIVATIONS[name]
    pieces = fit["pieces"]
    if len(pieces) > 2:
        raise NotImplementedError(f"{name}: more than two pieces")
    positive, relu, magnitude = _relu_and_abs(x)
    bounds = [pieces[-1]["hi"]] + [p["hi"] for p in pieces[:-1]]
    below = _batched_bits(-magnitude, [-b for b in bounds])  # |x| <= bound
    a = _select(_indicator(below[0]), magnitude, bounds[0])
    if len(pieces) == 1:
        r = _horner_scaled(a - pieces[0]["center"], pieces[0]["coef"])
    else:
        first, second = pieces
        in_first = _indicator(below[1])
        degree = max(len(first["coef"]), len(second["coef"]))
        coefs = [list(p["coef"]) + [0.0] * (degree - len(p["coef"])) for p in pieces]
        v = a - _pick(in_first, first["center"], second["center"], x.dtype)
        scaled = [_pick(in_first, HORNER_SCALE * c1, HORNER_SCALE * c2, x.dtype) for c1, c2 in zip(*coefs)]
        r = _polynomial(v, scaled) * (1.0 / HORNER_SCALE)
    if fit["step"] == "relu":
        return relu + r
    return r + _bit_times(positive, 1.0 - r - r)


# ----------------------------------------------------------------------------------------------
# kernels


@register_kernel("silu", NAME)
def silu(x):
    return _relu_plus_half_square(x, "silu")


@register_kernel("mish", NAME)
def mish(x):
    return _relu_plus_a_quartic(x, "mish")


@register_kernel("gelu", NAME)
def gelu(x, approximate: bool = False):
    """The exact (erf) GeLU, or its tanh form with ``approximate`` (they differ by up to 5e-4)."""
    return _piecewise_horner(x, "gelu_tanh" if approximate else "gelu")


@register_kernel("sigmoid", NAME)
def sigmoid(x):
    return _piecewise_horner(x, "sigmoid")


@register_kernel("exp", NAME)
def exp_nonpositive(x):
    """e^x for x <= 0 (softmax's domain after max subtraction); saturates to 5e-16 below -32.

    For x > 0 it is the same Taylor scheme (relative error < 1e-2 up to x = 4) and wraps the ring
    beyond x ~ 17: callers must subtract a max first.
    """
    n = 2 ** EXP_SQUARINGS
    z = _relu(x * (1.0 / n) + 1.0)
    p = (z * (z * z + 3.0) + 2.0) * (1.0 / 6.0)
    for _ in range(EXP_SQUARINGS):
        p = p * p
    return p


def _octave_bits(x, bases, *, by_comparison: bool = False):
    """Bits x >= bases[j] for j >= 1, x > 0, for bases that are powers of two (below bases[1], all are 0).

    Under SPU, from x's encoding E = x * 2**f: x >= 2**k iff E has a bit at or above k + f. One conversion
    of E to boolean shares (a shift), a prefix OR (six ORs of whole words: 6 ANDs) and local shifts give
    every threshold's bit at once, where a batched comparison pays one MSB extraction per threshold (rsqrt's
    17) but takes fewer send actions: ``by_comparison`` chooses that, for callers where rounds matter more
    than bytes. The bits stay boolean: `_scale` converts them once. In plain JAX, the comparisons themselves.
    """
    fraction_bits = registry.fixed_point_bits()
    if by_comparison or fraction_bits is None:
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


def _rsqrt(x, by_comparison: bool):
    js = RSQRT_EXPONENTS
    bits = _octave_bits(x, 4.0 ** js, by_comparison=by_comparison)
    to_half_m, to_result = _scale(bits, x.dtype, 0.5 * 4.0 ** -js, 2.0 ** -js)  # 0.5 in the table: no product
    half_m = x * to_half_m
    m = half_m + half_m  # in [1, 4) for 4**js[0] <= x < 4**(js[-1] + 1)
    r = _polynomial(m, RSQRT_GUESS)
    r = r * (1.5 - half_m * (r * r))
    return r * to_result


@register_kernel("rsqrt", NAME)
def rsqrt(x):
    """1/sqrt(x) for x > 0: normalise (by the encoding's bits), guess, one Newton step. Fewer bytes and send
    actions than SPU's rsqrt (docs/results/kernels.md)."""
    return _rsqrt(x, by_comparison=False)


@register_kernel("rsqrt", f"{NAME}-low-round")
def rsqrt_low_round(x):
    """The same with its octave found by one batched comparison: about twice the bytes, fewer send actions
    (docs/results/kernels.md, row `rsqrt=cipherdm-low-round`). The norms call
    rsqrt once per group, where its bytes are a rounding error of a step's and its rounds add to every
    norm's latency: choose it where the network's round trips dominate,
    ``SecureSession("cipherdm", overrides={"rsqrt": "cipherdm-low-round"})``."""
    return _rsqrt(x, by_comparison=True)


def reciprocal_in_range(x, lo: float, hi: float):
    """1/x for x in [lo, hi] (lo > 0): normalise by powers of 2 found in one batched comparison, guess, two
    Newton steps.

    Used for softmax denominators, which lie in [1, row length]: one per row, so its bytes spread over the
    row and its rounds do not (hence comparisons rather than the encoding's bits, see `_octave_bits`);
    outside [lo, hi] it degrades smoothly (Newton from a poor guess) but never wraps.
    """
    js = np.arange(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)
    (scale,) = _scale(_octave_bits(x, 2.0 ** js, by_comparison=True), x.dtype, 2.0 ** -js)
    m = x * scale  # in [1, 2)
    r = _polynomial(m, RECIPROCAL_GUESS)
    r = r * (2.0 - m * r)
    r = r * (2.0 - m * r)
    return r * scale


@register_kernel("softmax", NAME)
def softmax(x, axis: int, exp_impl: str):
    """Max subtraction, the set's exp (`exp_nonpositive` in the `cipherdm` set), one reciprocal per row
    (over [1, row length])."""
    shifted = x - jnp.max(x, axis=axis, keepdims=True)
    e = registry.kernel("exp", exp_impl)(shifted)
    total = jnp.sum(e, axis=axis, keepdims=True)  # in [1, n]: the max entry contributes exactly 1
    return e * reciprocal_in_range(total, 1.0, float(x.shape[axis]))
