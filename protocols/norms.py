"""GroupNorm and LayerNorm on the registered rsqrt, for the model ports.

Both use a two-pass variance, mean((x - mean)^2): Flax's E[x^2] - E[x]^2 cancels catastrophically
in fixed point. The only nonlinear call is `ops.rsqrt`, on one value per (sample, group).

Deviations are scaled by DEVIATION_SCALE before squaring, so the variance is held with
DEVIATION_SCALE**2 more fixed-point resolution (a variance of 1e-4 is ~26 units of 2**-18 otherwise);
the scale is exact (a power of two); the squares stay inside the ring for deviations up to ~2800.
"""

from __future__ import annotations

import jax.numpy as jnp

from cipherdm_spu import ops


DEVIATION_SCALE = 4.0


def _normalise(x, axes, eps):
    mean = jnp.mean(x, axis=axes, keepdims=True)
    scaled = (x - mean) * DEVIATION_SCALE
    var = jnp.mean(scaled * scaled, axis=axes, keepdims=True)  # DEVIATION_SCALE**2 * variance
    return scaled * ops.rsqrt(var + eps * DEVIATION_SCALE**2)


def group_norm(x, num_groups: int, scale=None, bias=None, eps: float = 1e-5):
    """GroupNorm over a channels-last array (N, ..., C), as torch.nn.GroupNorm computes it."""
    n, c = x.shape[0], x.shape[-1]
    if c % num_groups:
        raise ValueError(f"{c} channels cannot be split into {num_groups} groups")
    grouped = x.reshape(n, -1, num_groups, c // num_groups)
    y = _normalise(grouped, axes=(1, 3), eps=eps).reshape(x.shape)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def layer_norm(x, scale=None, bias=None, eps: float = 1e-5):
    """LayerNorm over the last axis."""
    y = _normalise(x, axes=(-1,), eps=eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y
