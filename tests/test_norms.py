"""GroupNorm / LayerNorm helpers: torch-like semantics, fixed-point safe at small and large variances, cheap."""

import jax.numpy as jnp
import numpy as np
import pytest

from cipherdm_spu import registry
from cipherdm_spu.models.normalization import (
    MIN_UNITS,
    _mean_of_sums,
    _scaled_channel_sums_of_squares,
    _scaled_deviations,
    group_norm,
    layer_norm,
)
from cipherdm_spu.protocols.cipherdm import _encoding
from cipherdm_spu.session import SecureSession

from .conftest import fewest_send_actions


def _group_norm_ref(x, groups, eps, scale=1.0, bias=0.0):
    n, c = x.shape[0], x.shape[-1]
    g = x.reshape(n, -1, groups, c // groups).astype(np.float64)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


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


@pytest.mark.parametrize("channels", [8, 64])  # 8 channels on 28x28 pixels: 49 to a chunk of squares; 64 on 4x4: 1
def test_group_norm_under_mpc_large_groups_offsets_and_affine(sessions, rng, channels):
    side = 28 if channels == 8 else 4
    x = rng.normal(0, 1, (2, side, side, channels)).astype(np.float32)
    x[0] = x[0] * 100.0 + 300.0  # variance 1e4 around a large mean: a 1/count rounded to 2**-18 would show here
    x[1] = x[1] * 0.01 - 3.0  # variance 1e-4
    scale = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    bias = rng.normal(0, 1, channels).astype(np.float32)
    y = sessions["cipherdm"].run(lambda v, s, b: group_norm(v, 2, s, b, eps=1e-6), x, scale, bias)
    assert np.abs(y - _group_norm_ref(x, 2, 1e-6, scale, bias)).max() <= 3e-2


def test_layer_norm_under_mpc(sessions, rng):
    x = (rng.normal(0, 1, (4, 320)) * np.array([[100.0], [1.0], [0.1], [10.0]]) + 50.0).astype(np.float32)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.astype(np.float64).var(-1, keepdims=True) + 1e-6)
    y = sessions["cipherdm"].run(lambda v: layer_norm(v, eps=1e-6), x)
    assert np.abs(y - ref).max() <= 3e-2


@pytest.mark.parametrize("runs", [1, 64])
def test_mean_of_sums_keeps_the_divisor_precise_and_large_means_in_range(sessions, rng, runs):
    x = (rng.normal(0, 10, (3, runs, 40960 // runs)) + np.array([[[37.0]], [[-3.0]], [[30000.0]]])).astype(np.float32)
    mean = sessions["cipherdm"].run(lambda v: _mean_of_sums(v.sum(-1), 40960), x)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean((1, 2)), rtol=1e-4)  # 1/40960 as a constant: 6 % low


def test_group_norm_costs_one_secret_and_one_integer_product_per_element(sessions, rng):
    """The squares as integer products summed before their truncation, and the affine scale folded into the
    per-group factor: what is left per element is one integer product (the square) and one secret product (the
    deviation times that factor), plus the per-group rsqrt."""
    x = rng.normal(0, 1, (1, 16, 16, 32)).astype(np.float32)
    session = sessions["cipherdm"]
    session.run(lambda v: v * v, x)
    product = session.last_stats.bytes_sent
    session.run(lambda v: _encoding(v) * _encoding(v), x)
    integer_product = session.last_stats.bytes_sent
    session.run(lambda v, s, b: group_norm(v, 8, s, b), x, np.ones(32, np.float32), np.zeros(32, np.float32))
    assert session.last_stats.bytes_sent <= product + integer_product + 0.3 * product


@pytest.mark.parametrize("side, channels, variance", [(64, 8, 2e4), (8, 64, 1e5)])
def test_squares_are_summed_in_the_ring_at_large_variances(sessions, rng, side, channels, variance):
    """Large variances on a large latent (64x64 at 2e4, where one truncation of a whole channel's squares, as a Gram
    diagonal made, wrapped: the norm erred 6.0) and on a small map (8x8 at 1e5): summed in chunks of PIXELS_PER_CHUNK
    pixels the squares stay in the ring, and the norm matches torch's arithmetic. The squares take an integer
    product's send action and a truncation's two, plus one for each sum's initial value made secret (a step's sums
    share them)."""
    x = (rng.normal(0, 1, (1, side, side, channels)) * np.sqrt(variance) + 5.0).astype(np.float32)
    y = sessions["cipherdm"].run(lambda v: group_norm(v, 2, eps=1e-6), x)
    assert np.abs(y - _group_norm_ref(x, 2, 1e-6)).max() <= 3e-2
    squares = lambda v: _scaled_channel_sums_of_squares(v.reshape(1, side * side, channels))  # noqa: E731
    want = 16 * np.sum(x.astype(np.float64).reshape(1, side * side, channels) ** 2, axis=1)
    np.testing.assert_allclose(sessions["cipherdm"].run(squares, x), want, rtol=1e-5)
    assert fewest_send_actions(sessions["cipherdm"], squares, x) <= 5


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_a_norms_affine_scale_costs_no_send_action_under_cipherdm(sessions, rng, norm):
    """The affine weight rides in the rsqrt kernel's first product (`ops.rsqrt`'s ``times``): a norm with it
    takes no more send actions than one without (each the fewest of three runs: the busiest party's count varies by
    one or two from run to run), and still matches
    torch's arithmetic."""
    x = rng.normal(2, 3, (2, 8, 8, 16)).astype(np.float32)
    scale = rng.uniform(-2, 2, 16).astype(np.float32)
    if norm == "group":
        fn, ref = (lambda v, s: group_norm(v, 4, s)), _group_norm_ref(x, 4, 1e-5, scale)
    else:
        fn = lambda v, s: layer_norm(v, s)  # noqa: E731
        x64 = x.astype(np.float64)
        ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * scale
    session = sessions["cipherdm"]
    without = fewest_send_actions(session, lambda v: fn(v, None), x)
    assert fewest_send_actions(session, fn, x, scale) <= without + 1  # a product of its own would take 3 more
    y = session.run(fn, x, scale)
    assert np.abs(y - ref).max() <= 3e-2


@pytest.fixture(scope="module")
def centred():
    """A cipherdm session whose rsqrt kernel asks the norms for their deviations in one truncation."""
    session = SecureSession("cipherdm", {"rsqrt": "cipherdm-centred"})
    yield session
    session.close()


def _fewest_summed_send_actions(session, fn, *args) -> int:
    counts = []
    for _ in range(3):
        session.run(fn, *args)
        counts.append(sum(session.last_stats.send_actions_per_party))
    return min(counts)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_centred_norms_take_fewer_send_actions_and_no_error_from_a_large_mean(sessions, centred, rng, norm):
    """`cipherdm-centred`: the deviations in one truncation replace the mean's two in a row: fewer send actions (the
    parties' sum, each program's fewest of three runs: the busiest party's count varies by one or two between runs,
    as much as LayerNorm saves there), and a spread of 0.1 around a mean of 1000 comes out close to torch's arithmetic
    in float64, where the mean first errs by its public 1/count's rounding (2**-19 * |mean| / std; counts of 196 and
    320: neither is a power of two, for which that constant would be exact)."""
    shape, fn = {
        "group": ((2, 7, 7, 16), lambda v, s: group_norm(v, 4, s, eps=1e-6)),
        "layer": ((2, 8, 320), lambda v, s: layer_norm(v, s, eps=1e-6)),
    }[norm]
    x = rng.normal(0, 1, shape).astype(np.float32)
    x[0] = x[0] * 0.1 + 1000.0
    x[1] = x[1] * 50.0 - 7.0
    scale = rng.uniform(0.5, 2.0, shape[-1]).astype(np.float32)
    if norm == "group":
        ref = _group_norm_ref(x, 4, 1e-6, scale)
    else:
        x64 = x.astype(np.float64)
        ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6) * scale
    mean_first = _fewest_summed_send_actions(sessions["cipherdm"], fn, x, scale)
    assert _fewest_summed_send_actions(centred, fn, x, scale) < mean_first
    error = np.abs(centred.run(fn, x, scale) - ref)
    assert error[0].max() <= 5e-3 and error.max() <= 1e-2  # (the second sample's: the rsqrt's and SPU's truncations)
    assert np.abs(sessions["cipherdm"].run(fn, x, scale) - ref)[0].max() > 1e-2  # the mean's error, gone above


@pytest.mark.parametrize("variance", [1e-4, 1e-2, 1e4])
def test_centred_group_norm_holds_small_and_large_variances(centred, rng, variance):
    """On the range the mean-first norms hold (tests above): variances from 1e-4 to 1e4 around a mean of -40."""
    x = (rng.normal(0, 1, (1, 28, 28, 8)) * np.sqrt(variance) - 40.0).astype(np.float32)
    y = centred.run(lambda v: group_norm(v, 2, eps=1e-6), x)
    assert np.abs(y - _group_norm_ref(x, 2, 1e-6)).max() <= 3e-2


def test_centred_norms_scale_eps_by_lam_squared(centred, rng):
    """At SD's GroupNorm count, 40960, 1/count rounds to 6 units of 2**-18 and lam to 0.9375: with a variance as
    small as eps, an eps left unscaled (eps / lam**2 in effect) would err 0.11 here."""
    x = (rng.normal(0, 0.1, (1, 64, 64, 20)) + 3.0).astype(np.float32)
    assert 40960 * round(2.0**18 / 40960) * 2.0**-18 == 0.9375
    y = centred.run(lambda v: group_norm(v, 2, eps=1e-2), x)
    assert np.abs(y - _group_norm_ref(x, 2, 1e-2)).max() <= 1e-2


def test_centred_norms_take_the_mean_first_past_a_count_of_2_to_16(centred, rng):
    """1/count below MIN_UNITS units of 2**-18 cannot be one public product: the norm takes the mean first, and is
    still right."""
    count = 80000
    assert round(2.0**18 / count) < MIN_UNITS
    x = (rng.normal(0, 2, (1, count)) + 5.0).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    assert np.abs(centred.run(lambda v: layer_norm(v), x) - ref).max() <= 3e-2
    assert _scaled_deviations_under(centred, x, count) is None


def _scaled_deviations_under(session, x, count):
    """What `_scaled_deviations` returns while ``session``'s set is in force in an SPU compile."""
    with registry.use_protocol(session.protocol), registry.fixed_point(18):
        return _scaled_deviations(jnp.asarray(x), (x.ndim - 1,), count)


def test_only_a_kernel_that_asks_for_it_centres_the_norms(sessions, centred, rng):
    x = rng.normal(0, 1, (1, 64)).astype(np.float32)
    assert _scaled_deviations_under(sessions["cipherdm"], x, 64) is None
    deviations, lam = _scaled_deviations_under(centred, x, 64)
    assert lam == 64 * round(2.0**18 / 64) * 2.0**-18 == 1.0
    with registry.use_protocol(centred.protocol):  # plain JAX: nothing to save
        assert _scaled_deviations(jnp.asarray(x), (1,), 64) is None
