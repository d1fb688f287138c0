"""models/attention.py: projections of one input share one matmul, with diffusers' parameter names."""

import jax
import jax.numpy as jnp
import numpy as np

from cipherdm_spu.models.attention import Attention, fused_projections


def test_fused_projections_equal_separate_matmuls(rng):
    x = rng.normal(size=(2, 5, 6)).astype(np.float32)
    weights = [(rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)),
               (rng.normal(size=(6, 3)).astype(np.float32), None)]
    got = fused_projections(jnp.asarray(x), weights)
    np.testing.assert_allclose(got[0], x @ weights[0][0] + weights[0][1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], x @ weights[1][0], rtol=1e-5, atol=1e-5)


def test_attention_keeps_diffusers_parameter_names(rng):
    module = Attention(heads=2, dim_head=4, out_dim=8, qkv_bias=True)
    params = module.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 8)), jnp.ones((1, 5, 6)))["params"]
    assert {k: sorted(v) for k, v in params.items()} == {
        "to_q": ["bias", "kernel"], "to_k": ["bias", "kernel"], "to_v": ["bias", "kernel"], "to_out_0": ["bias", "kernel"]}
    assert params["to_k"]["kernel"].shape == (6, 8) and params["to_q"]["kernel"].shape == (8, 8)


def test_self_attention_takes_one_matmul_round_for_q_k_v(sessions, rng):
    """Under MPC the fused q, k, v projection costs the send actions of one matmul, not three."""
    x = rng.normal(size=(1, 16, 8)).astype(np.float32)
    w = [rng.normal(size=(8, 8)).astype(np.float32) for _ in range(3)]
    session = sessions["cipherdm"]
    session.run(lambda v, a, b, c: fused_projections(v, [(a, None), (b, None), (c, None)]), x, *w)
    fused = session.last_stats.send_actions
    session.run(lambda v, a, b, c: [v @ a, v @ b, v @ c], x, *w)
    separate = session.last_stats.send_actions
    session.run(lambda v, a: v @ a, x, w[0])
    assert fused == session.last_stats.send_actions < separate
