"""OpenMP's thread limit, for SPU's matrix products: one thread, unless the environment says otherwise.

SPU 0.9.5 multiplies share matrices with Eigen on two OpenMP threads (libgomp); it asks for them by number, so
OMP_NUM_THREADS cannot lower it and OMP_THREAD_LIMIT can. Eigen's threads wait for each other by spinning at every
block of the contraction, so wherever they share cores with other work (the three parties of a one-process session, a
cluster's three parties on one host, a party's own two products of an ABY3 matmul) a product waits out the
scheduler's time slices: on this project's 2-core machines a product with a long contraction takes many times longer
on two threads than on one (docs/results/spu_threads.md, `scripts/benchmark_spu_threads.py`). One thread per product
loses at most the second thread's share on an idle many-core host.

libgomp reads OMP_THREAD_LIMIT once, when it loads, and children inherit it (a cluster's parties), so importing this
module runs `limit_spu_threads`, and ``cipherdm_spu/__init__`` imports it before anything loads SPU. The limit is
the whole process's: torch, which loads a libgomp of the same name, runs its CPU ops on one thread too. A value
already in the environment is kept: a party host with cores to spare may set a higher limit itself.
"""

from __future__ import annotations

import ctypes
import os
import warnings

VARIABLE = "OMP_THREAD_LIMIT"
DEFAULT = "1"
LIBGOMP = "libgomp.so.1"  # the OpenMP runtime SPU's library links


def limit_spu_threads() -> None:
    """Set OMP_THREAD_LIMIT to 1 unless the environment sets it; warn if a libgomp loaded before (by spu, or by
    torch, whose copy SPU then shares) holds another limit, since the variable then reaches only child processes."""
    if VARIABLE in os.environ:
        return
    os.environ[VARIABLE] = DEFAULT
    try:
        loaded = ctypes.CDLL(LIBGOMP, mode=os.RTLD_NOLOAD)
    except OSError:  # not loaded yet: it will read the limit when it loads
        return
    if loaded.omp_get_thread_limit() != int(DEFAULT):
        warnings.warn(
            f"an OpenMP runtime ({LIBGOMP}, loaded by spu or torch) was loaded before cipherdm_spu, so SPU's matrix "
            f"products keep OpenMP's default threads, which spin against each other on a busy host; import "
            f"cipherdm_spu first or set {VARIABLE}={DEFAULT}", RuntimeWarning)


limit_spu_threads()
