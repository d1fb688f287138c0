"""Flax port of diffusers' ``UNet2DConditionModel`` (the Stable Diffusion denoiser), NCHW in and out.

As in `models.unet_2d`, the time path can be precomputed by the model owner: pass
``time_terms=model.apply(params, t, method=model.time_terms)`` instead of the timestep.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .activations import get_activation
from .config import UNet2DConditionConfig
from .embeddings import TimestepEmbedding, broadcast_timesteps, one_timestep, select_time_terms, timestep_embedding
from .normalization import GroupNorm
from .pretrained import PretrainedMixin
from .resnet import conv
from .unet_2d import UNetTimePath, check_sample
from .unet_blocks import AttentionSpec, DownBlock, MidBlock, ResnetSpec, UpBlock


def conditioned_time_terms(model, sample, encoder_hidden_states, cross_dim: int, timestep, time_terms):
    """Check a text-conditioned network's sample (NCHW) and encoder_hidden_states (N, tokens, cross_dim), and return
    its time terms: computed from ``timestep``, or selected from ``time_terms`` precomputed by ``time_terms()``.
    Shared by the UNet and the ControlNet, whose inputs are the same."""
    c = model.config
    check_sample(sample, c.in_channels, len(c.block_out_channels))
    if encoder_hidden_states is None or encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cross_dim:
        raise ValueError(f"encoder_hidden_states must have shape (N, tokens, {cross_dim})")
    n = sample.shape[0]
    if time_terms is not None:
        return select_time_terms(time_terms, None, n)
    if timestep is None:
        raise ValueError("pass a timestep, or time_terms precomputed by time_terms()")
    return model._time_terms_from_embedding(model._embed(broadcast_timesteps(timestep, n)))


class UNet2DConditionModel(PretrainedMixin, UNetTimePath, nn.Module):
    """diffusers UNet2DConditionModel: ``model, params = UNet2DConditionModel.from_pretrained(directory)``."""

    config: UNet2DConditionConfig
    CONFIG_CLASS = UNet2DConditionConfig

    def setup(self):
        c = self.config
        channels, n = c.block_out_channels, len(c.block_out_channels)
        heads, layers = c.per_block("num_attention_heads"), c.per_block("layers_per_block")
        depth = c.per_block("transformer_layers_per_block")
        self.conv_in = conv(channels[0], kernel=c.conv_in_kernel)
        self.time_embedding = TimestepEmbedding(c.time_embed_dim, c.act_fn)
        resnet = ResnetSpec(c.norm_num_groups, c.norm_eps, c.act_fn, c.resnet_time_scale_shift == "scale_shift",
                            skip_time_act=c.resnet_skip_time_act)

        def cross(i):
            return AttentionSpec("cross", heads=heads[i], norm_groups=c.norm_num_groups, layers=depth[i],
                                 linear_projection=c.use_linear_projection)

        self.down_blocks = [
            DownBlock(channels[i], layers[i], resnet, cross(i) if kind == "CrossAttnDownBlock2D" else None,
                      add_downsample=i < n - 1, downsample_padding=c.downsample_padding)
            for i, kind in enumerate(c.down_block_types)
        ]
        self.mid_block = None
        if c.mid_block_type is not None:
            self.mid_block = MidBlock(channels[-1], resnet, cross(n - 1), output_scale_factor=c.mid_block_scale_factor)
        self.up_blocks = [
            UpBlock(channels[n - 1 - i], layers[n - 1 - i] + 1, resnet,
                    cross(n - 1 - i) if kind == "CrossAttnUpBlock2D" else None, add_upsample=i < n - 1)
            for i, kind in enumerate(c.up_block_types)
        ]
        self.conv_norm_out = GroupNorm(c.norm_num_groups, c.norm_eps)
        self.conv_act = get_activation(c.act_fn)
        self.conv_out = conv(c.out_channels, kernel=c.conv_out_kernel)

    def example_inputs(self):
        c = self.config
        size = 2 ** (len(c.block_out_channels) - 1)
        context = jnp.zeros((1, 1, c.per_block("cross_attention_dim")[0]), jnp.float32)
        return jnp.zeros((1, c.in_channels, size, size), jnp.float32), jnp.zeros((1,), jnp.int32), context

    def _embed(self, timesteps):
        c = self.config
        return self.time_embedding(timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift))

    def time_terms(self, timestep):
        """The owner's plaintext tables for one public timestep: per ResNet, (1, channels)."""
        return self._time_terms_from_embedding(self._embed(one_timestep(timestep)))

    def __call__(self, sample, timestep=None, encoder_hidden_states=None, time_terms=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None):
        """The noise prediction (N, C, H, W); the optional residuals are a ControlNet's outputs (NCHW, diffusers' names)."""
        c = self.config
        terms = conditioned_time_terms(self, sample, encoder_hidden_states, c.per_block("cross_attention_dim")[0],
                                       timestep, time_terms)
        x = sample.transpose(0, 2, 3, 1)
        if c.center_input_sample:
            x = 2 * x - 1.0
        down = None if down_block_additional_residuals is None else [
            r.transpose(0, 2, 3, 1) for r in down_block_additional_residuals]
        mid = None if mid_block_additional_residual is None else mid_block_additional_residual.transpose(0, 2, 3, 1)
        return self._unet(x, terms, encoder_hidden_states, down, mid).transpose(0, 3, 1, 2)
