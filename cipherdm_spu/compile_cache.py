"""A directory of compiled SPU executables, keyed by what SPU's compiler reads.

SPU 0.9.5 spends most of a compile in XLA's HLO passes and the verifier it runs after each of them, and every
process compiles its programs again: each run of a script, and each of a cluster's three parties. An executable
is a function of the compiler's input alone, so it is stored under the SHA-256 of that input and read back by a
later compile of the same input. The input is the program's canonical HLO text (`canonical_hlo`: no ids, no
source locations, every constant written out), parsed back into the module SPU compiles, so the key determines
what is compiled; with the inputs' visibilities, the compiler options and the versions of SPU and jaxlib.
docs/results/compile_cache.md measures what it saves.

Trust: an entry is code that will run on secret shares. The directory must be this user's and closed to
everyone else (created 0700; one owned by another user, or that group or others may write, is refused, as ssh
refuses such key files): whoever else could write it can already read this user's keys. Each entry carries the
digest of its code, and one that does not match (a torn or damaged file) is discarded and compiled again. What is
read back is checked exactly as a fresh compile is (the party's audit of the IR, the parties' agreement on the
executable's digest), so the cache changes how long a compile takes, never what is accepted to run.

``$CIPHERDM_COMPILE_CACHE`` names the directory, or ``off`` turns the cache off; by default it is
``$XDG_CACHE_HOME/cipherdm-spu/executables`` (``~/.cache/...``). Processes compiling the same input at once (the
parties of a cluster on one machine) take turns on a lock per entry, so one compiles and the others read.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jaxlib
import spu
import spu.libspu as libspu
from jaxlib import xla_extension

from .errors import CompileCacheError

ENV = "CIPHERDM_COMPILE_CACHE"
#: the entries kept, in bytes: beyond it the least recently used are removed after a write
MAX_BYTES = 4 * 2**30
#: how long a compile waits for another process compiling the same input before compiling it too
LOCK_WAIT_S = 900.0
_POLL_S = 0.2
_HEADER = b"cipherdm-spu executable sha256="
_SUFFIX = ".spu"


def cache_dir() -> Optional[Path]:
    """The cache's directory from the environment, or None when it is turned off."""
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in ("off", "0", "none", "false", ""):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cipherdm-spu" / "executables"


def canonical_hlo(hlo_module_proto: bytes) -> str:
    """A serialized HLO module as canonical text: instructions and computations renamed in order, without ids or
    metadata (source locations), every constant and backend configuration in full. JAX's lowering of one function
    differs between calls only in what this leaves out."""
    options = xla_extension.HloPrintOptions.canonical()
    options.print_large_constants = options.print_backend_config = True
    return xla_extension.HloModule.from_serialized_hlo_module_proto(hlo_module_proto).to_string(options)


def source_key(hlo: str, visibility: Sequence[libspu.Visibility], copts: libspu.CompilerOptions) -> str:
    """SHA-256 over everything that decides the executable: the versions of SPU and jaxlib (which parses the text),
    the canonical HLO text, the inputs' visibilities and every field of the compiler options."""
    digest = hashlib.sha256()
    for part in (f"spu {spu.__version__}", f"jaxlib {jaxlib.__version__}", hlo,
                 ",".join(str(v) for v in visibility),
                 *(f"{name}={getattr(copts, name)!r}" for name in sorted(dir(copts)) if not name.startswith("_"))):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def compiled(hlo: str, visibility: Sequence[libspu.Visibility], copts: libspu.CompilerOptions,
             compile_fn: Optional[Callable[[libspu.CompilationSource, libspu.CompilerOptions], bytes]] = None) -> bytes:
    """The executable code SPU compiles the canonical HLO text ``hlo`` to, for inputs of ``visibility``, with
    ``copts``: from the cache when it holds it, else compiled (by ``compile_fn``, SPU's compiler by default) and
    stored."""
    compile_fn = compile_fn or libspu.compile

    def compile_now() -> bytes:
        module = xla_extension.hlo_module_from_text(hlo).as_serialized_hlo_module_proto()
        return compile_fn(libspu.CompilationSource(libspu.SourceIRType.XLA, module, list(visibility)), copts)

    directory = cache_dir()
    if directory is None:
        return compile_now()
    _private_directory(directory)
    entry = directory / (source_key(hlo, visibility, copts) + _SUFFIX)
    code = _read(entry)
    if code is not None:
        return code
    with _turn(entry.with_suffix(".lock")):
        code = _read(entry)  # compiled by the process whose turn it was
        if code is None:
            code = compile_now()
            _write(entry, code)
            _evict(directory, keep=entry)
    return code


def _private_directory(directory: Path) -> None:
    """Make ``directory`` (0700) if it is missing; refuse one that is not this user's alone."""
    if directory.exists() and not directory.is_dir():
        raise CompileCacheError(f"compile cache {directory} is not a directory; set {ENV} to one, or to off")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as e:
        raise CompileCacheError(f"compile cache {directory}: {e.strerror or e}; set {ENV}=off to compile without one") from e
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CompileCacheError(
            f"compile cache {directory} is owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}: "
            f"its executables would run on secret shares, so it must be this user's (uid {os.getuid()}) and "
            f"writable by no one else (chmod 700), or set {ENV} to another directory, or to off")


def _read(entry: Path) -> Optional[bytes]:
    """The entry's code, or None when there is none; a damaged entry (its digest does not match) is removed."""
    try:
        data = entry.read_bytes()
    except FileNotFoundError:
        return None
    header, _, code = data.partition(b"\n")
    if not header.startswith(_HEADER) or header[len(_HEADER):].decode("ascii", "replace") != hashlib.sha256(code).hexdigest():
        entry.unlink(missing_ok=True)
        return None
    try:
        os.utime(entry)  # recently used: kept longest
    except OSError:
        pass
    return code


def _write(entry: Path, code: bytes) -> None:
    """Store ``code`` under ``entry`` whole or not at all (a file of this user's alone, renamed into place)."""
    fd, temporary = tempfile.mkstemp(dir=entry.parent, prefix=".writing-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_HEADER + hashlib.sha256(code).hexdigest().encode() + b"\n" + code)
        os.replace(temporary, entry)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class _turn:
    """An exclusive lock on ``path`` among processes (flock), waited for at most LOCK_WAIT_S: past that the caller
    goes on without it (it then compiles what the holder compiles: the same work twice, never a wrong entry)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self):
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return self
                time.sleep(_POLL_S)

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock if it was taken


def _evict(directory: Path, keep: Path) -> None:
    """Remove the least recently used entries (and their locks) while the entries take more than MAX_BYTES."""
    entries = []
    for path in directory.glob("*" + _SUFFIX):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        entries.append((info.st_mtime, info.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= MAX_BYTES:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            path.with_suffix(".lock").unlink(missing_ok=True)
            total -= size
