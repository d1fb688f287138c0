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
#: Fields a protocol set may not change: they are the session's (protocol, ring, precision, profiling).
_SESSION_FIELDS = {"protocol", "field", "fxp_fraction_bits", "enable_hal_profile", "enable_pphlo_profile"}

#: SPU's MPC protocols, by the name a config uses.
SPU_PROTOCOLS = {"ABY3": libspu.ProtocolKind.ABY3, "SEMI2K": libspu.ProtocolKind.SEMI2K, "REF2K": libspu.ProtocolKind.REF2K}
FIELDS = {"FM32": libspu.FieldType.FM32, "FM64": libspu.FieldType.FM64, "FM128": libspu.FieldType.FM128}


def check_options(pset) -> None:
    """Raise ProtocolError when a set names an SPU option that does not exist or has a bad value."""
    probe = libspu.RuntimeConfig()
    for key, value in pset.runtime.items():
        if key in _SESSION_FIELDS or not hasattr(probe, key):
            raise ProtocolError(f"protocol set {pset.name!r}: runtime option {key!r} is not settable here")
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


def runtime_config(
    runtime_options: Mapping[str, object], *, protocol: str = "ABY3", field: str = "FM64", fraction_bits: int = 18
) -> libspu.RuntimeConfig:
    """The RuntimeConfig every party runs with; ``protocol`` is SPU's MPC protocol (a key of SPU_PROTOCOLS)."""
    if protocol not in SPU_PROTOCOLS:
        raise ValueError(f"unknown SPU protocol {protocol!r}; use one of {sorted(SPU_PROTOCOLS)}")
    if field not in FIELDS:
        raise ValueError(f"unknown SPU field {field!r}; use one of {sorted(FIELDS)}")
    if not 1 <= int(fraction_bits) <= 40:
        raise ValueError(f"fraction_bits must be in 1..40, got {fraction_bits}")
    cfg = libspu.RuntimeConfig(protocol=SPU_PROTOCOLS[protocol], field=FIELDS[field], fxp_fraction_bits=int(fraction_bits))
    for key, value in runtime_options.items():
        _set_runtime(cfg, key, value)
    return cfg


def compiler_options(options: Mapping[str, bool]) -> libspu.CompilerOptions:
    copts = libspu.CompilerOptions()
    for key, value in options.items():
        setattr(copts, key, bool(value))
    return copts
