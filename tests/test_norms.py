"""GroupNorm / LayerNorm helpers: torch-like semantics, fixed-point safe at small variances."""

import jax.numpy as jnp
import numpy as np
import pytest

from protocols import group_norm, layer_norm


def _group_norm_ref(x, groups, eps):
    n, c = x.shape[0], x.shape[-1]
    g = x.reshape(n, -1, groups, c // groups).astype(np.float64)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)


def test_group_norm_matches_reference_in_plaintext(rng):
    x = rng.normal(3, 2, (2, 4, 4, 8)).astype(np.float32)
    np.testing.assert_allclose(group_norm(jnp.asarray(x), 4, eps=1e-5), _group_norm_ref(x, 4, 1e-5), atol=1e-4)


def test_layer_norm_with_affine(rng):
    x = rng.normal(0, 1, (3, 16)).astype(np.float32)
    scale, bias = np.full(16, 2.0, np.float32), np.full(16, 0.5, np.float32)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * 2 + 0.5
    np.testing.assert_allclose(layer_norm(jnp.asarray(x), scale, bias), ref, atol=1e-4)


@pytest.mark.parametrize("protocol", ["spu", "cipherdm"])
def test_group_norm_under_mpc_with_small_and_large_variances(sessions, rng, protocol):
    x = rng.normal(0, 1, (2, 8, 8, 4)).astype(np.float32)
    x[0] *= 0.01  # variance 1e-4
    x[1] *= 50.0  # variance 2.5e3
    y = sessions[protocol].run(lambda v: group_norm(v, 2, eps=1e-6), x)
    assert np.abs(y - _group_norm_ref(x, 2, 1e-6)).max() <= 3e-2


def test_group_norm_refuses_indivisible_channels():
    with pytest.raises(ValueError, match="groups"):
        group_norm(jnp.zeros((1, 2, 2, 6)), 4)
