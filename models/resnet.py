"""ResNet blocks and resamplers of the diffusers UNets, channels-last.

A ResNet block's time input is split out: `ResnetBlock2D.project_time` maps the time embedding to the
block's additive (or scale/shift) term, and `__call__` takes that term ready-made. The term depends only
on the public timestep and the owner's weights, so the owner can compute it in plaintext and share it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .activations import get_activation
from .normalization import GroupNorm


def conv(features: int, kernel: int = 3, stride: int = 1, padding: int | None = None, use_bias: bool = True):
    """A torch-style Conv2d (symmetric padding, default 'same' for odd kernels) on NHWC input."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=use_bias)


class ConvWeights(nn.Module):
    """The parameters of a `conv` (an ``nn.Conv``'s names, shapes and initialisers), returned instead of applied, so
    that convolutions summed into one output can share a matmul (`summed_convolutions`)."""

    features: int
    kernel: int = 3

    @nn.compact
    def __call__(self, in_features: int):
        shape = (self.kernel, self.kernel, in_features, self.features)
        kernel = self.param("kernel", nn.linear.default_kernel_init, shape, jnp.float32)
        return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)


def patches(x, size: int):
    """Every pixel's size x size neighbourhood (zero 'same' padding, odd size), as (N, H, W, size*size*C) ordered
    (row, column, channel): x's im2col, against which an HWIO kernel reshaped to (size*size*C, O) is a stride-1
    convolution."""
    if size % 2 == 0:
        raise ValueError(f"'same' patches need an odd size, not {size}")
    n, h, w, c = x.shape
    pad = (size - 1) // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return jnp.concatenate([padded[:, i:i + h, j:j + w, :] for i in range(size) for j in range(size)], axis=-1)


def summed_convolutions(terms):
    """sum_i (conv(x_i, K_i) + b_i) for stride-1 'same' convolutions onto one output, ``terms`` = [(x_i, K_i, b_i)],
    as ONE matmul of the inputs' concatenated patches against the stacked kernels: under MPC each matmul is a reshare
    and a truncation round, while patches and concatenations of secret values are local (diffusers' ResNet block adds
    its conv2 and its 1x1 shortcut so). A single term is the native convolution."""
    if len({x.shape[:3] for x, _, _ in terms}) != 1:
        raise ValueError(f"summed convolutions need inputs of one batch and size, not {[x.shape for x, _, _ in terms]}")
    if len(terms) == 1:
        (x, kernel, bias), = terms
        pad = (kernel.shape[0] - 1) // 2
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=dims) + bias
    n, h, w, _ = terms[0][0].shape
    columns = jnp.concatenate([patches(x, k.shape[0]).reshape(n * h * w, -1) for x, k, _ in terms], axis=-1)
    kernel = jnp.concatenate([k.reshape(-1, k.shape[-1]) for _, k, _ in terms], axis=0)
    bias = sum(b for _, _, b in terms)
    return (columns @ kernel + bias).reshape(n, h, w, -1)


class ResnetBlock2D(nn.Module):
    """norm1 -> act -> conv1 (+ time term) -> norm2 -> act -> conv2, plus the (1x1-projected) input; conv2 and the
    projection are one matmul (`summed_convolutions`)."""

    out_channels: int
    groups: int
    eps: float
    act_fn: str
    time_scale_shift: bool = False
    output_scale_factor: float = 1.0
    skip_time_act: bool = False
    has_time: bool = True

    def setup(self):
        self.norm1 = GroupNorm(self.groups, self.eps)
        self.conv1 = conv(self.out_channels)
        if self.has_time:
            self.time_emb_proj = nn.Dense(self.out_channels * (2 if self.time_scale_shift else 1))
        self.norm2 = GroupNorm(self.groups, self.eps)
        self.conv2 = ConvWeights(self.out_channels)
        self.conv_shortcut = ConvWeights(self.out_channels, kernel=1)
        self.act = get_activation(self.act_fn)

    def project_time(self, temb):
        """The block's time term from the time embedding: time_emb_proj(act(temb))."""
        return self.time_emb_proj(temb if self.skip_time_act else self.act(temb))

    def __call__(self, x, time_term):
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_scale_shift:
            scale, shift = jnp.split(time_term[:, None, None, :], 2, axis=-1)
            h = self.norm2(h) * (1.0 + scale) + shift
        else:
            if time_term is not None:
                h = h + time_term[:, None, None, :]
            h = self.norm2(h)
        h = self.act(h)
        terms = [(h, *self.conv2(h.shape[-1]))]
        if x.shape[-1] != self.out_channels:
            out = summed_convolutions(terms + [(x, *self.conv_shortcut(x.shape[-1]))])
        else:
            out = summed_convolutions(terms) + x
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution; padding 0 pads one row/column at the bottom/right first, as diffusers does."""

    channels: int
    padding: int = 1

    def setup(self):
        self.conv = conv(self.channels, stride=2, padding=self.padding)

    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    channels: int

    def setup(self):
        self.conv = conv(self.channels)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)
