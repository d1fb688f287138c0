"""Timestep embeddings: the sinusoid of the (public) timestep and the model owner's time MLP."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from .activations import get_activation


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """Sinusoidal embedding of a 1-D array of timesteps, as diffusers' ``get_timestep_embedding``."""
    timesteps = jnp.asarray(timesteps, jnp.float32)
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 (diffusers ``TimestepEmbedding`` without the optional extras)."""

    dim: int
    act_fn: str = "silu"

    def setup(self):
        self.linear_1 = nn.Dense(self.dim)
        self.linear_2 = nn.Dense(self.dim)

    def __call__(self, x):
        return self.linear_2(get_activation(self.act_fn)(self.linear_1(x)))


def one_timestep(timestep):
    """A public timestep that must be one value (the owner's time terms serve every sample of a step), as shape (1,)."""
    t = jnp.asarray(timestep)
    if t.size != 1:
        raise ValueError(f"time_terms takes one timestep (every sample of a step shares it), got shape {t.shape}")
    return jnp.reshape(t, (1,))


def broadcast_timesteps(timestep, batch: int):
    """A scalar or per-sample timestep as a (batch,) array."""
    t = jnp.atleast_1d(jnp.asarray(timestep))
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"timestep must be a scalar or have shape ({batch},), got shape {t.shape}")
    return jnp.broadcast_to(t, (batch,))


def select_time_terms(tables, class_labels, batch: int):
    """Per-sample ResNet time terms from the owner's tables (one row per class, or one row).

    With class tables the selection is ``one_hot @ table``: linear in the secret label, so the whole
    time path, activation included, stays outside the secure computation. Integer labels are
    accepted in plaintext and turned into one-hot rows.
    """

    def pick(table):
        if class_labels is None:
            if table.shape[0] != 1:
                raise ValueError("these time terms are per class: pass class_labels")
            return jnp.broadcast_to(table, (batch, table.shape[-1]))
        return one_hot_labels(class_labels, table.shape[0]) @ table

    return jax.tree_util.tree_map(pick, tables)


def one_hot_labels(class_labels, num_classes: int):
    """Integer labels as float one-hot rows; float input is taken to be one-hot already."""
    labels = jnp.asarray(class_labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if labels.ndim != 2 or labels.shape[-1] != num_classes:
        raise ValueError(f"one-hot class labels must have shape (N, {num_classes}), got {labels.shape}")
    return labels
