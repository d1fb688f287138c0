"""GroupNorm and LayerNorm modules (torch's parameter names) on `protocols.norms`, whose rsqrt is registered."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cipherdm_spu.protocols import norms


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
        return norms.group_norm(x, self.num_groups, scale, bias, self.eps)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, with affine parameters."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        scale, bias = _affine(self, x.shape[-1])
        return norms.layer_norm(x, scale, bias, self.eps)
