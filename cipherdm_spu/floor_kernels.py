"""Floor kernels: for each nonlinear op, only the SPU building blocks that every kernel of our designs needs, with the
fewest comparisons, without the arithmetic that would make them correct. Not kernels to compute with:
a protocol set of them (`kernel_floor`) measures, at a model's own calls and in the same run as the real sets, what
no kernel built from these blocks can beat (scripts/benchmark.py's step rows; scripts/rounds_budget.py counts the
rounds floor from the blocks' costs alone).

What each takes, per element of its input (why each block is needed: docs/results/primitives.md):
- activations (SiLU, Mish, GeLU, sigmoid: a step plus a polynomial in a = min(|x|, T)): the sign and the window
  from one batched comparison (two MSB extractions; without the product our kernels spend to batch them), both
  bits converted once, one bit product (the step), one secret product (a curve needs a truncated product);
- exp (x <= 0): the clamp (a comparison, its conversion, a bit product) and three secret products: fewer cannot
  hold the softmax's accuracy contract (the best three-product design found fails it too, four hold it:
  docs/results/primitives.md);
- rsqrt (one value per norm group): the octave by one batched comparison (one threshold per factor of 4 of the
  range our kernels cover, 2**-18 .. 2**22), its bits turned into two factors locally, and two rounds of secret
  products (normalise, with ``times`` beside it; rescale) (`cipherdm-low-byte`'s rsqrt reads the octave off the
  encoding's bits instead: fewer bytes on its few elements, more rounds and ops);
- softmax: the row max by pairs (n - 1 comparisons a row: the fewest, in ceil(log2 n) levels of a comparison, a
  conversion and a bit product each), the exp floor, the row sum's reciprocal by the rsqrt floor, one product by it
  (with attention's values, of the values' weighted sum: `cipherdm_spu.ops.softmax`).
  The fewest comparisons and bytes, not the fewest rounds (one level of all pairs: docs/results/rounds.md), nor
  always the fewest seconds (on wide rows a tournament in wider groups has fewer levels, each a few dozen ops).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from . import registry
from .linalg import batched_matmul
from .ring import bit_times, indicator, int_type

NAME = "kernel-floor"
WINDOW = 5.75  # any threshold: the floor's arithmetic is not the function's
CLAMP = -18.0
OCTAVE_THRESHOLDS = 4.0 ** np.arange(-9, 11)  # one per factor of 4 of 2**-18 .. 2**22


def _activation(x, *_, **__):
    both = indicator(jnp.stack([x, x - WINDOW]) > 0)  # one batched comparison, one conversion
    step = bit_times(both[0], x)
    return step * step + both[1].astype(x.dtype)  # one secret product; the window bit added (local)


def _local_factors(bits, dtype):
    """Two per-element factors from 0/1 integer bits (stacked on axis 0) by a product with a public integer matrix:
    local under SPU, as our kernels' tables are. Their values are arbitrary (small integers' encodings)."""
    table = jnp.asarray(np.tile([[1], [2]], (1, bits.shape[0])), int_type(dtype))
    ints = jnp.tensordot(table, bits.astype(int_type(dtype)), axes=1) + 1
    return jax.lax.bitcast_convert_type(ints, dtype) if registry.fixed_point_bits() else ints.astype(dtype)


def _rsqrt(x, times=None, *, scale: float = 1.0):
    del scale  # a public factor our kernels fold into their coefficients: no block of its own
    bits = indicator(x[None] - jnp.asarray(OCTAVE_THRESHOLDS, x.dtype).reshape((-1,) + (1,) * x.ndim) >= 0)
    normalise, rescale = _local_factors(bits, x.dtype)
    if times is None:
        return (x * normalise) * rescale
    shape = jnp.broadcast_shapes(x.shape, times.shape)
    both = jnp.stack([jnp.broadcast_to(x, shape), jnp.broadcast_to(rescale, shape)]) * \
        jnp.stack([jnp.broadcast_to(normalise, shape), jnp.broadcast_to(times, shape)])  # one round
    return both[0] * both[1]


def _exp(x, scale: float = 1.0):
    del scale  # folded into the polynomial's first product by our kernels
    inside = indicator(x - CLAMP > 0)
    t = CLAMP + bit_times(inside, x - CLAMP)
    t = t * t
    t = t * t
    return t * t  # three secret products


def _row_max_by_pairs(a):
    """max over the last axis by pairs (kept as size 1): n - 1 comparisons a row."""
    while a.shape[-1] > 1:
        if a.shape[-1] % 2:
            a = jnp.concatenate([a, a[..., -1:]], axis=-1)
        pairs = a.reshape(a.shape[:-1] + (a.shape[-1] // 2, 2))  # slices, where a strided slice compiles to a gather
        first, second = pairs[..., 0], pairs[..., 1]
        a = second + bit_times(indicator(first - second >= 0), first - second)
    return a


def _softmax(x, axis: int, exp_impl: str, scale: float = 1.0, values=None):
    del exp_impl
    if values is not None and axis % x.ndim != x.ndim - 1:
        raise ValueError(f"a softmax weighs values by rows on the last axis, not axis {axis} of rank {x.ndim}")
    rows = jnp.moveaxis(x, axis, -1)
    e = jnp.moveaxis(_exp(rows - _row_max_by_pairs(rows), scale), -1, axis)
    divided = e if values is None else batched_matmul(e, values)  # with values, divided after the product (ours too)
    return divided * _rsqrt(jnp.sum(e, axis=axis, keepdims=True))


_KERNELS = {"silu": _activation, "mish": _activation, "gelu": _activation, "sigmoid": _activation,
            "softmax": _softmax, "exp": _exp, "rsqrt": _rsqrt}
for _op in registry.OPS:
    registry.register_kernel(_op, NAME, _KERNELS[_op])


def kernel_floor(base: str = registry.BASELINE) -> registry.ProtocolSet:
    """``base`` with every kernel replaced by its floor (a lower bound to measure, not a model)."""
    pset = registry.resolve(base, {op: NAME for op in registry.OPS})
    return dataclasses.replace(pset, name=NAME, description="every kernel replaced by the blocks it needs")
