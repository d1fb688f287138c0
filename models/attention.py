"""Attention layers of the diffusers UNets, channels-last: spatial self-attention blocks (UNet2DModel)
and the cross-attention transformer (UNet2DConditionModel). The softmax, with the values it weighs, is the
registered op."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cipherdm_spu import ops
from cipherdm_spu.linalg import batched_matmul

from .normalization import GroupNorm, LayerNorm
from .resnet import conv


def attend(q, k, v, heads: int):
    """softmax(q k^T / sqrt(d)) v over ``heads`` heads, for (N, L, heads*d) inputs."""
    n, lq, inner = q.shape
    d = inner // heads
    q = q.reshape(n, lq, heads, d)
    k = k.reshape(n, k.shape[1], heads, d)
    v = v.reshape(n, v.shape[1], heads, d)
    # the scale goes to the softmax, whose kernel may fold it into its exp's input product, and so do the values,
    # which it may weigh before dividing by the rows' sums (on d numbers a row instead of one per key)
    scores = batched_matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1))  # (N, heads, Lq, Lk)
    out = ops.softmax(scores, axis=-1, scale=d**-0.5, values=v.transpose(0, 2, 1, 3))
    return out.transpose(0, 2, 1, 3).reshape(n, lq, inner)


class DenseWeights(nn.Module):
    """The parameters of an ``nn.Dense`` (same names, shapes and initialisers), returned instead of applied, so
    that projections of one input can share a matmul."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", nn.linear.default_kernel_init, (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32) if self.use_bias else None
        return kernel, bias


def fused_projections(x, weights):
    """[x @ W_i + b_i for each (W_i, b_i)] as ONE matmul against the concatenated kernels: under MPC each matmul
    is a reshare and a truncation round, and concatenating secret weights is local."""
    kernel = jnp.concatenate([w for w, _ in weights], axis=1)
    y = x @ kernel
    if any(b is not None for _, b in weights):
        y = y + jnp.concatenate([b if b is not None else jnp.zeros(w.shape[1], w.dtype) for w, b in weights])
    return jnp.split(y, np.cumsum([w.shape[1] for w, _ in weights])[:-1], axis=-1)


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out.0). The projections of one
    input share a matmul (`fused_projections`): q, k, v for self-attention, k and v for cross-attention."""

    heads: int
    dim_head: int
    out_dim: int
    qkv_bias: bool = False

    def setup(self):
        inner = self.heads * self.dim_head
        self.to_q = DenseWeights(inner, use_bias=self.qkv_bias)
        self.to_k = DenseWeights(inner, use_bias=self.qkv_bias)
        self.to_v = DenseWeights(inner, use_bias=self.qkv_bias)
        self.to_out_0 = nn.Dense(self.out_dim)

    def __call__(self, x, context=None):
        q_weights = self.to_q(x.shape[-1])
        source = x if context is None else context
        kv_weights = [self.to_k(source.shape[-1]), self.to_v(source.shape[-1])]
        if context is None:
            q, k, v = fused_projections(x, [q_weights] + kv_weights)
        else:
            (q,), (k, v) = fused_projections(x, [q_weights]), fused_projections(context, kv_weights)
        return self.to_out_0(attend(q, k, v, self.heads))


class SpatialSelfAttention(Attention):
    """UNet2DModel's attention block: group norm, self-attention over pixels, residual, rescale
    (heads = channels / dim_head, out_dim = channels; parameters group_norm, to_q, ... as in diffusers)."""

    norm_groups: int | None = None
    eps: float = 1e-5
    rescale_output_factor: float = 1.0
    qkv_bias: bool = True

    def setup(self):
        super().setup()
        if self.norm_groups is not None:
            self.group_norm = GroupNorm(self.norm_groups, self.eps)

    def __call__(self, x):
        n, h, w, c = x.shape
        y = self.group_norm(x) if self.norm_groups is not None else x
        y = super().__call__(y.reshape(n, h * w, c)).reshape(n, h, w, c)
        out = y + x
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


class GEGLU(nn.Module):
    """proj -> split -> value * gelu(gate) (exact GeLU, through the registered op)."""

    inner_dim: int

    def setup(self):
        self.proj = nn.Dense(2 * self.inner_dim)

    def __call__(self, x):
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * ops.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward: net.0 (GEGLU), net.2 (Linear); net.1 is torch's dropout."""

    dim: int
    mult: int = 4

    def setup(self):
        self.net_0 = GEGLU(self.dim * self.mult)
        self.net_2 = nn.Dense(self.dim)

    def __call__(self, x):
        return self.net_2(self.net_0(x))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

    dim: int
    heads: int
    dim_head: int

    def setup(self):
        self.norm1 = LayerNorm()
        self.attn1 = Attention(self.heads, self.dim_head, self.dim)
        self.norm2 = LayerNorm()
        self.attn2 = Attention(self.heads, self.dim_head, self.dim)
        self.norm3 = LayerNorm()
        self.ff = FeedForward(self.dim)

    def __call__(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel for continuous input: norm, proj_in, blocks, proj_out, residual."""

    heads: int
    dim_head: int
    channels: int
    num_layers: int
    norm_groups: int
    use_linear_projection: bool

    def setup(self):
        inner = self.heads * self.dim_head
        self.norm = GroupNorm(self.norm_groups, eps=1e-6)
        self.proj_in = nn.Dense(inner) if self.use_linear_projection else conv(inner, kernel=1)
        self.transformer_blocks = [BasicTransformerBlock(inner, self.heads, self.dim_head) for _ in range(self.num_layers)]
        self.proj_out = nn.Dense(self.channels) if self.use_linear_projection else conv(self.channels, kernel=1)

    def __call__(self, x, context):
        n, h, w, c = x.shape
        y = self.norm(x)
        if self.use_linear_projection:
            y = self.proj_in(y.reshape(n, h * w, c))
        else:
            y = self.proj_in(y).reshape(n, h * w, -1)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear_projection:
            y = self.proj_out(y).reshape(n, h, w, c)
        else:
            y = self.proj_out(y.reshape(n, h, w, -1))
        return y + x
