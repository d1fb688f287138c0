"""A fixed-point value's ring element as an integer.

Under SPU a fixed-point value x is held as the ring integer x * 2**f (f fraction bits); reinterpreting its bits as an
integer of the same width gives that element for free, and integer arithmetic on it (products without truncation,
exact sums, a comparison's bit times a value) is what kernels, the norms' and the samplers' arithmetic build their
cheaper forms from. Outside an SPU compile the same reinterpretation gives the float's IEEE bits, so callers branch on
`registry.fixed_point_bits()` where it matters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_INT_OF_FLOAT = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}  # the integer type a float's bits are cast to


def int_type(dtype):
    """The integer type as wide as the float type ``dtype``."""
    return _INT_OF_FLOAT[jnp.dtype(dtype).itemsize]


def encoding(v):
    """v's bits as an integer of its width: under SPU its ring element (the fixed-point encoding), free."""
    return jax.lax.bitcast_convert_type(v, int_type(v.dtype))


def indicator(pred):
    """A comparison's result as an arithmetic 0/1 integer: SPU converts the bit once (B2A) and `bit_times` then reuses
    it, where every `jnp.where` on the boolean would convert it again."""
    return jnp.where(pred, jnp.int32(1), jnp.int32(0))


def bit_times(bit, v):
    """bit * v for a 0/1 integer bit: the product of ``bit`` and v's bits reinterpreted as an integer.

    Under SPU that is an integer product of ring elements (one reshare, no truncation, exact for any |v|), cheaper
    than a select's product (rows `relu` and `select_relu` of docs/results/primitives.md); in plain JAX it is exact
    too (v's own bits or +0.0), so the same code still runs, and can be checked, in float.
    """
    product = bit.astype(int_type(v.dtype)) * encoding(v)
    return jax.lax.bitcast_convert_type(product, v.dtype)
