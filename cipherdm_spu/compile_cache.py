"""A directory of compiled SPU executables, keyed by what SPU's compiler reads.

SPU 0.9.5 spends most of a compile in XLA's HLO passes and the verifier it runs after each of them, and every
process compiles its programs again: each run of a script, and each of a cluster's three parties. An executable
is a function of the compiler's input alone, so it is stored under the SHA-256 of that input and read back by a
later compile of the same input. The input is the program's canonical HLO text (`canonical_hlo`: no ids, no
source locations, every constant written out), parsed back into the module SPU compiles, so the key (that text, the
inputs' visibilities, the compiler options and the versions of SPU and jaxlib) determines what is compiled.
docs/results/compile_cache.md measures what it saves.

Trust: an entry is code that will run on secret shares, so no one but this user (and root) may be able to change
the directory, an entry, or anything on its path: the directory is opened through `private_dir` (its whole path
walked and checked from /, missing directories made 0700), and entries, locks and temporary files are reached
through its descriptor; every entry must be a regular file of this user's with mode 600, as entries are written, and
anything else is refused. Each entry carries the digest of its code; one that does not match (a torn or damaged file)
is discarded and compiled again. What is read back is checked exactly as a fresh compile is (a party's audit of the
IR, the parties' agreement on the executable's digest), though a planted program whose outputs stay secret would pass
the audit: the directory's checks are the defence.

``$CIPHERDM_COMPILE_CACHE`` names the directory, or ``off`` turns the cache off; by default it is
``$XDG_CACHE_HOME/cipherdm-spu/executables`` (``~/.cache/...``). Processes compiling the same input at once (the
parties of a cluster on one machine) take turns on a lock per entry, so one compiles and the others read. A cache
that cannot be made or store (no home, a full disk, a read-only directory, a file system without locks) costs only
the time it would have saved: the compile's result is returned and a warning says why it was not kept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import jaxlib
import spu
import spu.libspu as libspu
from jaxlib import xla_extension

from . import private_dir
from .errors import CompileCacheError, PrivatePathError

ENV = "CIPHERDM_COMPILE_CACHE"
#: the entries kept, in bytes: beyond it the least recently used are removed after a write
MAX_BYTES = 4 * 2**30
#: how long a compile waits for another process compiling the same input before compiling it too
LOCK_WAIT_S = 900.0
#: after this long waiting, a compile says what it waits for
LOCK_NOTICE_S = 10.0
#: a temporary file older than this was left by a process that died writing it, and is removed
STALE_WRITE_S = 3600.0
_POLL_S = 0.2
_HEADER = b"cipherdm-spu executable sha256="
_SUFFIX = ".spu"
_WRITING = ".writing-"
_OFF = ("off", "0", "none", "false", "")
_NO_FOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def cache_dir() -> Optional[Path]:
    """The cache's directory from the environment (absolute), or None when it is turned off (``off``, ``0``,
    ``none``, ``false`` or empty). RuntimeError when the default is asked for and there is no absolute home."""
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in _OFF:
        return None
    if value:
        return Path(os.path.abspath(Path(value).expanduser()))
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative value is ignored
        if os.environ.get("HOME") == "":  # expanduser would make it /
            raise RuntimeError("HOME is empty")
        home = Path.home()  # RuntimeError where HOME is unset and the user has no entry in passwd
        if not home.is_absolute():
            raise RuntimeError(f"the home directory {str(home)!r} is not an absolute path")
        base = str(home / ".cache")
    return Path(base) / "cipherdm-spu" / "executables"


def canonical_hlo(hlo_module_proto: bytes) -> str:
    """A serialized HLO module as canonical text: instructions and computations renamed in order, without ids or
    metadata (source locations), every constant and backend configuration in full. JAX's lowering of one function
    differs between calls only in what this leaves out. (A -0.0 constant is written as 0, which parses back as +0.0:
    the same number in fixed point, where SPU computes.)"""
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


def executable(hlo: str, visibility: Sequence[libspu.Visibility], copts: libspu.CompilerOptions,
               compile_fn: Optional[Callable[[libspu.CompilationSource, libspu.CompilerOptions], bytes]] = None) -> bytes:
    """The executable code SPU compiles the canonical HLO text ``hlo`` to, for inputs of ``visibility``, with
    ``copts``: from the cache when it holds it, else compiled (by ``compile_fn``, SPU's compiler by default) and
    stored."""
    compile_fn = compile_fn or libspu.compile

    def compile_now() -> bytes:
        module = xla_extension.hlo_module_from_text(hlo).as_serialized_hlo_module_proto()
        return compile_fn(libspu.CompilationSource(libspu.SourceIRType.XLA, module, list(visibility)), copts)

    try:
        directory = cache_dir()
    except RuntimeError as e:  # no home to keep a cache in
        return _unstored(compile_now(), Path("~"), e, "compiled without the cache, which has no home")
    if directory is None:
        return compile_now()
    name = source_key(hlo, visibility, copts) + _SUFFIX
    try:
        with _private_directory(directory) as dir_fd:
            code = _read(dir_fd, name, directory)
            if code is not None:
                return code
            try:
                lock = _open_lock(dir_fd, name + ".lock")
            except OSError as e:
                return _unstored(compile_now(), directory, e)
            try:
                _wait_for_lock(lock, directory, name)
                code = _read(dir_fd, name, directory)  # compiled by the process whose turn it was
                if code is not None:
                    return code
                code = compile_now()
                try:
                    _write(dir_fd, name, code)
                except OSError as e:
                    return _unstored(code, directory, e)
                try:
                    _evict(dir_fd, keep=name)
                except OSError as e:
                    return _unstored(code, directory, e, "stored, but older entries were not removed")
                return code
            finally:
                os.close(lock)  # releases the lock if it was taken
    except _Unusable as e:
        return _unstored(compile_now(), directory, e.__cause__ or e, "compiled without the cache, which is unusable")


def check_directory() -> Optional[Path]:
    """The cache's directory, checked as a compile would check it (`CompileCacheError` where it is refused; a warning
    where it cannot be made), or None when the cache is off: for a service to find a bad cache when it starts."""
    try:
        directory = cache_dir()
    except RuntimeError as e:
        warnings.warn(f"compile cache: none ({e}); compiles will not be kept", RuntimeWarning, stacklevel=2)
        return None
    if directory is not None:
        try:
            with _private_directory(directory):
                pass
        except _Unusable as e:
            warnings.warn(f"compile cache {directory} is unusable ({e.__cause__ or e}); compiles will not be kept",
                          RuntimeWarning, stacklevel=2)
    return directory


def _unstored(code: bytes, directory: Path, error: OSError, what: str = "compiled but not stored") -> bytes:
    warnings.warn(f"compile cache {directory}: the executable was {what} ({error})", RuntimeWarning, stacklevel=3)
    return code


class _Unusable(Exception):
    """The directory cannot be made or reached (no home, a read-only disk): the compile goes on without a cache."""


def _refuse(directory: Path, what: str) -> CompileCacheError:
    return CompileCacheError(
        f"compile cache {directory}: {what}. Its executables run on secret shares, so no one but this user "
        f"(uid {os.getuid()}) and root may be able to change it, an entry in it or a directory on its path; "
        f"set {ENV} to another directory, or to off")


@contextlib.contextmanager
def _private_directory(directory: Path) -> Iterator[int]:
    """The cache directory's descriptor (`private_dir.open_folder`), closed after the block."""
    try:
        fd = private_dir.open_folder(directory).fd
    except PrivatePathError as e:
        raise _refuse(directory, str(e)) from None
    except OSError as e:  # no home, a read-only disk, an unreadable directory on the path, too many open files, ...
        raise _Unusable(e) from e
    try:
        yield fd
    finally:
        os.close(fd)


def _read(dir_fd: int, name: str, directory: Path) -> Optional[bytes]:
    """The entry's code, or None when there is none; a damaged entry (its digest does not match) is removed, and one
    that is not a regular file of this user's with mode 600 (as `_write` makes them) is refused."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NO_FOLLOW, dir_fd=dir_fd)  # a FIFO must not block
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EACCES):  # a symlink, or a file this user may not read: not its entry
            raise _refuse(directory, f"entry {name} cannot be opened as a file of this user's ({e})") from e
        raise _Unusable(e) from e
    with os.fdopen(fd, "rb") as f:
        try:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != 0o600:
                raise _refuse(directory, f"entry {name} is not a regular file of this user's with mode 600, as "
                                         "entries are written")
            data = f.read()
        except OSError as e:
            raise _Unusable(e) from e
    header, _, code = data.partition(b"\n")
    if not header.startswith(_HEADER) or header[len(_HEADER):].decode("ascii", "replace") != hashlib.sha256(code).hexdigest():
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        return None
    with contextlib.suppress(OSError):
        os.utime(name, dir_fd=dir_fd, follow_symlinks=False)  # recently used: kept longest
    return code


def _write(dir_fd: int, name: str, code: bytes) -> None:
    """Store ``code`` as entry ``name`` whole or not at all (a new file of this user's alone, renamed into place)."""
    temporary = f"{_WRITING}{os.getpid()}-{secrets.token_hex(8)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_HEADER + hashlib.sha256(code).hexdigest().encode() + b"\n" + code)
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=dir_fd)
        raise


def _open_lock(dir_fd: int, name: str) -> int:
    """The descriptor of lock file ``name`` in the directory (made 0600 if missing); OSError if it cannot be opened or
    is not a regular file."""
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | _NO_FOLLOW, 0o600, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"the lock {name} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _wait_for_lock(fd: int, directory: Path, name: str) -> None:
    """Take the exclusive lock (flock) on ``fd``, waiting at most LOCK_WAIT_S (and saying so after LOCK_NOTICE_S):
    past that, or where the file system cannot lock, the caller goes on without it (it then compiles what the holder
    compiles: the same work twice, never a wrong entry)."""
    started, noticed = time.monotonic(), False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            waited = time.monotonic() - started
            if waited > LOCK_WAIT_S:
                return
            if waited > LOCK_NOTICE_S and not noticed:
                noticed = True
                warnings.warn(f"compile cache {directory}: waiting (up to {LOCK_WAIT_S:.0f} s) for another process "
                              f"compiling the same program ({name}.lock)", RuntimeWarning, stacklevel=3)
            time.sleep(_POLL_S)
        except OSError as e:  # no locks on this file system (ENOLCK, ...)
            warnings.warn(f"compile cache {directory}: compiling without the lock ({e})", RuntimeWarning, stacklevel=3)
            return


def _evict(dir_fd: int, keep: str) -> None:
    """Remove temporary files a dead writer left, and locks of compiles that failed (older than STALE_WRITE_S), then
    the least recently used entries (and their locks) while the entries take more than MAX_BYTES."""
    entries, stale, now = [], [], time.time()
    with os.scandir(dir_fd) as listing:
        for item in listing:
            try:
                info = item.stat(follow_symlinks=False)
            except OSError:
                continue
            if item.name.endswith(_SUFFIX):
                entries.append((info.st_mtime, info.st_size, item.name))
            elif now - info.st_mtime > STALE_WRITE_S and (item.name.startswith(_WRITING) or item.name.endswith(".lock")):
                stale.append(item.name)
    names = {name for _, _, name in entries}
    for name in stale:
        if not name.endswith(".lock") or name[:-len(".lock")] not in names:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
    total = sum(size for _, size, _ in entries)
    for _, size, name in sorted(entries):
        if total <= MAX_BYTES:
            break
        if name != keep:
            for victim in (name, name + ".lock"):
                with contextlib.suppress(OSError):
                    os.unlink(victim, dir_fd=dir_fd)
            total -= size
