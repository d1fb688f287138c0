"""OpenMP's thread limit for SPU's matrix products: importing cipherdm_spu sets it before SPU's library loads, libgomp
(the copy SPU's library links) takes it, a value the environment sets is kept, and a libgomp loaded first (by spu or
by torch, whose copy SPU then shares) is warned of."""

import json
import os
import subprocess
import sys

import pytest

# what the child reports: the environment's value, and the limit the libgomp SPU loaded holds (omp_get_thread_limit)
PROBE = """
import ctypes, json, os, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    {imports}
limit = ctypes.CDLL("libgomp.so.1").omp_get_thread_limit()
print(json.dumps({{"env": os.environ.get("OMP_THREAD_LIMIT"), "limit": limit,
                  "warnings": [str(w.message) for w in caught if "OMP_THREAD_LIMIT" in str(w.message)]}}))
"""


def _probe(imports: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_importing_cipherdm_spu_limits_spus_openmp_to_one_thread():
    got = _probe("import cipherdm_spu")
    assert got["env"] == "1" and got["limit"] == 1 and got["warnings"] == []


def test_a_limit_the_environment_sets_is_kept():
    got = _probe("import cipherdm_spu", OMP_THREAD_LIMIT="3")
    assert got["env"] == "3" and got["limit"] == 3


@pytest.mark.parametrize("first", ["spu", "torch"])
def test_a_libgomp_loaded_first_is_warned_of(first):
    got = _probe(f"import {first}; import cipherdm_spu")
    assert got["limit"] > 1  # libgomp had read its environment already
    assert any("loaded before cipherdm_spu" in w for w in got["warnings"])
