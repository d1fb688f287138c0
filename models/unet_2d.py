"""Flax port of diffusers' ``UNet2DModel`` (the DDPM/DDIM denoiser), NCHW in and out like diffusers.

Two ways to condition on time:
- ``model.apply(params, sample, timestep, class_labels=...)`` computes the time path itself, as diffusers;
- ``model.apply(params, sample, class_labels=one_hot, time_terms=terms)`` takes the ResNets' time terms
  ready-made, where ``terms = model.apply(params, t, method=model.time_terms)`` is computed by the model
  owner in plaintext for the public timestep (one row per class for class-conditional models). Under
  MPC this leaves no activation of the time path in the secure computation.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cipherdm_spu import ops

from .config import UNet2DConfig
from .embeddings import (TimestepEmbedding, broadcast_timesteps, one_hot_labels, one_timestep, select_time_terms,
                         timestep_embedding)
from .normalization import GroupNorm
from .pretrained import PretrainedMixin
from .resnet import conv
from .unet_blocks import AttentionSpec, DownBlock, MidBlock, ResnetSpec, UpBlock


def check_sample(sample, in_channels: int, levels: int):
    """Refuse inputs the UNet cannot take: wrong rank/channels, or sizes the down/up path cannot return to."""
    if sample.ndim != 4 or sample.shape[1] != in_channels:
        raise ValueError(f"sample must have shape (N, {in_channels}, H, W), got {tuple(sample.shape)}")
    factor = 2 ** (levels - 1)
    if sample.shape[2] % factor or sample.shape[3] % factor:
        raise ValueError(f"sample height and width must be multiples of {factor}, got {tuple(sample.shape[2:])}")


class UNetTimePath:
    """Mixin: the ResNet time terms of every block, from a time embedding, in block order."""

    def _time_terms_from_embedding(self, emb):
        return {
            "down": [block.time_terms(emb) for block in self.down_blocks],
            "mid": self.mid_block.time_terms(emb) if self.mid_block is not None else [],
            "up": [block.time_terms(emb) for block in self.up_blocks],
        }

    def _unet(self, x, terms, context=None, down_residuals=None, mid_residual=None):
        """The network on channels-last input; a ControlNet's residuals (channels-last) are added to the skips
        and to the mid block's output, as diffusers adds its additional residuals."""
        x = self.conv_in(x)
        skips = [x]
        for block, t in zip(self.down_blocks, terms["down"]):
            x, block_skips = block(x, t, context)
            skips += block_skips
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down residuals for the UNet's {len(skips)} skip connections")
            skips = [s + r for s, r in zip(skips, down_residuals)]
        if self.mid_block is not None:
            x = self.mid_block(x, terms["mid"], context)
        if mid_residual is not None:
            x = x + mid_residual
        for block, t in zip(self.up_blocks, terms["up"]):
            k = block.num_layers
            x = block(x, skips[-k:], t, context)
            skips = skips[:-k]
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class UNet2DModel(PretrainedMixin, UNetTimePath, nn.Module):
    """diffusers UNet2DModel: ``model, params = UNet2DModel.from_pretrained(directory)``."""

    config: UNet2DConfig
    CONFIG_CLASS = UNet2DConfig

    def setup(self):
        c = self.config
        channels, n = c.block_out_channels, len(c.block_out_channels)
        self.conv_in = conv(channels[0])
        self.time_embedding = TimestepEmbedding(c.time_embed_dim)
        if c.num_class_embeds:
            # N(0, 1) like torch's nn.Embedding (diffusers' init): flax's default (std 1/sqrt(dim)) starts
            # the class signal ~10x weaker than the time embedding's, and training then learns to ignore it.
            self.class_embedding = nn.Embed(
                c.num_class_embeds, c.time_embed_dim, embedding_init=nn.initializers.normal(stddev=1.0)
            )
        resnet = ResnetSpec(c.norm_num_groups, c.norm_eps, c.act_fn, c.resnet_time_scale_shift == "scale_shift")

        def attention(ch, groups=c.norm_num_groups, rescale=1.0):
            return AttentionSpec("self", dim_head=c.attention_head_dim or ch, norm_groups=groups, eps=c.norm_eps,
                                 rescale_output_factor=rescale)

        self.down_blocks = [
            DownBlock(channels[i], c.layers_per_block, resnet, attention(channels[i]) if kind == "AttnDownBlock2D" else None,
                      add_downsample=i < n - 1, downsample_padding=c.downsample_padding)
            for i, kind in enumerate(c.down_block_types)
        ]
        self.mid_block = None
        if c.mid_block_type is not None:
            groups = c.attn_norm_num_groups or (c.norm_num_groups if c.resnet_time_scale_shift == "default" else None)
            mid_attention = attention(channels[-1], groups, c.mid_block_scale_factor) if c.add_attention else None
            self.mid_block = MidBlock(channels[-1], resnet, mid_attention, output_scale_factor=c.mid_block_scale_factor)
        up_channels = channels[::-1]
        self.up_blocks = [
            UpBlock(up_channels[i], c.layers_per_block + 1, resnet, attention(up_channels[i]) if kind == "AttnUpBlock2D" else None,
                    add_upsample=i < n - 1)
            for i, kind in enumerate(c.up_block_types)
        ]
        self.conv_norm_out = GroupNorm(c.norm_num_groups, c.norm_eps)
        self.conv_act = ops.silu  # diffusers' UNet2DModel uses SiLU here whatever act_fn says
        self.conv_out = conv(c.out_channels)

    def example_inputs(self):
        size = 2 ** (len(self.config.block_out_channels) - 1)
        sample = jnp.zeros((1, self.config.in_channels, size, size), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32) if self.config.num_class_embeds else None
        return sample, jnp.zeros((1,), jnp.int32), labels

    def _embed(self, timesteps, class_labels):
        c = self.config
        emb = self.time_embedding(timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift))
        if c.num_class_embeds:
            emb = emb + one_hot_labels(class_labels, c.num_class_embeds) @ self.class_embedding.embedding
        return emb

    def time_terms(self, timestep):
        """The owner's plaintext tables for one public timestep: per ResNet, (classes or 1, channels)."""
        t = one_timestep(timestep)
        classes = self.config.num_class_embeds
        emb = self._embed(t, None) if not classes else self._embed(jnp.repeat(t, classes), jnp.arange(classes))
        return self._time_terms_from_embedding(emb)

    def __call__(self, sample, timestep=None, class_labels=None, time_terms=None):
        c = self.config
        check_sample(sample, c.in_channels, len(c.block_out_channels))
        if c.num_class_embeds and class_labels is None:
            raise ValueError("this model is class-conditional: pass class_labels")
        if not c.num_class_embeds and class_labels is not None:
            raise ValueError("this model has no class embedding (num_class_embeds is not set)")
        n = sample.shape[0]
        if time_terms is None:
            if timestep is None:
                raise ValueError("pass a timestep, or time_terms precomputed by time_terms()")
            terms = self._time_terms_from_embedding(self._embed(broadcast_timesteps(timestep, n), class_labels))
        else:
            terms = select_time_terms(time_terms, class_labels, n)
        x = sample.transpose(0, 2, 3, 1)
        if c.center_input_sample:
            x = 2 * x - 1.0
        return self._unet(x, terms).transpose(0, 3, 1, 2)
