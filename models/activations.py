"""Activation functions by their diffusers names, routed through `cipherdm_spu.ops`.

Every activation of the ports goes through a registered op, so the protocol set in force when the model
is traced decides which secure kernel runs.
"""

from __future__ import annotations

from cipherdm_spu import ops

ACTIVATIONS = {
    "silu": ops.silu,
    "swish": ops.silu,
    "mish": ops.mish,
    "gelu": ops.gelu,
    "relu": ops.relu,
}


def get_activation(name: str):
    """The op for a diffusers ``act_fn`` name; unknown names fail with the list of supported ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported act_fn {name!r}; supported: {sorted(ACTIVATIONS)}") from None
