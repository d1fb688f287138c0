"""OpenMP's thread limit for SPU's matrix products: one thread each, unless the environment says otherwise.

SPU 0.9.5 multiplies share matrices with Eigen on two OpenMP threads (libgomp). Eigen's threads wait for each other by
spinning at every block of the contraction, so wherever they share cores with other work (the three parties of a
one-process session, a cluster's three parties on one host, a party's own two products of an ABY3 matmul) a product
waits out the scheduler's time slices: on this project's 2-core machines a product with a long contraction takes many
times longer on two threads than on one (docs/results/spu_threads.md, `scripts/benchmark_spu_threads.py`). One thread
per product loses at most the second thread's share on an idle many-core host.

libgomp reads OMP_THREAD_LIMIT once, when SPU's library loads, and children inherit it (a cluster's parties), so
importing this module runs `limit_spu_threads`, and ``cipherdm_spu/__init__`` imports it before anything imports SPU.
A value already in the environment is kept: a deployment with cores to spare may set a higher limit itself.
"""

from __future__ import annotations

import os
import sys
import warnings

VARIABLE = "OMP_THREAD_LIMIT"
DEFAULT = "1"


def limit_spu_threads() -> None:
    """Set OMP_THREAD_LIMIT to 1 unless the environment sets it; warn if SPU's library has loaded already (then the
    limit reaches only child processes)."""
    if VARIABLE in os.environ:
        return
    os.environ[VARIABLE] = DEFAULT
    if "spu.libspu" in sys.modules:
        warnings.warn(
            f"spu was imported before cipherdm_spu, so its matrix products keep OpenMP's default threads, which spin "
            f"against each other on a busy host; import cipherdm_spu first or set {VARIABLE}={DEFAULT}",
            RuntimeWarning, stacklevel=2,
        )


limit_spu_threads()
