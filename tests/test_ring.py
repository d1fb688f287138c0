"""A fixed-point value's ring element as an integer."""

import jax
import jax.numpy as jnp
import numpy as np

from cipherdm_spu import ring

from .conftest import fewest_send_actions


def test_the_integer_type_is_as_wide_as_the_float():
    assert ring.int_type(jnp.float32) == jnp.int32 and ring.int_type(jnp.float16) == jnp.int16


def test_under_spu_the_encoding_is_the_ring_element_and_costs_nothing(sessions):
    x = np.array([1.5, -0.25, 3.0], np.float32)
    e = sessions["cipherdm"].run(ring.encoding, x)
    np.testing.assert_array_equal(e, np.trunc(x.astype(np.float64) * 2**18))  # x * 2**f, SPU's encoding of x
    assert fewest_send_actions(sessions["cipherdm"], lambda v: ring.encoding(v) * 3, x) == 0


def test_a_bit_times_a_value_is_exact_under_spu_and_in_float(sessions):
    """bit_times on indicator bits: the value or zero, exactly, for large and tiny values; one reshare."""
    x = np.array([-3e4, -2.5, -1e-5, 0.0, 1e-5, 2.5, 3e4], np.float32)
    both = lambda v: ring.bit_times(ring.indicator(v > 0), v)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.jit(both)(x)), np.maximum(x, 0))
    encoded = np.trunc(x.astype(np.float64) * 2**18) / 2**18
    np.testing.assert_array_equal(sessions["cipherdm"].run(both, x), np.maximum(encoded, 0))
    bits = np.array([0, 1, 1, 0, 1, 0, 1], np.int32)
    assert fewest_send_actions(sessions["cipherdm"], ring.bit_times, bits, x) == 1
