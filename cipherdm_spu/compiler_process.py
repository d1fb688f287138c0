"""A party's compiler: a spawned process that runs one caller's job at a time, each within its own deadline.

Judging a manifest or a job and compiling a step program run outside the party's control service (SPU's compiler
holds the GIL for seconds, which would stall the service and its deadlines). A party keeps two: one for owners'
manifests, one for its session, so that neither kind of client can delay or break the other's work. One job runs
at a time, and its deadline counts from when it starts, not while it waits for the job before it: a job that
overruns its deadline, or whose caller gives it up, is ended by killing the process, which then only ever holds
that caller's job (an independent review found that a shared queue let one owner's slow manifest kill a user's
compile).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import threading
import time
import warnings
from typing import Callable, Optional

from .console import warning_line
from .errors import PartyError

#: how often a waiting caller checks whether its job was given up
CHECK_S = 1.0


class CompilerProcess:
    """``run(fn, *args)`` in a spawned process (``start`` makes it: a one-process pool), one job at a time."""

    def __init__(self, name: str, start: Optional[Callable[[], cf.Executor]] = None):
        self.name = name  # e.g. "party P0's session compiler", in error messages
        self._start = start or _spawned_pool
        self._turn = threading.Lock()  # held by the caller whose job runs
        self._pool = self._start()
        self._closed = False

    def run(self, limit_s: float, wait_s: float, fn, *args, abandoned: Callable[[], bool] = lambda: False):
        """``fn(*args)`` in the process, once the job before it ended (waiting at most ``wait_s``), within
        ``limit_s`` of its start; `PartyError` when it waited too long, overran, died, or ``abandoned()`` turned
        true meanwhile (the process is then restarted, so the next job starts on a fresh one)."""
        waited = time.monotonic() + wait_s
        while not self._turn.acquire(timeout=CHECK_S):
            if abandoned():
                raise PartyError(f"{self.name}: the job was given up")
            if time.monotonic() > waited:
                raise PartyError(f"{self.name} is busy with another job; try again later")
        try:
            if self._closed:
                raise PartyError(f"{self.name} is shutting down")
            if abandoned():
                raise PartyError(f"{self.name}: the job was given up")
            return self._run(limit_s, fn, args, abandoned)
        finally:
            self._turn.release()

    def _run(self, limit_s: float, fn, args, abandoned: Callable[[], bool]):
        """The job on the process, the caller holding the turn; the process restarted unless the job ended."""
        try:
            future = self._pool.submit(fn, *args)
        except (cf.BrokenExecutor, RuntimeError):  # the process died while idle: this job gets a fresh one
            self._restart()
            future = self._pool.submit(fn, *args)
        ended = False
        try:
            deadline = time.monotonic() + limit_s
            while True:
                try:
                    result = future.result(timeout=CHECK_S)
                except (cf.BrokenExecutor, cf.CancelledError):
                    raise PartyError(f"{self.name}: its process died") from None
                except Exception:
                    if future.done():  # the job's own error: the process is fine
                        ended = True
                        raise
                    if abandoned():
                        raise PartyError(f"{self.name}: the job was given up") from None
                    if time.monotonic() > deadline:
                        raise PartyError(f"{self.name}: the job took more than {limit_s:g} s") from None
                    continue
                ended = True
                return result
        finally:
            if not ended:
                self._restart()

    def _restart(self) -> None:
        _stop(self._pool)
        if not self._closed:
            self._pool = self._start()

    def close(self) -> None:
        """End the process now, even mid-job; a later run is refused."""
        self._closed = True
        _stop(self._pool)


def _spawned_pool() -> cf.ProcessPoolExecutor:
    """A spawned one-process pool that ends with the party, even when the party is killed."""
    return cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_start_compiler)


def _start_compiler() -> None:
    """The compiler process's start: it ends with the party, and shows warnings as the party's console does."""
    die_with_parent()
    warnings.showwarning = warning_line


def _stop(pool: cf.Executor) -> None:
    """End the pool's process now (shutdown alone would wait for its job)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def die_with_parent() -> None:
    """End this process when its parent (the party) ends, even by SIGKILL: a compiler or a session's worker holds
    memory, and a worker the session's link and shares."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent was already gone before prctl took effect
        os._exit(1)

    def watch():  # elsewhere than Linux: poll
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
