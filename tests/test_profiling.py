"""Parsing SPU's profiler log into per-party costs."""

import pytest

from cipherdm_spu.profiling import ProfileParseError, RunStats, combine_party_runs, parse_run


def _op(name, sb, sa=1, calls=1):
    return f"x [info] [api.cc:printProfilingData:223] - {name}, executed {calls} times, duration 0.001s, send bytes {sb} recv bytes {sb}, send actions {sa}, recv actions {sa}"


def _link(sb, sa):
    return f"x [info] [api.cc:printProfilingData:233] Link details: total send bytes {sb}, recv bytes {sb}, send actions {sa}, recv actions {sa}"


def test_per_party_totals_are_recovered_from_interleaved_lines():
    # party 0: pphlo + HAL + MPC lines (100 B, 4 actions); party 1: pphlo only (70 B, 3);
    # party 2: HAL + MPC (40 B, 2). Lines of the three parties interleave.
    lines = [
        _op("pphlo.multiply", 60, 2), _op("f_less", 40, 2), _op("pphlo.less", 70, 3),
        _op("pphlo.custom_call: spu.prefer_a", 40, 2), _op("f_mul", 100, 4), _op("trunc_a", 40, 2),
        _op("mul_aa", 100, 4), _link(70, 3), _link(40, 2), _link(100, 4),
    ]
    stats = parse_run("\n".join(lines), seconds=1.5)
    assert stats.bytes_sent_per_party == [100, 70, 40]
    assert stats.send_actions_per_party == [4, 3, 2]
    assert stats.bytes_sent == 210 and stats.send_actions == 4
    assert stats.kernels["multiply"].bytes_sent == 30  # per-party mean over the two pphlo-level parties
    assert "custom_call: spu.prefer_a" in stats.kernels


def test_inconsistent_log_is_reported():
    lines = [_op("pphlo.multiply", 10), _op("f_mul", 10), _op("mul_aa", 10), _link(5, 1), _link(5, 1), _link(5, 1)]
    with pytest.raises(ProfileParseError):
        parse_run("\n".join(lines), seconds=0.1)


def test_missing_lines_are_reported():
    with pytest.raises(ProfileParseError, match="expected 3"):
        parse_run(_link(1, 1), seconds=0.1)


def test_per_party_compute_adds_up_and_is_empty_where_not_measured():
    report = {"bytes_sent": 10, "bytes_recv": 10, "send_actions": 2, "kernels": {}}
    run = combine_party_runs([{**report, "seconds": 2.0, "cpu_seconds": c} for c in (1.0, 1.5, 0.5)], seconds=2.0)
    assert run.cpu_seconds_per_party == [1.0, 1.5, 0.5] and run.busy_seconds_per_party == [2.0, 2.0, 2.0]
    total = RunStats.zero() + run + run
    assert total.cpu_seconds_per_party == [2.0, 3.0, 1.0] and total.busy_seconds_per_party == [4.0, 4.0, 4.0]
    unmeasured = combine_party_runs([report] * 3, seconds=1.0)  # reports without compute (an older party)
    assert unmeasured.cpu_seconds_per_party == [] and (RunStats.zero() + unmeasured).cpu_seconds_per_party == []


def test_a_log_moved_aside_between_sessions_is_followed(tmp_path):
    """A session's log reopened after it was chmod-ed (or hard-linked by a backup) is moved aside and made anew
    (`private_dir.create_file`); SPU must then log to the new file, which each run's profile is read from (a review
    found SPU still writing the moved file and the next run's profile read from an empty one)."""
    import numpy as np

    from cipherdm_spu import SecureSession

    log = tmp_path / "spu.log"
    with SecureSession("spu", log_file=str(log)) as session:
        session.run(lambda v: v * v, np.ones(4, np.float32))
        first = session.last_stats.send_actions
    log.chmod(0o640)
    with SecureSession("spu", log_file=str(log)) as session:
        session.run(lambda v: v * v, np.ones(4, np.float32))
        assert session.last_stats.send_actions == first > 0
    (aside,) = tmp_path.glob("spu.log.moved-*")
    assert aside.stat().st_size > 0 and log.stat().st_size > 0
