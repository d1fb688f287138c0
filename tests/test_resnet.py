"""models/resnet.py: the ResNet block's conv2 and 1x1 shortcut as one matmul (`summed_convolutions`), exact in
plaintext, one reshare and truncation fewer under MPC, on the parameters an nn.Conv has."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cipherdm_spu.models.resnet import ConvWeights, ResnetBlock2D, conv, patches, summed_convolutions

from .conftest import fewest_send_actions


def _conv(x, kernel, bias):
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


def _terms(rng):
    h, x = rng.normal(size=(2, 7, 6, 4)), rng.normal(size=(2, 7, 6, 5))
    k2, ks = rng.normal(size=(3, 3, 4, 6)) * 0.3, rng.normal(size=(1, 1, 5, 6)) * 0.3
    b2, bs = rng.normal(size=6), rng.normal(size=6)
    return [tuple(np.asarray(a, np.float32) for a in t) for t in ((h, k2, b2), (x, ks, bs))]


def test_summed_convolutions_are_the_sum_of_the_convolutions(rng):
    terms = _terms(rng)
    reference = sum(_conv(*t) for t in terms)
    np.testing.assert_allclose(summed_convolutions(terms), reference, atol=1e-5)
    np.testing.assert_allclose(summed_convolutions(terms[:1]), _conv(*terms[0]), atol=1e-5)  # one 3x3 alone


def test_one_matmul_costs_a_reshare_and_a_truncation_fewer_under_mpc(sessions, rng):
    terms = _terms(rng)
    reference = np.asarray(sum(_conv(*t) for t in terms), np.float64)
    session = sessions["cipherdm"]
    fused = session.run(summed_convolutions, terms)
    assert np.abs(fused - reference).max() < 1e-3
    separate = lambda ts: sum(_conv(*t) for t in ts)  # noqa: E731
    fused_sends = fewest_send_actions(session, summed_convolutions, terms)
    fused_bytes = session.last_stats.bytes_sent
    separate_sends = fewest_send_actions(session, separate, terms)
    assert fused_sends < separate_sends  # one reshare and one truncation fewer (a run varies by one or two)
    assert fused_bytes < session.last_stats.bytes_sent  # one truncation's and one reshare's bytes fewer


@pytest.mark.parametrize("in_channels", [4, 8])
def test_the_block_keeps_nn_convs_parameters(in_channels):
    block = ResnetBlock2D(out_channels=8, groups=2, eps=1e-5, act_fn="silu", has_time=False)
    x = jnp.ones((1, 5, 5, in_channels))
    params = block.init(jax.random.PRNGKey(0), x, None)["params"]
    reference = conv(8).init(jax.random.PRNGKey(0), jnp.ones((1, 5, 5, 8)))["params"]
    assert jax.tree_util.tree_map(jnp.shape, params["conv2"]) == jax.tree_util.tree_map(jnp.shape, reference)
    weights = ConvWeights(8).init(jax.random.PRNGKey(0), 8)["params"]  # nn.Conv's initialisers, same draws
    jax.tree_util.tree_map(np.testing.assert_array_equal, weights, reference)
    assert ("conv_shortcut" in params) == (in_channels != 8)
    if in_channels != 8:
        assert params["conv_shortcut"]["kernel"].shape == (1, 1, in_channels, 8)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="odd size"):
        patches(jnp.ones((1, 4, 4, 2)), 2)
    terms = [(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3)), jnp.zeros(3)),
             (jnp.ones((1, 2, 8, 2)), jnp.ones((1, 1, 2, 3)), jnp.zeros(3))]
    with pytest.raises(ValueError, match="one batch and size"):
        summed_convolutions(terms)
