"""SecureSession: compilation per protocol set, cost reports, resident values, refusals."""

import jax.numpy as jnp
import numpy as np
import pytest

from cipherdm_spu import InputError, Public, SecureSession, SessionError, ops


def _model(x):
    return ops.softmax(x, axis=-1) * ops.silu(x)


def test_two_protocol_sets_give_different_ir_and_both_match_plaintext(sessions, rng):
    x = rng.normal(0, 2, (4, 8)).astype(np.float32)
    ref = np.asarray(_model(jnp.asarray(x)))  # no protocol active: vanilla JAX
    irs = {}
    for name in ("spu", "cipherdm"):
        y = sessions[name].run(_model, x)
        np.testing.assert_allclose(y, ref, atol=2e-2)
        irs[name] = sessions[name].compile(_model, x).mlir
    assert irs["spu"] != irs["cipherdm"]
    assert "pphlo.exponential" in irs["spu"] and "pphlo.exponential" not in irs["cipherdm"]


def test_cost_report_counts_multiplication_not_addition(sessions):
    session = sessions["spu"]
    a = np.ones(100, np.float32)
    session.run(lambda x, y: x + y, a, a)
    assert session.last_stats.bytes_sent == 0 and session.last_stats.send_actions == 0
    session.run(lambda x, y: x * y, a, a)
    stats = session.last_stats
    assert stats.bytes_sent > 0 and stats.send_actions > 0
    assert sum(stats.bytes_sent_per_party) == stats.bytes_sent and len(stats.bytes_sent_per_party) == 3
    assert stats.send_actions == max(stats.send_actions_per_party)
    assert stats.kernels["multiply"].bytes_sent > 0
    assert stats.seconds > 0


def test_public_inputs_are_not_shared_secretly(sessions):
    session = sessions["spu"]
    a = np.arange(10, dtype=np.float32)
    np.testing.assert_allclose(session.run(lambda x, p: x * p, a, Public(a)), a * a, atol=1e-3)
    assert "pphlo.secret" in session.compile(lambda x, p: x * p, a, Public(a)).mlir


def test_resident_values_survive_between_runs(sessions):
    session = sessions["cipherdm"]
    weights = session.share({"w": np.full(5, 2.0, np.float32)})
    latent = session.share(np.arange(5, dtype=np.float32))
    for _ in range(3):  # the latent stays secret between steps
        new = session.run(lambda p, x: x * p["w"], weights, latent, reveal=False)
        session.delete(latent)
        latent = new
    np.testing.assert_allclose(session.reveal(latent), np.arange(5) * 8.0, atol=1e-3)
    assert weights["w"] in session.resident
    session.delete([weights, latent])
    with pytest.raises(InputError, match="no longer resident"):
        session.reveal(latent)


def test_executable_is_compiled_once_per_shape(sessions):
    session = sessions["spu"]
    f = lambda x: x * 3.0  # noqa: E731
    first = session.compile(f, np.zeros(4, np.float32))
    assert session.compile(f, np.ones(4, np.float32)) is first
    assert session.compile(f, np.zeros(5, np.float32)) is not first


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([1.0, np.nan], np.float32), "NaN"),
        (np.array([np.inf], np.float32), "NaN or infinity"),
        (np.array([1 + 2j]), "not supported"),
        (np.array(["a"]), "not supported"),
    ],
)
def test_bad_inputs_are_refused_before_sharing(sessions, bad, message):
    session = sessions["spu"]
    before = len(session.resident)
    with pytest.raises(InputError, match=message):
        session.run(lambda x: x, bad)
    assert len(session.resident) == before


def test_shape_mismatch_is_refused_before_sharing(sessions):
    session = sessions["spu"]
    before = len(session.resident)
    with pytest.raises(InputError, match="cannot be traced"):
        session.run(lambda x, y: x @ y, np.ones((2, 3), np.float32), np.ones((2, 3), np.float32))
    assert len(session.resident) == before


def test_handles_are_bound_to_their_session_and_closed_sessions_refuse_work():
    with SecureSession("spu") as a, SecureSession("spu") as b:
        h = a.share(np.ones(2, np.float32))
        with pytest.raises(InputError, match="another session"):
            b.run(lambda x: x, h)
    with pytest.raises(SessionError, match="closed"):
        a.run(lambda x: x, np.ones(2, np.float32))


def test_output_structure_and_dtypes_follow_the_function(sessions):
    out = sessions["spu"].run(lambda x: {"sum": x.sum(), "pair": (x, x > 0)}, np.array([1.0, -2.0], np.float32))
    assert set(out) == {"sum", "pair"}
    np.testing.assert_allclose(out["sum"], -1.0, atol=1e-4)
    assert out["pair"][1].dtype == np.bool_ and out["pair"][1].tolist() == [True, False]


def test_cost_report_survives_a_later_session_moving_the_spu_log(tmp_path):
    """SPU's log is process-wide: an older session keeps reporting after a newer one redirects it."""
    x = np.ones(8, np.float32)
    with SecureSession("spu") as older:
        with SecureSession("spu", log_file=str(tmp_path / "elsewhere.log")):
            pass
        older.run(lambda v: v * v, x)
        assert older.last_stats.bytes_sent > 0
