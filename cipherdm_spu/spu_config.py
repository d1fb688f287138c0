"""Turn a protocol set's option dictionaries into SPU's RuntimeConfig and CompilerOptions.

Here "SPU protocol" is SPU's MPC protocol (ABY3, SEMI2K, REF2K: how shares are held and combined), never a
protocol set (the kernels `cipherdm_spu.registry` chooses).
"""

from __future__ import annotations

from typing import Mapping

import spu
import spu.libspu as libspu

from .errors import ProtocolError

#: RuntimeConfig fields whose values are enums, and how to parse their names.
_ENUM_FIELDS = {
    "fxp_exp_mode": spu.parse_exp_mode,
    "fxp_log_mode": spu.parse_log_mode,
    "sigmoid_mode": spu.parse_sigmoid_mode,
    "sort_method": spu.parse_sort_method,
}
#: The only RuntimeConfig fields a protocol set may set: how SPU approximates its own nonlinear functions.
#: Everything else is the party's: the ring and precision (the cluster config), profiling, and the fields
#: that would hurt secrecy if a client could choose them (runtime snapshots that dump shares to disk, traces,
#: a public random seed, the beaver source, the truncation's error tolerance).
APPROXIMATION_FIELDS = frozenset({
    "fxp_exp_mode", "fxp_exp_iters", "fxp_log_mode", "fxp_log_iters", "fxp_log_orders", "fxp_div_goldschmidt_iters",
    "sigmoid_mode", "enable_lower_accuracy_rsqrt", "sine_cosine_iters",
})

#: SPU's MPC protocols, by the name a config uses.
SPU_PROTOCOLS = {"ABY3": libspu.ProtocolKind.ABY3, "SEMI2K": libspu.ProtocolKind.SEMI2K, "REF2K": libspu.ProtocolKind.REF2K}
FIELDS = {"FM32": libspu.FieldType.FM32, "FM64": libspu.FieldType.FM64, "FM128": libspu.FieldType.FM128}


def check_options(pset) -> None:
    """Raise ProtocolError when a set names an SPU option that does not exist or has a bad value."""
    probe = libspu.RuntimeConfig()
    for key, value in pset.runtime.items():
        if key not in APPROXIMATION_FIELDS:
            raise ProtocolError(
                f"protocol set {pset.name!r}: runtime option {key!r} is not settable by a protocol set "
                f"(allowed: {', '.join(sorted(APPROXIMATION_FIELDS))})"
            )
        try:
            _set_runtime(probe, key, value)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"protocol set {pset.name!r}: runtime option {key}={value!r}: {e}") from None
    copts = libspu.CompilerOptions()
    for key, value in pset.compiler.items():
        if not hasattr(copts, key) or not isinstance(value, bool):
            raise ProtocolError(f"protocol set {pset.name!r}: compiler option {key}={value!r} is not a known flag")


def _set_runtime(cfg: libspu.RuntimeConfig, key: str, value) -> None:
    if key in _ENUM_FIELDS:
        value = _ENUM_FIELDS[key](value)
    setattr(cfg, key, value)


def check_ring(field, fraction_bits) -> None:
    """Raise ValueError unless ``field`` names an SPU ring and ``fraction_bits`` is an integer in 1..40."""
    if field not in FIELDS:
        raise ValueError(f"field must be one of {sorted(FIELDS)}, got {field!r}")
    if isinstance(fraction_bits, bool) or not isinstance(fraction_bits, int) or not 1 <= fraction_bits <= 40:
        raise ValueError(f"fraction_bits must be an integer in 1..40, got {fraction_bits!r}")


RING_BITS = {"FM32": 32, "FM64": 64, "FM128": 128}


def largest_magnitude(field: str, fraction_bits: int) -> float:
    """The largest |x| SPU encodes faithfully in this ring: 2^(ring bits - 2 - fraction bits). SPU clamps
    anything larger to it without a word (FM64, 18 fraction bits: 2^44, about 1.8e13), so inputs beyond
    it are refused rather than shared wrong."""
    return 2.0 ** (RING_BITS[field] - 2 - fraction_bits)


def runtime_config(
    runtime_options: Mapping[str, object], *, protocol: str = "ABY3", field: str = "FM64", fraction_bits: int = 18
) -> libspu.RuntimeConfig:
    """The RuntimeConfig every party runs with; ``protocol`` is SPU's MPC protocol (a key of SPU_PROTOCOLS)."""
    if protocol not in SPU_PROTOCOLS:
        raise ValueError(f"unknown SPU protocol {protocol!r}; use one of {sorted(SPU_PROTOCOLS)}")
    check_ring(field, fraction_bits)
    cfg = libspu.RuntimeConfig(protocol=SPU_PROTOCOLS[protocol], field=FIELDS[field], fxp_fraction_bits=int(fraction_bits))
    for key, value in runtime_options.items():
        _set_runtime(cfg, key, value)
    return cfg


def compiler_options(options: Mapping[str, bool]) -> libspu.CompilerOptions:
    copts = libspu.CompilerOptions()
    for key, value in options.items():
        setattr(copts, key, bool(value))
    return copts
