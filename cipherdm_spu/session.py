"""SecureSession: three SPU parties in this process, over SPU's in-memory link.

The one-process form of the three parties, for development, tests and benchmarks: this process plays
every role, so it is no deployment (a `spu-launch` cluster is; see `cipherdm_spu.party`). It compiles a JAX function to an SPU executable once per (function, input shapes and visibilities),
secret-shares inputs with SPU's Io, keeps values resident in the parties by name between runs, and
reveals outputs only when asked. Every run leaves a cost report in ``session.last_stats``.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
import spu
import spu.libspu as libspu
from spu.utils import frontend as spu_fe

from . import compile_cache, public_constants, registry, spu_config
from .errors import CompileCacheError, InputError, SessionError
from .profiling import PARTY_PROFILE_FLAGS, RunStats, SpuLog, parse_run

WORLD_SIZE = 3
# SPU's logger is process-wide, so runs that parse it must not overlap.
_RUN_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Public:
    """Marks an input as public: every party sees it in the clear (timesteps, schedule constants)."""

    value: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Secret:
    """A value resident in the three parties, known to Python only by name, shape and dtype."""

    name: str
    shape: Tuple[int, ...]
    dtype: np.dtype
    visibility: str  # "secret" or "public"
    session_id: str

    def __repr__(self) -> str:
        return f"Secret({self.name!r}, shape={self.shape}, dtype={self.dtype}, {self.visibility})"


@dataclasses.dataclass
class CompiledFunction:
    """One SPU executable and what is needed to bind it to named values."""

    name: str
    code: bytes
    in_specs: Tuple[Tuple[Tuple[int, ...], str, str], ...]
    out_tree: Any
    out_avals: List[jax.ShapeDtypeStruct]

    @property
    def mlir(self) -> str:
        """The SPU IR (pphlo MLIR) text."""
        return self.code.decode("utf-8")


_VIS = {"secret": libspu.Visibility.VIS_SECRET, "public": libspu.Visibility.VIS_PUBLIC}


def _is_leaf(x) -> bool:
    return isinstance(x, (Secret, Public))


def _canonical_array(value, what: str, limit: float = float("inf")) -> np.ndarray:
    """The numpy array JAX would see for ``value``, after refusing what SPU cannot take."""
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - anything numpy cannot turn into an array
        raise InputError(f"{what}: cannot be turned into an array ({e})") from None
    kind = arr.dtype.kind
    if kind not in "fiub":
        raise InputError(f"{what}: dtype {arr.dtype} is not supported (use float, int or bool)")
    if kind == "f" and not np.all(np.isfinite(arr)):
        raise InputError(f"{what}: contains NaN or infinity; refusing to share it")
    if arr.size and kind in "fiu" and np.max(np.abs(arr.astype(np.float64))) >= limit:
        raise InputError(f"{what}: holds values beyond the fixed-point range (|x| < {limit:.3g}); refusing to share it")
    dtype = jax.dtypes.canonicalize_dtype(arr.dtype)
    return np.ascontiguousarray(arr.astype(dtype, copy=False))


class LocalParties:
    """The three parties as SPU runtimes in this process, over SPU's in-memory link."""

    def __init__(self, config, session_id: str, recv_timeout_s: float, log_file: Optional[str]):
        SpuLog.get(log_file)  # SPU's log is process-wide: the newest session's log_file wins
        self._pool = cf.ThreadPoolExecutor(WORLD_SIZE, thread_name_prefix=f"spu-party-{session_id}")
        desc = libspu.link.Desc()
        desc.id = f"cipherdm-{session_id}"
        desc.recv_timeout_ms = int(recv_timeout_s * 1000)
        for rank in range(WORLD_SIZE):
            desc.add_party(f"party{rank}", f"mem:{session_id}:{rank}")

        def start_party(rank: int) -> spu.Runtime:
            cfg = libspu.RuntimeConfig(config)
            cfg.enable_pphlo_profile, cfg.enable_hal_profile = PARTY_PROFILE_FLAGS[rank]
            return spu.Runtime(libspu.link.create_mem(desc, rank), cfg)

        self._runtimes: List[spu.Runtime] = self._on_parties(start_party)

    def put(self, name: str, shares) -> None:
        """Give party i its share i only."""
        for rt, share in zip(self._runtimes, shares):
            rt.set_var(name, share)

    def fetch(self, name: str) -> list:
        return [rt.get_var(name) for rt in self._runtimes]

    def delete(self, names: Sequence[str]) -> None:
        for rt in self._runtimes:
            for name in names:
                rt.del_var(name)

    def run(self, executable) -> RunStats:
        with _RUN_LOCK:
            log = SpuLog.get()  # wherever SPU logs now (a later session may have moved it)
            offset = log.offset()
            start = time.perf_counter()
            self._on_parties(lambda rank: self._runtimes[rank].run(executable))
            seconds = time.perf_counter() - start
            return parse_run(log.read_from(offset), seconds)

    def close(self) -> None:
        self._runtimes = []
        self._pool.shutdown(wait=True)

    def _on_parties(self, job: Callable[[int], Any]) -> List[Any]:
        """Run ``job(rank)`` for the three parties concurrently; raise the first failure."""
        futures = [self._pool.submit(job, rank) for rank in range(WORLD_SIZE)]
        results, errors = [], []
        for rank, fut in enumerate(futures):
            try:
                results.append(fut.result())
            except Exception as e:  # noqa: BLE001 - re-raised below with the party named
                errors.append((rank, e))
        if errors:
            rank, err = errors[0]
            raise SessionError(f"party {rank} failed: {err}") from err
        return results


def compile_function(fn: Callable, in_tree, specs, protocol_set: registry.ProtocolSet,
                     fraction_bits: int) -> CompiledFunction:
    """Compile ``fn`` to an SPU executable for flat inputs ``specs`` ((shape, dtype, visibility) each,
    arranged by ``in_tree``), with ``protocol_set``'s kernels and compiler options. Deterministic: the
    same function and inputs give the same bytes in any process (the parties of a cluster rely on it).

    JAX lowers ``fn`` as SPU's frontend lowers it (its `compile`, with SPU's compile split off), and SPU compiles
    the lowered module's canonical form only where `compile_cache` does not hold the executable already."""

    def flat_fn(*flat):
        with registry.use_protocol(protocol_set):
            return fn(*jax.tree_util.tree_unflatten(in_tree, flat))

    flat_fn.__name__ = getattr(fn, "__name__", type(fn).__name__)
    abstract = [jax.ShapeDtypeStruct(shape, np.dtype(dtype)) for shape, dtype, _ in specs]
    try:
        # SPU 0.9.5's frontend (pinned in setup.cfg): its private lock, lax.sort patch and lowering, as its `compile`
        # uses them
        with registry.fixed_point(fraction_bits), spu_fe._jax_lock:
            patches = spu_fe._patch_jax()  # SPU's fix of lax.sort for fixed point, process-wide while it lowers
            try:
                hlo, out_info = spu_fe._jax_compilation(flat_fn, (), None, abstract, {})
            finally:
                spu_fe._restore_jax_patch(patches)
        code = compile_cache.executable(compile_cache.canonical_hlo(hlo), [_VIS[vis] for _, _, vis in specs],
                                        spu_config.compiler_options(protocol_set.compiler))
    except CompileCacheError:
        raise
    except (TypeError, ValueError) as e:
        shapes = ", ".join(f"{dtype}{list(shape)}" for shape, dtype, _ in specs)
        raise InputError(f"{flat_fn.__name__} cannot be traced on inputs ({shapes}): {e}") from e
    public_constants.check(code.decode("utf-8"), fraction_bits, flat_fn.__name__)
    out_flat, out_tree = jax.tree_util.tree_flatten(out_info)
    return CompiledFunction(
        name=flat_fn.__name__,
        code=code,
        in_specs=specs,
        out_tree=out_tree,
        out_avals=[jax.ShapeDtypeStruct(o.shape, o.dtype) for o in out_flat],
    )


class SecureSession:
    """Three SPU parties (ABY3, FM64, 18 fraction bits by default) in this process.

    >>> session = SecureSession(protocol="cipherdm")
    >>> y = session.run(lambda x: ops.silu(x) * 2.0, np.ones(4, np.float32))
    >>> session.last_stats.bytes_sent
    """

    def __init__(
        self,
        protocol: Union[str, registry.ProtocolSet] = "cipherdm",
        overrides: Optional[Mapping[str, str]] = None,
        *,
        spu_protocol: str = "ABY3",
        field: str = "FM64",
        fraction_bits: int = 18,
        log_file: Optional[str] = None,
        recv_timeout_s: float = 600.0,
    ):
        self.protocol = registry.resolve(protocol, overrides)
        registry.validate(self.protocol)
        self.config = spu_config.runtime_config(
            self.protocol.runtime, protocol=spu_protocol, field=field, fraction_bits=fraction_bits
        )
        self.id = uuid.uuid4().hex[:12]
        self.last_stats: Optional[RunStats] = None
        self.total_stats = RunStats.zero()
        self._io = spu.Io(WORLD_SIZE, self.config)
        self._limit = spu_config.largest_magnitude(field, fraction_bits)
        self._cache: Dict[tuple, CompiledFunction] = {}
        self._names = itertools.count()
        self._resident: Dict[str, Secret] = {}
        self._parties = LocalParties(self.config, self.id, recv_timeout_s, log_file)

    # ------------------------------------------------------------------------------------------
    # public API

    def share(self, value, *, public: bool = False, name: Optional[str] = None):
        """Secret-share a value (a pytree of arrays) into the parties; returns Secret handles.

        The handles can be passed to `run` any number of times (model weights are shared once).
        """
        leaves, tree = jax.tree_util.tree_flatten(value)
        if name is not None and len(leaves) != 1:
            raise InputError("name= can only be given when sharing a single array")
        vis = "public" if public else "secret"
        handles = []
        for i, leaf in enumerate(leaves):
            arr = _canonical_array(leaf, f"value {i}", self._limit)
            handles.append(self._put(arr, vis, name))
        return jax.tree_util.tree_unflatten(tree, handles)

    def run(self, fn: Callable, *args, reveal: bool = True):
        """Run ``fn(*args)`` under MPC.

        ``args`` are pytrees whose leaves are arrays (secret-shared by the caller's side), `Public`
        values, or `Secret` handles already resident. With ``reveal=True`` the outputs come back as
        numpy arrays in ``fn``'s output structure; with ``reveal=False`` they stay resident and come
        back as `Secret` handles.
        """
        self._check_open()
        leaves, in_tree = jax.tree_util.tree_flatten(args, is_leaf=_is_leaf)
        prepared = [self._prepare(leaf, i) for i, leaf in enumerate(leaves)]
        compiled = self._compile(fn, in_tree, tuple(spec for spec, _ in prepared))

        temporaries = []
        input_names = []
        for (spec, payload) in prepared:
            if isinstance(payload, Secret):
                input_names.append(payload.name)
            else:
                handle = self._put(payload, spec[2])
                temporaries.append(handle)
                input_names.append(handle.name)
        output_names = [self._fresh_name("out") for _ in compiled.out_avals]
        executable = libspu.Executable(
            name=compiled.name, input_names=input_names, output_names=output_names, code=compiled.code
        )
        try:
            self.last_stats = self._parties.run(executable)
            self.total_stats = self.total_stats + self.last_stats
        finally:
            self.delete(temporaries)

        outputs = []
        for name, aval in zip(output_names, compiled.out_avals):
            handle = Secret(name, tuple(aval.shape), np.dtype(aval.dtype), "secret", self.id)
            self._resident[name] = handle
            outputs.append(handle)
        if reveal:
            values = [self._reconstruct(h) for h in outputs]
            self.delete(outputs)
            outputs = values
        return jax.tree_util.tree_unflatten(compiled.out_tree, outputs)

    def reveal(self, handles):
        """Reconstruct resident values (a pytree of Secret handles) as numpy arrays."""
        self._check_open()
        return jax.tree_util.tree_map(
            lambda h: self._reconstruct(self._check_handle(h)), handles, is_leaf=_is_leaf
        )

    def delete(self, handles) -> None:
        """Drop resident values from every party."""
        for h in jax.tree_util.tree_leaves(handles, is_leaf=_is_leaf):
            if isinstance(h, Secret) and self._resident.pop(h.name, None) is not None and self._parties:
                self._parties.delete([h.name])

    def compile(self, fn: Callable, *args) -> CompiledFunction:
        """Compile (or fetch from the cache) ``fn`` for inputs shaped like ``args``; shares nothing."""
        self._check_open()
        leaves, in_tree = jax.tree_util.tree_flatten(args, is_leaf=_is_leaf)
        specs = tuple(self._prepare(leaf, i)[0] for i, leaf in enumerate(leaves))
        return self._compile(fn, in_tree, specs)

    @property
    def resident(self) -> List[Secret]:
        """The values now resident in the parties."""
        return list(self._resident.values())

    def close(self) -> None:
        if self._parties is not None:
            parties, self._parties = self._parties, None
            self._resident.clear()
            parties.close()

    def __enter__(self) -> "SecureSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SecureSession(protocol={self.protocol.name!r}, resident={len(self._resident)})"

    # ------------------------------------------------------------------------------------------
    # internals

    def _check_open(self) -> None:
        if self._parties is None:
            raise SessionError("this SecureSession is closed")

    def _check_handle(self, h) -> Secret:
        if not isinstance(h, Secret):
            raise InputError(f"expected a Secret handle, got {type(h).__name__}")
        if h.session_id != self.id:
            raise InputError(f"{h!r} belongs to another session")
        if h.name not in self._resident:
            raise InputError(f"{h!r} is no longer resident (deleted or revealed)")
        return h

    def _prepare(self, leaf, index: int):
        """(spec, payload) for one input leaf; spec = (shape, dtype, visibility)."""
        if isinstance(leaf, Secret):
            self._check_handle(leaf)
            return (leaf.shape, str(leaf.dtype), leaf.visibility), leaf
        if isinstance(leaf, Public):
            arr = _canonical_array(leaf.value, f"input {index} (public)", self._limit)
            return (arr.shape, str(arr.dtype), "public"), arr
        arr = _canonical_array(leaf, f"input {index}", self._limit)
        return (arr.shape, str(arr.dtype), "secret"), arr

    def _compile(self, fn: Callable, in_tree, specs) -> CompiledFunction:
        key = (fn, in_tree, specs)
        try:
            cached = self._cache.get(key)
        except TypeError:  # an unhashable callable: compile every time
            cached, key = None, None
        if cached is not None:
            return cached
        compiled = compile_function(fn, in_tree, specs, self.protocol, self.config.fxp_fraction_bits)
        if key is not None:
            self._cache[key] = compiled
        return compiled

    def _fresh_name(self, prefix: str) -> str:
        return f"{prefix}-{self.id}-{next(self._names)}"

    def _put(self, arr: np.ndarray, visibility: str, name: Optional[str] = None) -> Secret:
        self._check_open()
        name = name or self._fresh_name("val")
        if name in self._resident:
            raise InputError(f"a resident value is already called {name!r}")
        self._parties.put(name, self._io.make_shares(arr, _VIS[visibility]))
        handle = Secret(name, tuple(arr.shape), arr.dtype, visibility, self.id)
        self._resident[name] = handle
        return handle

    def _reconstruct(self, h: Secret) -> np.ndarray:
        return np.asarray(self._io.reconstruct(self._parties.fetch(h.name))).reshape(h.shape)
