"""A fixed-point value's ring element as an integer."""

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
