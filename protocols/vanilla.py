"""The vanilla kernels (name ``jax``, the `spu` and `spu-pade` sets): each op as plain ``jax.nn`` / ``lax``.

Under SPU these compile to SPU's own kernels (its exp mode, its division and rsqrt), so they are the
baseline every measurement is compared against; with no protocol set in force they are what the ops run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cipherdm_spu.registry import VANILLA, kernel, register_kernel


def _exp(x, scale: float = 1.0):
    """e^(scale x): SPU's exp after a public product (none for scale 1)."""
    return jnp.exp(x * scale if scale != 1.0 else x)


def _mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


def _softmax(x, axis: int, exp_impl: str, scale: float = 1.0):
    """jax.nn.softmax's arithmetic (max with initial -inf, exp of the scaled shift, division by the row sum) with
    the protocol set's exp."""
    shifted = x - jnp.max(x, axis, initial=-jnp.inf, keepdims=True)
    e = kernel("exp", exp_impl)(shifted, scale=scale)
    return e / jnp.sum(e, axis, keepdims=True)


def _rsqrt(x, times=None, *, scale: float = 1.0):
    """times / sqrt(scale * x) as plain arithmetic: SPU's rsqrt, a constant product and a product."""
    r = lax.rsqrt(x * scale if scale != 1.0 else x)
    return r if times is None else r * times


for _op, _fn in {
    "silu": jax.nn.silu,
    "mish": _mish,
    "gelu": lambda x, approximate: jax.nn.gelu(x, approximate=approximate),
    "sigmoid": jax.nn.sigmoid,
    "softmax": _softmax,
    "exp": _exp,
    "rsqrt": _rsqrt,
}.items():
    register_kernel(_op, VANILLA, _fn)
