"""The compile cache: an executable compiled once is read back by a fresh process's compile of the same input, and
never one of another input; damaged entries, and directories others could write, are refused."""

import dataclasses
import hashlib
import json
import os
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
import spu.libspu as libspu

from cipherdm_spu import SecureSession, compile_cache, ops
from cipherdm_spu.errors import CompileCacheError, IrAuditError
from cipherdm_spu.ir_audit import audit

from .scripts import load_script
from .test_sampling import tiny_model  # noqa: F401 - the fixture


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory, and the SPU compiles that reach SPU's compiler, counted."""
    directory = tmp_path / "executables"
    monkeypatch.setenv(compile_cache.ENV, str(directory))
    compiles = []
    real = libspu.compile

    def counted(source, copts):
        compiles.append(hashlib.sha256(source.ir_txt).hexdigest())
        return real(source, copts)

    monkeypatch.setattr(libspu, "compile", counted)
    return directory, compiles


#: a module in canonical HLO text, for the tests of the directory alone (their compile is a stand-in)
TINY_HLO = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

ENTRY main {
  tmp_0 = f32[4]{0} parameter(0)
  tmp_1 = f32[] constant(2)
  tmp_2 = f32[4]{0} broadcast(f32[] tmp_1), dimensions={}
  ROOT tmp_3 = f32[4]{0} multiply(f32[4]{0} tmp_0, f32[4]{0} tmp_2)
}
"""


def _silu_twice(x):
    return ops.silu(x) * 2.0


def test_a_fresh_session_reads_the_executable_another_compiled(cache):
    directory, compiles = cache
    x = np.linspace(-4, 4, 16).astype(np.float32)
    with SecureSession("cipherdm") as first:
        compiled = first.compile(_silu_twice, x)
        want = first.run(_silu_twice, x)
    assert len(compiles) == 1 and len(list(directory.glob("*.spu"))) == 1
    assert directory.stat().st_mode & 0o777 == 0o700
    with SecureSession("cipherdm") as second:  # its own in-memory cache is empty: the entry is read back
        assert second.compile(_silu_twice, x).code == compiled.code
        np.testing.assert_allclose(second.run(_silu_twice, x), want, atol=5e-3)  # shares and truncations are random
    assert len(compiles) == 1


@pytest.mark.parametrize("change", ["protocol set", "compiler option", "visibility", "shape"])
def test_another_input_to_the_compiler_is_another_entry(cache, change):
    """Everything SPU's compiler reads is in the key: kernels (the HLO), its options, the inputs' visibilities."""
    from cipherdm_spu import Public, registry

    directory, compiles = cache
    x = np.linspace(-4, 4, 16).astype(np.float32)
    with SecureSession("cipherdm") as session:
        session.compile(_silu_twice, x)
    if change == "protocol set":
        other, arg = SecureSession("spu"), x
    elif change == "compiler option":
        base = registry.protocol_set("cipherdm")
        options = {**base.compiler, "disable_select_optimization": True}
        other, arg = SecureSession(dataclasses.replace(base, name="cipherdm-probe", compiler=options)), x
    elif change == "visibility":
        other, arg = SecureSession("cipherdm"), Public(x)
    else:
        other, arg = SecureSession("cipherdm"), x[:8]
    with other:
        other.compile(_silu_twice, arg)
    assert len(compiles) == 2 and len(set(compiles)) == 2 and len(list(directory.glob("*.spu"))) == 2


def test_a_damaged_entry_is_compiled_again(cache):
    directory, compiles = cache
    x = np.ones(8, np.float32)
    with SecureSession("spu") as session:
        code = session.compile(_silu_twice, x).code
    (entry,) = directory.glob("*.spu")
    data = bytearray(entry.read_bytes())
    data[-10] ^= 0x01  # one bit of the code: its digest no longer matches
    entry.write_bytes(bytes(data))
    with SecureSession("spu") as session:
        assert session.compile(_silu_twice, x).code == code
    assert len(compiles) == 2 and entry.read_bytes() != bytes(data)


def test_a_planted_entry_is_checked_as_a_compiled_one_is(cache):
    """Whoever can write the directory chooses the code (an entry's digest cannot tell a consistent forgery; the
    directory's permissions keep others out, below), and what is read back goes through every check a fresh
    compile does. Here the entry of a program with a public result, planted under the key of one whose result is a
    secret: the session reads it back, and the audit that cluster parties run on every program refuses it."""
    directory, _ = cache
    x = np.ones(8, np.float32)
    with SecureSession("spu") as session:
        honest = session.compile(lambda v: v * 2.0, x)
        public = session.compile(lambda v: jnp.zeros_like(v), x)
    audit(honest.mlir)
    entries = {p.read_bytes().partition(b"\n")[2]: p for p in directory.glob("*.spu")}
    entries[honest.code].write_bytes(entries[public.code].read_bytes())
    with SecureSession("spu") as session:
        planted = session.compile(lambda v: v * 2.0, x)
    assert planted.code == public.code
    with pytest.raises(IrAuditError, match="declassifies"):
        audit(planted.mlir)


@pytest.mark.parametrize("problem", ["group-writable", "other owner", "a file"])
def test_a_directory_others_could_write_is_refused(tmp_path, monkeypatch, problem):
    directory = tmp_path / "shared"
    if problem == "a file":
        directory.write_text("not a directory")
        match = "not a directory"
    else:
        directory.mkdir()
        if problem == "group-writable":
            directory.chmod(0o770)
        else:
            if os.getuid() != 0:
                pytest.skip("giving a directory to another user needs root")
            os.chown(directory, 65534, 65534)
        match = "must be this user's"
    monkeypatch.setenv(compile_cache.ENV, str(directory))
    with SecureSession("spu") as session, pytest.raises(CompileCacheError, match=match):
        session.compile(_silu_twice, np.ones(4, np.float32))


def test_off_compiles_without_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir() is None
    with SecureSession("spu") as session:
        session.compile(_silu_twice, np.ones(4, np.float32))
    assert not any(tmp_path.iterdir())


def test_processes_compiling_one_input_at_once_compile_it_once(tmp_path, monkeypatch):
    """The parties of a cluster on one machine compile the same program at the same moment: one compiles, the
    others wait for its entry (threads here, each with its own lock file handle, as processes have)."""
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    calls = []

    def slow_compile(src, copts):
        calls.append(src)
        time.sleep(1.0)
        return b"code"

    results = []
    threads = [threading.Thread(target=lambda: results.append(
        compile_cache.compiled(TINY_HLO, [], libspu.CompilerOptions(), slow_compile))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"code"] * 3 and len(calls) == 1


def test_the_least_recently_used_entries_go_beyond_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    monkeypatch.setattr(compile_cache, "MAX_BYTES", 2500)
    options = libspu.CompilerOptions()
    sources = [TINY_HLO.replace("constant(2)", f"constant({i})") for i in range(3)]
    for i, source in enumerate(sources):
        compile_cache.compiled(source, [], options, lambda s, o: b"x" * 1000)
        entry = tmp_path / (compile_cache.source_key(source, [], options) + ".spu")
        os.utime(entry, (i, i))  # written in order, oldest first
    kept = {p.name for p in tmp_path.glob("*.spu")}
    assert kept == {compile_cache.source_key(s, [], options) + ".spu" for s in sources[1:]}


def test_the_times_script_reports_a_compile_with_the_cache_empty_and_full(tiny_model, tmp_path):  # noqa: F811
    """scripts/compile_cache_times.py on a tiny model: both compiles give the same executable (the script checks
    it), and the report has the command."""
    out = tmp_path / "report" / "compile_cache"
    assert load_script("compile_cache_times").main(["--sets", "spu", "--model", str(tiny_model), "--out", str(out)]) == 0
    row = json.loads(out.with_suffix(".json").read_text())["rows"]["spu"]
    assert row["empty_cache_s"] > 0 and row["full_cache_s"] > 0 and row["executable_bytes"] > 0
    assert "Command: `python scripts/compile_cache_times.py --sets spu" in out.with_suffix(".md").read_text()
