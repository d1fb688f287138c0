"""A fixed-point value's ring element as an integer.

Under SPU a fixed-point value x is held as the ring integer x * 2**f (f fraction bits); reinterpreting its bits as an
integer of the same width gives that element for free, and integer arithmetic on it (products without truncation,
exact sums) is what kernels and the norms' arithmetic build their cheaper forms from. Outside an SPU compile the same
reinterpretation gives the float's IEEE bits, so callers branch on `registry.fixed_point_bits()` where it matters.
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
