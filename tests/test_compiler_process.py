"""A party's compiler process: one job at a time, each within its own deadline, and only an overrun job killed."""

import concurrent.futures as cf
import os
import threading
import time
from pathlib import Path

import pytest

from cipherdm_spu.compiler_process import CompilerProcess
from cipherdm_spu.errors import PartyError


def test_a_jobs_deadline_counts_from_its_start_not_while_it_waits():
    """A job queued behind a long one still gets its whole deadline (an independent review: with the wait counted,
    a queued job overran and killed the process under the job before it)."""
    compiler = CompilerProcess("test compiler", lambda: cf.ThreadPoolExecutor(1))
    first = threading.Thread(target=compiler.run, args=(10.0, 10.0, time.sleep, 3.0))
    first.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert compiler.run(2.5, 10.0, time.sleep, 1.5) is None  # ~2.5 s for its turn, then 1.5 s of its 2.5
    assert time.monotonic() - started >= 3.5
    first.join()


def test_a_jobs_own_error_keeps_the_process_and_one_that_died_idle_is_replaced():
    pools = []

    class DiesWhileIdle(cf.ThreadPoolExecutor):
        def submit(self, fn, *args):
            if len(pools) == 1:  # the first pool's process is gone by the time a job comes
                raise cf.BrokenExecutor("gone")
            return super().submit(fn, *args)

    compiler = CompilerProcess("test compiler", lambda: pools.append(DiesWhileIdle(1)) or pools[-1])
    assert compiler.run(5.0, 5.0, sum, [1, 2]) == 3 and len(pools) == 2  # ran on a fresh one, not refused
    with pytest.raises(ZeroDivisionError):
        compiler.run(5.0, 5.0, divmod, 1, 0)
    assert len(pools) == 2  # a job that fails is the caller's error; its process is kept
    compiler.close()
    with pytest.raises(PartyError, match="shutting down"):
        compiler.run(5.0, 5.0, sum, [1])
    assert len(pools) == 2


def test_a_busy_compiler_refuses_after_the_wait_and_a_given_up_job_never_runs():
    compiler = CompilerProcess("test compiler", lambda: cf.ThreadPoolExecutor(1))
    ran = []
    first = threading.Thread(target=compiler.run, args=(10.0, 10.0, time.sleep, 4.0))
    first.start()
    time.sleep(0.5)
    with pytest.raises(PartyError, match="test compiler is busy with another job"):
        compiler.run(10.0, 1.0, ran.append, 1)
    with pytest.raises(PartyError, match="the job was given up"):
        compiler.run(10.0, 10.0, ran.append, 2, abandoned=lambda: True)
    first.join()
    assert ran == []


def test_an_overrun_kills_only_its_own_job_and_the_next_runs_on_a_fresh_process():
    compiler = CompilerProcess("test compiler")  # a spawned process, as a party's
    try:
        first_pid = compiler.run(120.0, 1.0, os.getpid)
        results = []
        waiting = threading.Thread(target=lambda: results.append(compiler.run(120.0, 120.0, os.getpid)))
        with pytest.raises(PartyError, match="the job took more than 1 s"):
            threading.Timer(0.3, waiting.start).start()
            compiler.run(1.0, 1.0, time.sleep, 60)
        waiting.join(120)
        assert results and results[0] != first_pid  # it ran, on the process started after the kill
        status = Path(f"/proc/{first_pid}/status")
        assert not status.exists() or "Z" in status.read_text().split("State:")[1][:4]  # gone, or dead unreaped
    finally:
        compiler.close()


def test_a_warning_in_the_compiler_process_reaches_the_console_as_one_line(capfd):
    """A party's console (the launcher echoes it) showed a compile cache's notice as a Python warning with its source
    line: a waiting peer looked like a failure. (`cipherdm_spu.console`: a library's warning says where it came from.)"""
    import warnings

    compiler = CompilerProcess("compiler")
    try:
        compiler.run(60, 60, warnings.warn, "a notice", RuntimeWarning)
    finally:
        compiler.close()
    lines = [line for line in capfd.readouterr().err.splitlines() if line]
    notice = [i for i, line in enumerate(lines) if line.startswith("warning: a notice (RuntimeWarning, process.py:")]
    assert len(notice) == 1 and lines[notice[0] + 1:notice[0] + 2] == [], lines  # no source line under it
