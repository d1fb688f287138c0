"""cipherdm_spu.linalg: a batched product as one block-diagonal product under SPU, where that is small."""

import jax.numpy as jnp
import numpy as np
import pytest

from cipherdm_spu import linalg

from .conftest import fewest_send_actions

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("a_shape, b_shape", [((2, 4, 16, 8), (2, 4, 8, 16)), ((3, 5, 7), (3, 7, 2)),
                                              ((1, 6, 5), (1, 5, 4)), ((6, 5), (5, 4))])
def test_batched_matmul_is_the_batched_product_in_plain_jax_and_under_spu(sessions, a_shape, b_shape):
    a = RNG.normal(size=a_shape).astype(np.float32)
    b = RNG.normal(size=b_shape).astype(np.float32)
    want = np.asarray(a, np.float64) @ b
    np.testing.assert_allclose(linalg.batched_matmul(jnp.asarray(a), jnp.asarray(b)), want, atol=1e-5)
    np.testing.assert_allclose(sessions["spu"].run(linalg.batched_matmul, a, b), want, atol=1e-4)


def test_one_block_diagonal_product_takes_one_products_send_actions(sessions):
    """SPU's batched product reshares and truncates per batch element; the block-diagonal one once, for the same
    bytes (its outputs are the batch's). Heads of attention: 4 x (64 x 8) @ (8 x 64)."""
    session = sessions["spu"]
    a = RNG.normal(size=(1, 4, 64, 8)).astype(np.float32)
    b = RNG.normal(size=(1, 4, 8, 64)).astype(np.float32)
    one = fewest_send_actions(session, linalg.batched_matmul, a, b)
    one_bytes = session.last_stats.bytes_sent
    per_element = fewest_send_actions(session, jnp.matmul, a, b)
    assert one + 4 <= per_element
    assert one_bytes == session.last_stats.bytes_sent


def test_a_large_batched_product_keeps_spus_form(sessions, monkeypatch):
    """Above MAX_EXTRA_MULTIPLY_ADDS (the zero blocks' local work) the product is SPU's batched one, with its send
    actions."""
    session = sessions["spu"]
    a = RNG.normal(size=(4, 16, 4)).astype(np.float32)
    b = RNG.normal(size=(4, 4, 16)).astype(np.float32)
    one = fewest_send_actions(session, linalg.batched_matmul, a, b)
    monkeypatch.setattr(linalg, "MAX_EXTRA_MULTIPLY_ADDS", 0)
    kept = fewest_send_actions(session, lambda x, y: linalg.batched_matmul(x, y), a, b)  # a fresh trace
    assert abs(kept - fewest_send_actions(session, jnp.matmul, a, b)) <= 1 and one + 4 <= kept
    np.testing.assert_allclose(session.run(lambda x, y: linalg.batched_matmul(x, y), a, b), np.asarray(a, np.float64) @ b,
                               atol=1e-4)


def test_a_priced_call_takes_the_full_calls_form(sessions):
    """`rows_of_full_call`: a few rows priced for a call of many take the form the many would (here the batched one,
    its zero blocks' work over the limit), with its send actions."""
    session = sessions["spu"]
    a = RNG.normal(size=(4, 2, 8)).astype(np.float32)
    b = RNG.normal(size=(4, 8, 8)).astype(np.float32)
    few = fewest_send_actions(session, lambda x, y: linalg.batched_matmul(x, y), a, b)
    rows = linalg.MAX_EXTRA_MULTIPLY_ADDS // (4 * 3 * 8 * 8) + 1
    with linalg.rows_of_full_call(rows):
        as_many = fewest_send_actions(session, lambda x, y: linalg.batched_matmul(x, y), a, b)
    assert as_many >= few + 4 and abs(as_many - fewest_send_actions(session, jnp.matmul, a, b)) <= 1
