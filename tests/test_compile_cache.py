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
    assert len(compiles) == 2 and len(list(directory.glob("*.spu"))) == 2  # two keys: two entries


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


@pytest.mark.parametrize("problem", ["writable by others", "other owner", "a file"])
def test_a_directory_others_could_write_is_refused(tmp_path, monkeypatch, problem):
    directory = tmp_path / "shared"
    if problem == "a file":
        directory.write_text("not a directory")
        match = "not a directory"
    else:
        directory.mkdir()
        if problem == "writable by others":
            directory.chmod(0o707)
        else:
            if os.getuid() != 0:
                pytest.skip("giving a directory to another user needs root")
            os.chown(directory, 65534, 65534)
        match = "no one but this user"
    monkeypatch.setenv(compile_cache.ENV, str(directory))
    with SecureSession("spu") as session, pytest.raises(CompileCacheError, match=match):
        session.compile(_silu_twice, np.ones(4, np.float32))


def test_a_directory_above_that_others_could_write_is_refused_unless_sticky(tmp_path, monkeypatch):
    """Whoever can write a directory above the cache can swap the cache for one of its own between a check and a use
    (an independent review did, with RENAME_EXCHANGE in a loop): every directory above must be root's or this user's
    and closed to others, or sticky (as /tmp); what is missing is made 0700."""
    above = tmp_path / "open"
    above.mkdir()
    above.chmod(0o777)
    monkeypatch.setenv(compile_cache.ENV, str(above / "a" / "b"))
    with SecureSession("spu") as session, pytest.raises(CompileCacheError, match=f"{above} on its path has mode 777"):
        session.compile(_silu_twice, np.ones(4, np.float32))
    above.chmod(0o1777)  # sticky: others cannot rename or remove what is not theirs
    with SecureSession("spu") as session:
        session.compile(_silu_twice, np.ones(4, np.float32))
    assert all((above / d).stat().st_mode & 0o777 == 0o700 for d in ("a", "a/b"))


@pytest.mark.skipif(os.getuid() != 0, reason="a symlink of another user's needs root to make")
def test_a_symlink_of_another_users_on_the_path_is_refused(tmp_path, monkeypatch):
    """A reviewer's bypass of the check above: another user's symlink, in a directory where it may make one (sticky),
    pointing at a directory of this user's. The path is walked one component at a time, and a symlink is followed
    only where root or this user owns it."""
    sticky, mine = tmp_path / "sticky", tmp_path / "mine"
    sticky.mkdir()
    sticky.chmod(0o1777)
    mine.mkdir(mode=0o700)
    (sticky / "theirs").symlink_to(mine)
    os.lchown(sticky / "theirs", 65534, 65534)
    (sticky / "ours").symlink_to(mine)
    monkeypatch.setenv(compile_cache.ENV, str(sticky / "theirs"))
    with SecureSession("spu") as session, pytest.raises(CompileCacheError, match="is a symlink owned by uid 65534"):
        session.compile(_silu_twice, np.ones(4, np.float32))
    monkeypatch.setenv(compile_cache.ENV, str(sticky / "ours" / "cache"))
    with SecureSession("spu") as session:
        session.compile(_silu_twice, np.ones(4, np.float32))
    assert len(list((mine / "cache").glob("*.spu"))) == 1


def test_a_cache_that_cannot_be_made_compiles_without_it(monkeypatch):
    """No home, a read-only disk: a warning and the compile (here a directory /proc cannot hold)."""
    monkeypatch.setenv(compile_cache.ENV, "/proc/cipherdm-compile-cache")
    with SecureSession("spu") as session, pytest.warns(RuntimeWarning, match="compiled without the cache"):
        assert session.compile(_silu_twice, np.ones(4, np.float32)).code


def test_an_entry_that_is_not_a_regular_file_of_this_users_is_refused(cache):
    directory, _ = cache
    x = np.ones(4, np.float32)
    with SecureSession("spu") as session:
        session.compile(_silu_twice, x)
    (entry,) = directory.glob("*.spu")
    elsewhere = directory.parent / "elsewhere.spu"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)
    with SecureSession("spu") as session, pytest.raises(CompileCacheError, match="cannot be opened as a file"):
        session.compile(_silu_twice, x)
    entry.unlink()
    elsewhere.rename(entry)
    entry.chmod(0o644)
    with SecureSession("spu") as session, pytest.raises(CompileCacheError, match="not a regular file of this user's"):
        session.compile(_silu_twice, x)
    entry.unlink()
    os.mkfifo(entry, 0o600)  # a FIFO: opening it must not wait for a writer
    with SecureSession("spu") as session, pytest.raises(CompileCacheError, match="not a regular file of this user's"):
        session.compile(_silu_twice, x)


def test_a_cache_that_cannot_store_returns_the_compile_with_a_warning(cache, monkeypatch):
    """A full disk or a read-only directory costs the time the cache would have saved, never the compile."""
    directory, compiles = cache

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compile_cache, "_write", full_disk)
    with SecureSession("spu") as session, pytest.warns(RuntimeWarning, match="compiled but not stored"):
        code = session.compile(_silu_twice, np.ones(4, np.float32)).code
    assert code and len(compiles) == 1 and not list(directory.glob("*.spu"))


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
        compile_cache.executable(TINY_HLO, [], libspu.CompilerOptions(), slow_compile))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"code"] * 3 and len(calls) == 1


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.cache_dir() == tmp_path / ".cache" / "cipherdm-spu" / "executables"


def test_a_compile_does_not_wait_for_ever_on_another_processs_lock(tmp_path, monkeypatch):
    """A stopped process holding an entry's lock delays a compile of the same program by LOCK_WAIT_S at most, with a
    word after LOCK_NOTICE_S; then it compiles without the lock."""
    import fcntl

    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    monkeypatch.setattr(compile_cache, "LOCK_NOTICE_S", 0.2)
    monkeypatch.setattr(compile_cache, "LOCK_WAIT_S", 0.6)
    options = libspu.CompilerOptions()
    lock = tmp_path / (compile_cache.source_key(TINY_HLO, [], options) + ".spu.lock")
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.warns(RuntimeWarning, match="waiting .* for another process compiling the same program"):
            assert compile_cache.executable(TINY_HLO, [], options, lambda s, o: b"code") == b"code"


def test_without_a_home_the_compile_goes_on_without_a_cache(monkeypatch):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "")
    with pytest.warns(RuntimeWarning, match="compiled without the cache, which has no home"):
        assert compile_cache.executable(TINY_HLO, [], libspu.CompilerOptions(), lambda s, o: b"code") == b"code"


@pytest.mark.parametrize("protocol", ["spu", "cipherdm"])
def test_the_canonical_module_compiles_to_what_jaxs_own_module_does(protocol, monkeypatch):
    """SPU compiles the module parsed back from the canonical text: the same executable bytes as SPU's frontend
    compiling JAX's module, on a program with every op (a -0.0 constant would differ: written 0, the same in fixed
    point)."""
    import jax
    from spu.utils import frontend as spu_fe

    from cipherdm_spu import registry, spu_config
    from cipherdm_spu.session import _VIS, compile_function

    monkeypatch.setenv(compile_cache.ENV, "off")
    pset = registry.protocol_set(protocol)

    def every_op(x, v):
        h = ops.silu(x) + ops.mish(x) + ops.gelu(x) + ops.sigmoid(x) + ops.exp(-jnp.abs(x))
        return ops.softmax(h, axis=-1) + ops.rsqrt(h * h + 1.0) + ops.softmax(x, axis=-1, values=v)

    specs = (((4, 8), "float32", "secret"), ((8, 8), "float32", "secret"))
    in_tree = jax.tree_util.tree_structure((0, 0))
    ours = compile_function(every_op, in_tree, specs, pset, 18).code

    def flat(*args):
        with registry.use_protocol(pset):
            return every_op(*args)

    flat.__name__ = every_op.__name__  # the module's name, in the executable
    with registry.fixed_point(18):  # as compile_function lowers: the kernels' lowering reads it
        theirs, _ = spu_fe.compile(spu_fe.Kind.JAX, flat, [jax.ShapeDtypeStruct(s, np.float32) for s, _, _ in specs],
                                   {}, ["in0", "in1"], [_VIS[v] for _, _, v in specs], lambda outs: ["out0"],
                                   copts=spu_config.compiler_options(pset.compiler))
    assert ours == theirs.code


def test_the_least_recently_used_entries_go_beyond_the_limit(tmp_path, monkeypatch):
    """And temporary files that a writer killed mid-write left behind, once they are old."""
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    (tmp_path / ".writing-1-dead").write_bytes(b"x" * 100)
    os.utime(tmp_path / ".writing-1-dead", (0, 0))
    (tmp_path / ".writing-2-busy").write_bytes(b"x" * 100)  # a writer at work
    monkeypatch.setattr(compile_cache, "MAX_BYTES", 2500)
    options = libspu.CompilerOptions()
    sources = [TINY_HLO.replace("constant(2)", f"constant({i})") for i in range(3)]
    for i, source in enumerate(sources):
        compile_cache.executable(source, [], options, lambda s, o: b"x" * 1000)
        entry = tmp_path / (compile_cache.source_key(source, [], options) + ".spu")
        os.utime(entry, (i, i))  # written in order, oldest first
    kept = {p.name for p in tmp_path.glob("*.spu")}
    assert kept == {compile_cache.source_key(s, [], options) + ".spu" for s in sources[1:]}
    assert not (tmp_path / ".writing-1-dead").exists() and (tmp_path / ".writing-2-busy").exists()


def test_the_times_script_reports_a_compile_with_the_cache_empty_and_full(tiny_model, tmp_path):  # noqa: F811
    """scripts/compile_cache_times.py on a tiny model: both compiles give the same executable (the script checks
    it), two jobs run on a loopback cluster, and the report has the command."""
    out = tmp_path / "report" / "compile_cache"
    assert load_script("compile_cache_times").main(["--sets", "spu", "--model", str(tiny_model), "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    row, jobs = result["rows"]["spu"], result["cluster"]["spu"]
    assert row["empty_cache_s"] > 0 and row["full_cache_s"] > 0 and row["executable_bytes"] > 0
    assert jobs["first_job_s"] > 0 and jobs["second_job_s"] > 0 and len(jobs["step_run_s"]) == 2
    markdown = out.with_suffix(".md").read_text()
    assert "Command: `python scripts/compile_cache_times.py --sets spu" in markdown and "| `spu` |" in markdown
