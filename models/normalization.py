"""GroupNorm and LayerNorm: their fixed-point arithmetic (`group_norm`, `layer_norm`) and the Flax modules with
torch's parameter names. The same arithmetic in every protocol set; only its rsqrt is a registered kernel.

Both use a two-pass variance, mean((x - mean)^2): Flax's E[x^2] - E[x]^2 cancels catastrophically
in fixed point. The only nonlinear call is `ops.rsqrt`, on one value per (sample, group).

Under MPC a norm costs its secret products, each a reshare and a truncation per output element, so
GroupNorm keeps them few:
- the squares are integer products of the deviations' encodings (a reshare, no truncation), summed exactly in
  the ring and truncated once per channel and chunk of pixels (`_scaled_channel_sums_of_squares`): the send
  actions and precision of a Gram diagonal D^T D, without its matmul, whose long contraction over the pixels
  SPU computes slowly (docs/results/benchmark.md: the step's seconds by SPU op);
- the variance is held as VARIANCE_SCALE * variance, so a variance of 1e-4 keeps 200-400 units of
  2**-18 rather than ~26;
- means divide by the count precisely and inside the ring (`_mean_of_sums`); the variance's division
  is left to `ops.rsqrt`'s public ``scale`` (`_sum_for_mean`), which our kernel folds into its coefficients;
- where the rsqrt kernel in force asks for it (``centres_norms_in_one_truncation``, the registry's docstring), the
  deviations themselves take one truncation instead of the mean's two in a row (`_scaled_deviations`): a round
  fewer per norm and no error from the mean, for a truncation per element of the input;
- GroupNorm's affine scale goes to `ops.rsqrt` as its ``times``, so the per-(sample, group) factor already
  carries it (our kernel multiplies it in a round it spends anyway) before it meets the activations, which
  leaves one secret product per element besides the square: the (exactly doubled) deviation times that
  factor. LayerNorm's factor is per row, its scale per channel: there the scale meets the deviation in the
  squares' product.

Range: a chunk's squares add up at twice the fraction bits, and VARIANCE_SCALE times that must stay inside the ring
(with the headroom SPU's truncation needs) before their one truncation: a chunk's mean square deviation from the
group mean up to about 2**18 (2.6e5), whatever the image size (`_scaled_channel_sums_of_squares`); LayerNorm's
squares are truncated one by one.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cipherdm_spu import ops, registry, ring

VARIANCE_SCALE = 16  # a power of four: its square root is applied as two doublings
PIXELS_PER_CHUNK = 8  # the squares' sums are truncated per chunk of this many pixels (their range)
MIN_UNITS = 4  # `_scaled_deviations` needs 1/count to round to at least this many units of 2**-f, so that lam is
# within 1/8 of 1 (the variance, scaled by lam**2, keeps its range); past a count of 2**(f-2) the mean is taken first


def _count_shift(count: int) -> int:
    """k with 2**k >= count: the exact power-of-two part of a division by count."""
    shift = math.ceil(math.log2(count))
    if shift > 18:
        raise ValueError(f"cannot average {count} values in fixed point with 18 fraction bits")
    return shift


def _mean_of_sums(sums, count: int):
    """sum(sums, axis=-1) / count for exact partial sums, keeping precision and range in fixed point.

    A public 1/count is itself a fixed-point number (1/6272 encodes 1.9 % low, 1/40960 6 % low), and
    two constant products in a row are folded into one by the compiler. So the sums are first scaled
    exactly, by 2**-k with 2**k >= count, then dotted with 2**k / count in [1, 2); the dot's result is the
    mean itself, so its products at twice the fraction bits stay inside the ring for means up to 2**27.
    Error: about 2**-18 from the scaled sums plus 2**-19 * |mean| from the constant."""
    shift = _count_shift(count)
    scaled = sums * 2.0**-shift if shift else sums
    return scaled @ jnp.full((sums.shape[-1],), 2.0**shift / count, sums.dtype)


def _sum_for_mean(sums, count: int):
    """(s, c) with s * c = sum(sums, axis=-1) / count for exact partial sums: s = their (exact) sum scaled by
    2**-k (2**k >= count; one truncation), c = 2**k / count in [1, 2) a public constant left to the caller's
    rsqrt (`ops.rsqrt`'s ``scale``), where a kernel can fold it into its coefficients for free. For squares
    summed at VARIANCE_SCALE, s is in [8, 16) * variance, kept to 2**-18: 2**-21 / variance relative. The
    sum's product with 2**-k at twice the fraction bits stays in the ring for s below 2**27."""
    shift = _count_shift(count)
    total = jnp.sum(sums, axis=-1)
    # (plain kernels multiply s by c after the caller's eps is added, which keeps the compiler from folding the
    # two constants into a 1/count that 18 fraction bits would round)
    return (total * 2.0**-shift if shift else total), 2.0**shift / count


def _scaled_deviations(x, axes: tuple, count: int):
    """(lam * (x - mean over ``axes``), lam) in one truncation, or None where it does not apply: where the rsqrt
    kernel in force does not ask for it (``centres_norms_in_one_truncation``), in plain JAX, or where 1/count keeps
    fewer than MIN_UNITS units of 2**-f.

    count * E - sum(E) over the axes is exact on the encodings E (an integer times each, their sum exact in the
    ring: local), and one public product by c = round(2**f / count) * 2**-f truncates it to lam * (x - mean) with
    lam = count * c, within count * 2**-(f+1) of 1. The caller's variance is then lam**2 times the deviations' (its
    eps takes lam**2 too), so the normalised output is the same function; the mean's error (2**-19 * |mean|,
    `_mean_of_sums`) is gone. Range: |x - mean| below about 2**25 (the product at twice the fraction bits) and
    count * |x - mean| below 2**45."""
    fraction_bits = registry.fixed_point_bits()
    kernel = registry.kernel("rsqrt", registry.active_impl("rsqrt"))
    if fraction_bits is None or not getattr(kernel, "centres_norms_in_one_truncation", False):
        return None
    units = round(2.0**fraction_bits / count)
    if units < MIN_UNITS:
        return None
    encoded = ring.encoding(x)
    spread = encoded * jnp.asarray(count, encoded.dtype) - jnp.sum(encoded, axis=axes, keepdims=True)
    c = units * 2.0**-fraction_bits
    return jax.lax.bitcast_convert_type(spread, x.dtype) * c, count * c


def _times_root_variance_scale(d):
    """d * sqrt(VARIANCE_SCALE) = 4 d, by two doublings (free and exact under MPC)."""
    d = d + d
    return d + d


def _scaled_channel_sums_of_squares(d):
    """VARIANCE_SCALE * sum over pixels of d*d per channel, for d shaped (N, pixels, C).

    Under SPU: the squares of d's encodings (an integer product, 2f fraction bits, exact), summed exactly over chunks
    of up to PIXELS_PER_CHUNK pixels, then one public product by VARIANCE_SCALE * 2**-f (a plain constant, >= 4 units)
    truncates every chunk's sum; the chunks' sums add up exactly. The send actions of a Gram diagonal (an integer
    product's and a truncation's) at an integer product's bytes per element (and a truncation's per chunk), without
    the Gram's matmul, whose long contraction over the pixels SPU computes slowly. A chunk's VARIANCE_SCALE * sum *
    2**(2f) must stay below about 2**61 (SPU's truncation needs the headroom): its mean square deviation below about
    2**18 (tests/test_norms.py measures where it holds)."""
    fraction_bits = registry.fixed_point_bits()
    if fraction_bits is None:
        return VARIANCE_SCALE * jnp.sum(d * d, axis=1)
    n, pixels, channels = d.shape
    chunks = -(-pixels // PIXELS_PER_CHUNK)
    encoded = ring.encoding(d)
    squares = jnp.pad(encoded * encoded, ((0, 0), (0, chunks * PIXELS_PER_CHUNK - pixels), (0, 0)))  # zeros: no square
    sums = jnp.sum(squares.reshape(n, chunks, PIXELS_PER_CHUNK, channels), axis=2)
    truncated = jax.lax.bitcast_convert_type(sums, d.dtype) * (VARIANCE_SCALE * 2.0**-fraction_bits)
    return jnp.sum(truncated, axis=1)


def group_norm(x, num_groups: int, scale=None, bias=None, eps: float = 1e-5):
    """GroupNorm over a channels-last array (N, ..., C), as torch.nn.GroupNorm computes it."""
    n, c = x.shape[0], x.shape[-1]
    if c % num_groups:
        raise ValueError(f"{c} channels cannot be split into {num_groups} groups")
    per_group = c // num_groups
    grouped = x.reshape(n, -1, num_groups, per_group)
    pixels = grouped.shape[1]
    count = pixels * per_group
    scaled = _scaled_deviations(grouped, (1, 3), count)
    if scaled is None:
        mean = _mean_of_sums(jnp.sum(grouped, axis=1), count)  # pixel sums are free and exact
        d, lam = grouped - mean[:, None, :, None], 1.0
    else:
        d, lam = scaled
    sums = _scaled_channel_sums_of_squares(d.reshape(n, pixels, c)).reshape(n, num_groups, per_group)
    total, per_count = _sum_for_mean(sums, count)
    affine = None if scale is None else jnp.reshape(scale, (num_groups, per_group))
    # (N, 1, G, C/G) with the affine scale, else (N, 1, G, 1): tiny
    factor = ops.rsqrt((total + VARIANCE_SCALE * eps * lam**2 / per_count)[:, None, :, None], affine, scale=per_count)
    y = (_times_root_variance_scale(d) * factor).reshape(x.shape)
    return y if bias is None else y + bias


def _partial_sums(x, width: int = 16):
    """Sums over consecutive runs of the last axis (free and exact), leaving an axis for the dot in `_mean_of_sums`."""
    c = x.shape[-1]
    run = max(r for r in range(1, min(c, width) + 1) if c % r == 0)
    return jnp.sum(x.reshape(*x.shape[:-1], c // run, run), axis=-1)


def layer_norm(x, scale=None, bias=None, eps: float = 1e-5):
    """LayerNorm over the last axis."""
    count = x.shape[-1]
    scaled = _scaled_deviations(x, (x.ndim - 1,), count)
    d, lam = (x - _mean_of_sums(_partial_sums(x), count)[..., None], 1.0) if scaled is None else scaled
    d = _times_root_variance_scale(d)
    if scale is None:
        squares, weighted = d * d, d
    else:  # the squares and the weighted deviation in one product: the weight costs no round of its own
        squares, weighted = jnp.stack([d, d]) * jnp.stack([d, jnp.broadcast_to(scale, d.shape)])
    total, per_count = _sum_for_mean(_partial_sums(squares), count)
    y = weighted * ops.rsqrt((total + VARIANCE_SCALE * eps * lam**2 / per_count)[..., None], scale=per_count)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------------------------
# the modules


def _affine(module: nn.Module, channels: int):
    """torch's affine norm parameters: weight (here ``scale``) = 1, bias = 0."""
    scale = module.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = module.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    return scale, bias


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm with affine parameters, over channels-last input."""

    num_groups: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        scale, bias = _affine(self, x.shape[-1])
        return group_norm(x, self.num_groups, scale, bias, self.eps)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, with affine parameters."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        scale, bias = _affine(self, x.shape[-1])
        return layer_norm(x, scale, bias, self.eps)
