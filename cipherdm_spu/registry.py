"""The kernel registry: the kernels of each op, and the protocol sets that choose among them.

Words: a *kernel* is one implementation of an op of `cipherdm_spu.ops`, a plain JAX function registered
under a name (``"jax"``, ``"cipherdm"``, ...); a *protocol set* names one kernel per op plus the SPU
runtime/compiler options they assume (``configs/protocols/NAME.json``, or registered from Python); SPU's
*MPC protocol* (ABY3) is the session's, never a set's. The built-in kernels live in `cipherdm_spu.protocols`
and register when the package is imported; this module imports nothing above it.

The protocol set in force is chosen with :func:`use_protocol` and read when an op is *traced*, so the same
model code compiles to different SPU programs under different sets.

A protocol-set JSON file is an object with ``kernels`` (op -> kernel name, every op of OPS), and optionally
``name`` (default: the file's stem), ``description``, ``runtime`` (fields of ``spu.RuntimeConfig``, enum
values by name, e.g. ``"EXP_PADE"``) and ``compiler`` (boolean fields of ``spu.CompilerOptions``).

Registering a new kernel from outside the package takes a few lines::

    from cipherdm_spu import registry

    @registry.register_kernel("silu", "relu-only")
    def silu_relu_only(x):
        return jnp.maximum(x, 0.0)

    with registry.use_protocol("cipherdm", overrides={"silu": "relu-only"}):
        ...  # trace / compile here

A kernel takes what its op in `cipherdm_spu.ops` binds: the input and the op's own keyword parameters
(softmax: ``axis``, ``exp_impl``, ``scale``, and where attention hands them the ``values`` its rows weigh, returning
softmax @ values: a kernel without that parameter gets the product after it; gelu: ``approximate``), and for rsqrt an
optional second operand and a
public scale: ``def kernel(x, times=None, *, scale=1.0)`` returning times / sqrt(scale * x). An exp kernel also takes
the public scale a softmax hands it, ``def kernel(x, scale=1.0)`` returning e^(scale * x), so that a kernel can fold
it into its own products.

A kernel whose form depends on its call's size may carry ``for_call_size(elements)``: the kernel as a call of that
many elements runs it, on an input of any size, so that a cost model can price a call too large to run by a smaller
one in the large call's form. An rsqrt kernel may carry ``centres_norms_in_one_truncation = True``: the norms that
call it (`models.normalization`) then take their deviations from the mean in one truncation, scaled by a public
factor near 1, rather than the mean first (fewer rounds, more bytes).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional, Union

from . import spu_config
from .errors import ProtocolError

#: The ops every protocol set must provide, and the kernel name of their vanilla JAX form.
OPS = ("silu", "mish", "gelu", "sigmoid", "softmax", "exp", "rsqrt")
VANILLA = "jax"
#: The protocol sets configs/protocols ships, in the order every table lists them: vanilla SPU first, ours last.
SHIPPED_SETS = ("spu", "spu-pade", "cipherdm-paper", "cipherdm", "cipherdm-low-byte")
#: The protocol set every measurement is compared against: vanilla SPU.
BASELINE = SHIPPED_SETS[0]

_KERNELS: Dict[str, Dict[str, Callable]] = {op: {} for op in OPS}
_PROTOCOL_SETS: Dict[str, "ProtocolSet"] = {}
_ACTIVE: contextvars.ContextVar[Optional["ProtocolSet"]] = contextvars.ContextVar(
    "cipherdm_protocol_set", default=None
)
_FIXED_POINT: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("cipherdm_fixed_point", default=None)
_LOOP_BODY: contextvars.ContextVar[bool] = contextvars.ContextVar("cipherdm_loop_body", default=False)


@dataclasses.dataclass(frozen=True)
class ProtocolSet:
    """One kernel name per op, plus the SPU options the kernels assume.

    runtime: fields of ``spu.RuntimeConfig`` (enum values by name, e.g. ``"EXP_PADE"``).
    compiler: fields of ``spu.CompilerOptions``.
    """

    name: str
    kernels: Mapping[str, str]
    runtime: Mapping[str, object] = dataclasses.field(default_factory=dict)
    compiler: Mapping[str, object] = dataclasses.field(default_factory=dict)
    description: str = ""


# ----------------------------------------------------------------------------------------------
# kernels


def register_kernel(op: str, impl: str, fn: Optional[Callable] = None):
    """Register ``fn`` as the kernel named ``impl`` of ``op``; usable as a decorator."""
    if op not in _KERNELS:
        raise ProtocolError(f"unknown op {op!r}; known ops: {', '.join(OPS)}")

    def _register(f: Callable) -> Callable:
        _KERNELS[op][impl] = f
        return f

    return _register(fn) if fn is not None else _register


def kernel(op: str, impl: str) -> Callable:
    """The kernel registered as ``impl`` of ``op``."""
    try:
        return _KERNELS[op][impl]
    except KeyError:
        known = ", ".join(sorted(_KERNELS.get(op, {}))) or "none"
        raise ProtocolError(f"no kernel {impl!r} registered for op {op!r} (registered: {known})") from None


# ----------------------------------------------------------------------------------------------
# protocol sets


def protocol_set_dirs() -> list[Path]:
    """Where protocol-set JSON files are looked up, first match wins."""
    dirs = [Path(p) for p in os.environ.get("CIPHERDM_PROTOCOLS_PATH", "").split(os.pathsep) if p]
    dirs.append(Path(__file__).resolve().parent.parent / "configs" / "protocols")  # source checkout
    # a wheel's data files (setup.cfg) go under the install scheme's data path: sys.prefix in a venv, /usr/local for
    # a system Python's pip on Debian
    for data in dict.fromkeys([sysconfig.get_path("data"), sys.prefix]):
        dirs.append(Path(data) / "share" / "cipherdm-spu" / "protocols")
    return dirs


def load_protocol_file(path: Union[str, Path]) -> ProtocolSet:
    """Parse one protocol-set JSON file (its keys: this module's docstring)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ProtocolError(f"cannot read protocol set {path}: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("kernels"), dict):
        raise ProtocolError(f"{path}: a protocol set is an object with a 'kernels' object")
    unknown = set(spec) - {"name", "description", "kernels", "runtime", "compiler"}
    if unknown:
        raise ProtocolError(f"{path}: unknown keys {sorted(unknown)}")
    return ProtocolSet(
        name=spec.get("name", path.stem),
        kernels=dict(spec["kernels"]),
        runtime=dict(spec.get("runtime", {})),
        compiler=dict(spec.get("compiler", {})),
        description=spec.get("description", ""),
    )


def register_protocol_set(pset: ProtocolSet) -> ProtocolSet:
    """Make ``pset`` selectable by name (replaces a set of the same name)."""
    validate(pset)
    _PROTOCOL_SETS[pset.name] = pset
    return pset


def validate(pset: ProtocolSet) -> None:
    """Refuse a set that misses an op or names an unregistered kernel or SPU option."""
    missing = [op for op in OPS if op not in pset.kernels]
    if missing:
        raise ProtocolError(f"protocol set {pset.name!r} names no kernel for {missing}")
    for op, impl in pset.kernels.items():
        if op not in _KERNELS:
            raise ProtocolError(f"protocol set {pset.name!r}: unknown op {op!r}")
        if impl not in _KERNELS[op]:
            raise ProtocolError(
                f"protocol set {pset.name!r}: no kernel {impl!r} for op {op!r} "
                f"(registered: {', '.join(sorted(_KERNELS[op]))})"
            )
    spu_config.check_options(pset)


#: what a protocol set may be called (a file's stem): letters, digits, '.', '_', '-'; no path
_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def protocol_set(name: str) -> ProtocolSet:
    """The protocol set called ``name``: registered in Python, or a JSON file on protocol_set_dirs()."""
    if name in _PROTOCOL_SETS:
        return _PROTOCOL_SETS[name]
    if not isinstance(name, str) or not _SET_NAME.fullmatch(name):  # a name, never a path
        raise ProtocolError(f"unknown protocol set {name!r}; available: {', '.join(available_protocol_sets())}")
    for d in protocol_set_dirs():
        f = d / f"{name}.json"
        if f.is_file():
            pset = load_protocol_file(f)
            if pset.name != name:
                raise ProtocolError(f"{f}: names itself {pset.name!r}; a protocol set file is named after its set")
            return register_protocol_set(pset)
    raise ProtocolError(f"unknown protocol set {name!r}; available: {', '.join(available_protocol_sets())}")


def available_protocol_sets() -> list[str]:
    """The names of every protocol set, registered in Python or a JSON file on protocol_set_dirs(): the shipped ones
    in SHIPPED_SETS' order, then the others sorted."""
    names = set(_PROTOCOL_SETS)
    for d in protocol_set_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.json"))
    return [n for n in SHIPPED_SETS if n in names] + sorted(names - set(SHIPPED_SETS))


def resolve(protocol: Union[str, ProtocolSet], overrides: Optional[Mapping[str, str]] = None) -> ProtocolSet:
    """A protocol set with per-op overrides applied.

    An override value is either a kernel name registered for that op or the name of another protocol
    set, whose kernel for that op is taken: ``{"softmax": "spu"}``. Only the kernel: the runtime and compiler
    options stay ``protocol``'s (``{"exp": "spu-pade"}`` takes that set's kernel, plain JAX, not its Pade exp mode).
    """
    pset = protocol if isinstance(protocol, ProtocolSet) else protocol_set(protocol)
    if not overrides:
        return pset
    kernels_ = dict(pset.kernels)
    for op, choice in overrides.items():
        if op not in _KERNELS:
            raise ProtocolError(f"override for unknown op {op!r}; known ops: {', '.join(OPS)}")
        if choice in _KERNELS[op]:
            kernels_[op] = choice
        elif choice in available_protocol_sets():
            kernels_[op] = protocol_set(choice).kernels[op]
        else:
            raise ProtocolError(
                f"override {op}={choice!r} is neither a kernel of {op!r} "
                f"({', '.join(sorted(_KERNELS[op]))}) nor a protocol set"
            )
    label = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return dataclasses.replace(pset, name=f"{pset.name}[{label}]", kernels=kernels_)


# ----------------------------------------------------------------------------------------------
# the active set


@contextlib.contextmanager
def use_protocol(
    protocol: Union[str, ProtocolSet, None], overrides: Optional[Mapping[str, str]] = None
) -> Iterator[Optional[ProtocolSet]]:
    """Trace the ops inside this block with the kernels of protocol set ``protocol`` (None: vanilla JAX)."""
    pset = None if protocol is None else resolve(protocol, overrides)
    token = _ACTIVE.set(pset)
    try:
        yield pset
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def fixed_point(fraction_bits: Optional[int]) -> Iterator[Optional[int]]:
    """Lower the ops inside this block for SPU's fixed point with ``fraction_bits`` (`SecureSession` sets
    it around its compiles). Kernels that work on the ring encoding of constants read it with
    :func:`fixed_point_bits`; outside such a block they compute the same values in float."""
    token = _FIXED_POINT.set(None if fraction_bits is None else int(fraction_bits))
    try:
        yield fraction_bits
    finally:
        _FIXED_POINT.reset(token)


def fixed_point_bits() -> Optional[int]:
    """The fraction bits of the SPU compile in progress, or None when lowering for plain JAX."""
    return _FIXED_POINT.get()


@contextlib.contextmanager
def loop_body() -> Iterator[None]:
    """Trace the ops inside this block as the body of a loop that SPU runs (``jax.lax.fori_loop``): SPU's compiler
    hoists a body's constants out of the loop, so a kernel whose precision rests on multiplying by a constant below
    SPU's fixed-point resolution (which SPU computes exactly only as a multiply's own constant operand:
    `cipherdm_spu.public_constants`) takes a form without one. `cipherdm_spu.ops` records it on each op it binds here
    and sets it again while the op's kernel is lowered (after this block); kernels read it with :func:`in_loop_body`."""
    token = _LOOP_BODY.set(True)
    try:
        yield
    finally:
        _LOOP_BODY.reset(token)


def in_loop_body() -> bool:
    """Whether the ops being traced are a loop's body (:func:`loop_body`)."""
    return _LOOP_BODY.get()


def active_impl(op: str) -> str:
    """The kernel name of ``op`` that the protocol set in force chooses (vanilla JAX when none is)."""
    pset = _ACTIVE.get()
    return VANILLA if pset is None else pset.kernels[op]
