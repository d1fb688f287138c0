"""Down, mid and up blocks of the diffusers UNets, channels-last.

One class per role; the attention between ResNet layers (none, spatial self-attention as in
AttnDownBlock2D, or the cross-attention transformer as in CrossAttnDownBlock2D) is chosen by an
`AttentionSpec`, so DownBlock2D / AttnDownBlock2D / CrossAttnDownBlock2D share one implementation with
diffusers' parameter names (resnets.i, attentions.i, downsamplers.0, upsamplers.0).

Every block takes its ResNets' time terms ready-made (`time_terms` computes them from a time embedding),
so the time path can run outside the secure computation.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from .attention import SpatialSelfAttention, Transformer2D
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What attention follows each ResNet of a block.

    kind "self": UNet2DModel's spatial attention (``dim_head`` per head, optional ``norm_groups``);
    kind "cross": the transformer with ``heads`` heads, ``layers`` blocks and a linear or 1x1-conv projection.
    """

    kind: str
    dim_head: int | None = None
    heads: int | None = None
    norm_groups: int | None = None
    eps: float = 1e-5
    rescale_output_factor: float = 1.0
    layers: int = 1
    linear_projection: bool = False

    def build(self, channels: int):
        if self.kind == "self":
            return SpatialSelfAttention(
                heads=channels // self.dim_head, dim_head=self.dim_head, out_dim=channels,
                norm_groups=self.norm_groups, eps=self.eps, rescale_output_factor=self.rescale_output_factor,
            )
        return Transformer2D(
            heads=self.heads, dim_head=channels // self.heads, channels=channels, num_layers=self.layers,
            norm_groups=self.norm_groups, use_linear_projection=self.linear_projection,
        )


@dataclasses.dataclass(frozen=True)
class ResnetSpec:
    """The ResNet options a whole UNet shares."""

    groups: int
    eps: float
    act_fn: str
    time_scale_shift: bool = False
    skip_time_act: bool = False
    output_scale_factor: float = 1.0

    def build(self, out_channels: int, output_scale_factor: float | None = None):
        return ResnetBlock2D(
            out_channels=out_channels, groups=self.groups, eps=self.eps, act_fn=self.act_fn,
            time_scale_shift=self.time_scale_shift, skip_time_act=self.skip_time_act,
            output_scale_factor=self.output_scale_factor if output_scale_factor is None else output_scale_factor,
        )


def _attend(attn, x, context):
    return attn(x, context) if isinstance(attn, Transformer2D) else attn(x)


class _TimeTerms:
    """Mixin: the blocks' ResNet time terms from a time embedding."""

    def time_terms(self, emb):
        return [resnet.project_time(emb) for resnet in self.resnets]


class DownBlock(_TimeTerms, nn.Module):
    """``num_layers`` x (ResNet [+ attention]) then an optional stride-2 downsampler; returns the skips."""

    out_channels: int
    num_layers: int
    resnet: ResnetSpec
    attention: AttentionSpec | None = None
    add_downsample: bool = True
    downsample_padding: int = 1

    def setup(self):
        self.resnets = [self.resnet.build(self.out_channels) for _ in range(self.num_layers)]
        if self.attention is not None:
            self.attentions = [self.attention.build(self.out_channels) for _ in range(self.num_layers)]
        if self.add_downsample:
            self.downsamplers_0 = Downsample2D(self.out_channels, self.downsample_padding)

    def __call__(self, x, time_terms, context=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, time_terms[i])
            if self.attention is not None:
                x = _attend(self.attentions[i], x, context)
            skips.append(x)
        if self.add_downsample:
            x = self.downsamplers_0(x)
            skips.append(x)
        return x, skips


class MidBlock(_TimeTerms, nn.Module):
    """ResNet, then ``num_layers`` x (attention, ResNet); attention may be absent (add_attention=False)."""

    channels: int
    resnet: ResnetSpec
    attention: AttentionSpec | None
    num_layers: int = 1
    output_scale_factor: float = 1.0

    def setup(self):
        self.resnets = [self.resnet.build(self.channels, self.output_scale_factor) for _ in range(self.num_layers + 1)]
        if self.attention is not None:
            self.attentions = [self.attention.build(self.channels) for _ in range(self.num_layers)]

    def __call__(self, x, time_terms, context=None):
        x = self.resnets[0](x, time_terms[0])
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attention is not None:
                x = _attend(self.attentions[i], x, context)
            x = resnet(x, time_terms[i + 1])
        return x


class UpBlock(_TimeTerms, nn.Module):
    """``num_layers`` x (concat a skip, ResNet [+ attention]) then an optional 2x upsampler."""

    out_channels: int
    num_layers: int
    resnet: ResnetSpec
    attention: AttentionSpec | None = None
    add_upsample: bool = True

    def setup(self):
        self.resnets = [self.resnet.build(self.out_channels) for _ in range(self.num_layers)]
        if self.attention is not None:
            self.attentions = [self.attention.build(self.out_channels) for _ in range(self.num_layers)]
        if self.add_upsample:
            self.upsamplers_0 = Upsample2D(self.out_channels)

    def __call__(self, x, skips, time_terms, context=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), time_terms[i])
            if self.attention is not None:
                x = _attend(self.attentions[i], x, context)
        if self.add_upsample:
            x = self.upsamplers_0(x)
        return x
