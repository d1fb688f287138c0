"""cipherdm_spu.floor_kernels: a floor kernel for every op, each made of the blocks it names and no more (its send
actions are the blocks' own, as scripts/rounds_budget.py counts them), and never dearer than our kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cipherdm_spu import SecureSession, ops, registry
from cipherdm_spu.floor_kernels import NAME, _row_max_by_pairs, kernel_floor

from .scripts import load_script

RNG = np.random.default_rng(0)
FEATURES = RNG.normal(size=(1, 14, 14, 16)).astype(np.float32)
GROUPS, AFFINE = np.abs(RNG.normal(size=(1, 1, 8, 1))).astype(np.float32) + 0.1, np.ones((1, 1, 8, 2), np.float32)
LOGITS = RNG.normal(size=(1, 2, 49, 49)).astype(np.float32)
VALUES = np.random.default_rng(1).normal(size=(1, 2, 49, 32)).astype(np.float32)  # apart: RNG feeds the tests below
CALLS = {  # an op as a model calls it, with its inputs
    "silu": (lambda v: ops.silu(v), (FEATURES,)),
    "gelu": (lambda v: ops.gelu(v), (FEATURES,)),
    "rsqrt": (lambda v, w: ops.rsqrt(v, w, scale=1.3), (GROUPS, AFFINE)),
    "softmax": (lambda v: ops.softmax(v, axis=-1, scale=0.5), (LOGITS,)),
    "attention softmax": (lambda v, w: ops.softmax(v, axis=-1, scale=0.5, values=w), (LOGITS, VALUES)),  # with values
    "exp": (lambda v: ops.exp(v - 10.0), (FEATURES,)),
}


@pytest.fixture(scope="module")
def floor_session():
    with SecureSession(kernel_floor()) as session:
        yield session


def _cost(session, name):
    fn, args = CALLS[name]
    session.run(fn, *args)
    return session.last_stats


def test_every_op_has_a_floor_kernel_that_traces_in_plain_jax():
    pset = kernel_floor()
    assert pset.name == "kernel-floor" and set(pset.kernels) == set(registry.OPS)
    assert set(pset.kernels.values()) == {NAME}
    with registry.use_protocol(pset):
        for name, (fn, args) in CALLS.items():
            out = jax.jit(lambda *a, fn=fn: fn(*a))(*args)  # a fresh function: jit caches traces per function
            assert np.all(np.isfinite(np.asarray(out))), name


def test_the_floors_take_no_more_than_their_blocks_send_actions(floor_session):
    """(in sequence SPU may take one fewer than the blocks' sum: docs/results/primitives.md)"""
    with SecureSession(registry.BASELINE) as session:  # the blocks scripts/rounds_budget.py counts floors in
        blocks = {}
        for block, fn in load_script("rounds_budget").BLOCKS.items():
            session.run(fn, FEATURES)
            blocks[block] = session.last_stats.send_actions
    decide = blocks["indicator"]  # a comparison and its conversion
    sums = {  # activations: decide, the step's bit product, one secret product
        "silu": decide + blocks["integer_product"] + blocks["secret_product"],
        "gelu": decide + blocks["integer_product"] + blocks["secret_product"],
        "rsqrt": decide + 2 * blocks["secret_product"],  # decide, then two rounds of secret products
        "exp": decide + blocks["integer_product"] + 3 * blocks["secret_product"],  # the clamp, three secret products
    }
    for name, total in sums.items():
        assert total - 1 <= _cost(floor_session, name).send_actions <= total, name


def test_no_floor_kernel_compiles_to_a_gather(floor_session):
    """A gather (what a strided slice compiles to) would cost the floor seconds no kernel needs."""
    for name, (fn, args) in CALLS.items():
        assert "gather" not in floor_session.compile(fn, *args).code.decode(), name


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_floor_kernel_costs_no_more_than_ours(floor_session, sessions, name):
    floor = _cost(floor_session, name)
    # (`cipherdm-low-byte`'s rsqrt reads the octave off the encoding's bits, a block the floor does not take)
    for pset in ("cipherdm",) if name == "rsqrt" else ("cipherdm", "cipherdm-low-byte"):
        ours = _cost(sessions[pset], name)
        assert floor.bytes_sent <= ours.bytes_sent, pset
        if "softmax" not in name:  # the floor's row max takes pairs: the fewest comparisons, not the fewest rounds
            assert floor.send_actions <= ours.send_actions, pset


def test_a_softmax_kernel_refuses_values_on_another_axis():
    """`ops.softmax` weighs values by rows on the last axis; a kernel called directly refuses any other, where a
    product over the wrong axis could go unnoticed on square logits."""
    from cipherdm_spu.protocols import cipherdm

    for kernel in (registry.kernel("softmax", NAME), cipherdm.softmax, cipherdm.softmax_low_byte):
        with pytest.raises(ValueError, match="last axis"):
            kernel(np.zeros((4, 4), np.float32), 0, "cipherdm", values=np.zeros((4, 2), np.float32))


def test_the_floor_row_max_is_a_max():
    x = RNG.normal(size=(3, 7)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_row_max_by_pairs(jnp.asarray(x))), x.max(axis=-1, keepdims=True))
    with SecureSession(registry.BASELINE) as session:
        np.testing.assert_allclose(session.run(_row_max_by_pairs, x), x.max(axis=-1, keepdims=True), atol=1e-5)
