"""GroupNorm and LayerNorm modules (torch's parameter names) on `protocols.norms`, whose rsqrt is registered."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from protocols import norms


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm with affine parameters, over channels-last input."""

    num_groups: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return norms.group_norm(x, self.num_groups, scale, bias, self.eps)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, with affine parameters."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return norms.layer_norm(x, scale, bias, self.eps)
