"""The three-party cluster description (configs/3pc.json), validated before anything starts.

A party has an id, an address for SPU's brpc link (party to party) and an address for its control
service (driver to party, gRPC). The runtime section fixes what every party must agree on: the MPC
protocol, the ring and the fixed-point precision. TLS is optional and, when given, secures both
channels with mutual TLS: one CA, a certificate per party, and one for the driver (the user's side).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import spu_config

#: the protocols that run with exactly three parties
THREE_PARTY_PROTOCOLS = ("ABY3", "SEMI2K")


class ClusterConfigError(ValueError):
    """The cluster config is missing something or has a bad value; the message names it."""


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA every party trusts, and this party's certificate and key."""

    ca_cert: str
    cert: str
    key: str


@dataclasses.dataclass(frozen=True)
class PartyConfig:
    id: str
    rank: int
    spu_address: str
    control_address: str
    tls: Optional[TlsFiles] = None

    @property
    def control_host(self) -> str:
        return split_address(self.control_address, "")[0]


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    parties: Tuple[PartyConfig, ...]
    #: the driver's (the user's) client certificate for the control channels, when the cluster uses TLS
    driver_tls: Optional[TlsFiles] = None
    protocol: str = "ABY3"
    field: str = "FM64"
    fraction_bits: int = 18
    connect_timeout_s: float = 20.0
    recv_timeout_s: float = 120.0
    source: str = "<dict>"

    def party(self, party_id: str) -> PartyConfig:
        for p in self.parties:
            if p.id == party_id:
                return p
        raise ClusterConfigError(f"{self.source}: no party {party_id!r} (parties: {', '.join(p.id for p in self.parties)})")

    @property
    def fingerprint(self) -> str:
        """What every party and the driver must agree on: addresses, protocol, ring, precision, timeouts."""
        agreed = {
            "parties": [[p.id, p.spu_address, p.control_address, p.tls is not None] for p in self.parties],
            "runtime": [self.protocol, self.field, self.fraction_bits],
            "recv_timeout_s": self.recv_timeout_s,
        }
        return hashlib.sha256(json.dumps(agreed, sort_keys=True).encode()).hexdigest()[:16]

    def runtime_config(self, runtime_options=None):
        """The SPU RuntimeConfig of this cluster, plus a protocol set's runtime options."""
        return spu_config.runtime_config(
            runtime_options or {}, protocol=self.protocol, field=self.field, fraction_bits=self.fraction_bits
        )


def split_address(address, where: str) -> Tuple[str, int]:
    """("host", port) from "host:port"; ClusterConfigError naming ``where`` otherwise."""
    if not isinstance(address, str) or address.count(":") < 1:
        raise ClusterConfigError(f"{where}: address must be 'host:port', got {address!r}")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host:
        raise ClusterConfigError(f"{where}: address {address!r} has no host")
    try:
        number = int(port)
    except ValueError:
        raise ClusterConfigError(f"{where}: port of {address!r} is not a number") from None
    if not 1 <= number <= 65535:
        raise ClusterConfigError(f"{where}: port {number} of {address!r} is outside 1..65535")
    return host, number


def load(path: os.PathLike) -> ClusterConfig:
    """Read and validate a cluster config file; relative TLS paths are taken from the file's folder."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterConfigError(f"cluster config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ClusterConfigError(f"{path}: not valid JSON ({e})") from None
    return from_dict(raw, source=str(path), base=path.parent)


def from_dict(raw: dict, source: str = "<dict>", base: Optional[Path] = None) -> ClusterConfig:
    """Validate a cluster config given as a dictionary (the JSON file's content)."""
    if not isinstance(raw, dict):
        raise ClusterConfigError(f"{source}: the config must be a JSON object")
    _only(raw, {"parties", "runtime", "timeouts", "tls"}, source)
    parties_raw = raw.get("parties")
    if not isinstance(parties_raw, list) or not parties_raw:
        raise ClusterConfigError(f"{source}: 'parties' must be a list of three parties")
    tls_raw = raw.get("tls")
    if tls_raw is not None and not isinstance(tls_raw, dict):
        raise ClusterConfigError(f"{source}: 'tls' must be an object or null")
    parties = [_party(p, rank, source, tls_raw, base) for rank, p in enumerate(parties_raw)]
    if len(parties) != 3:
        raise ClusterConfigError(
            f"{source}: a three-party cluster needs exactly 3 parties, found {len(parties)}"
            f" ({', '.join(p.id for p in parties)})"
        )
    _unique([p.id for p in parties], "party id", source)
    endpoints: Dict[Tuple[str, int], str] = {}
    for p in parties:
        for kind, address in (("spu_address", p.spu_address), ("control_address", p.control_address)):
            key = _canonical_host_port(address, f"{source}: party {p.id} {kind}")
            if key in endpoints:
                raise ClusterConfigError(
                    f"{source}: duplicate address {address}: party {p.id} {kind} and {endpoints[key]}"
                )
            endpoints[key] = f"{p.id} {kind}"
    runtime = raw.get("runtime", {})
    if not isinstance(runtime, dict):
        raise ClusterConfigError(f"{source}: 'runtime' must be an object")
    _only(runtime, {"protocol", "field", "fraction_bits"}, f"{source}: runtime")
    protocol = runtime.get("protocol", "ABY3")
    if protocol not in THREE_PARTY_PROTOCOLS:
        raise ClusterConfigError(f"{source}: runtime.protocol must be one of {THREE_PARTY_PROTOCOLS}, got {protocol!r}")
    field = runtime.get("field", "FM64")
    if field not in spu_config.FIELDS:
        raise ClusterConfigError(f"{source}: runtime.field must be one of {sorted(spu_config.FIELDS)}, got {field!r}")
    bits = runtime.get("fraction_bits", 18)
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 40:
        raise ClusterConfigError(f"{source}: runtime.fraction_bits must be an integer in 1..40, got {bits!r}")
    timeouts = raw.get("timeouts", {})
    if not isinstance(timeouts, dict):
        raise ClusterConfigError(f"{source}: 'timeouts' must be an object")
    _only(timeouts, {"connect_s", "recv_s"}, f"{source}: timeouts")
    connect = _positive(timeouts.get("connect_s", 20.0), f"{source}: timeouts.connect_s")
    recv = _positive(timeouts.get("recv_s", 120.0), f"{source}: timeouts.recv_s")
    driver_tls = _tls_files(tls_raw, "driver", source, base) if tls_raw is not None and "driver" in tls_raw else None
    return ClusterConfig(tuple(parties), driver_tls, protocol, field, bits, connect, recv, source)


def _party(raw, rank: int, source: str, tls_raw, base) -> PartyConfig:
    where = f"{source}: parties[{rank}]"
    if not isinstance(raw, dict):
        raise ClusterConfigError(f"{where} must be an object")
    _only(raw, {"id", "spu_address", "control_address"}, where)
    for key in ("id", "spu_address", "control_address"):
        if key not in raw:
            raise ClusterConfigError(f"{where}: missing {key!r}")
    party_id = raw["id"]
    if not isinstance(party_id, str) or not party_id or not party_id.replace("-", "").replace("_", "").isalnum():
        raise ClusterConfigError(f"{where}: id must be a non-empty name of letters, digits, '-' or '_', got {party_id!r}")
    split_address(raw["spu_address"], f"{where} ({party_id}) spu_address")
    split_address(raw["control_address"], f"{where} ({party_id}) control_address")
    tls = _tls_files(tls_raw, party_id, source, base) if tls_raw is not None else None
    return PartyConfig(party_id, rank, raw["spu_address"], raw["control_address"], tls)


def _tls_files(tls_raw: dict, who: str, source: str, base) -> TlsFiles:
    """The CA and ``who``'s certificate and key ("driver" or a party id) from the tls section."""
    _only(tls_raw, {"ca_cert", "parties", "driver"}, f"{source}: tls")
    own = tls_raw.get("driver") if who == "driver" else (tls_raw.get("parties") or {}).get(who)
    where = "driver" if who == "driver" else f"parties.{who}"
    if not isinstance(own, dict) or "ca_cert" not in tls_raw:
        raise ClusterConfigError(f"{source}: tls needs 'ca_cert' and {where} with 'cert' and 'key'")
    _only(own, {"cert", "key"}, f"{source}: tls.{where}")
    files = {"ca_cert": tls_raw["ca_cert"], "cert": own.get("cert"), "key": own.get("key")}
    for key, value in files.items():
        if not isinstance(value, str):
            raise ClusterConfigError(f"{source}: tls {key} of {where} must be a file path")
        resolved = Path(value) if base is None or Path(value).is_absolute() else Path(base) / value
        files[key] = str(resolved)
    return TlsFiles(**files)


def check_tls_files(party: PartyConfig) -> None:
    """Refuse a party whose TLS files are missing (checked where the party runs, not by the driver)."""
    if party.tls is None:
        return
    for key, value in dataclasses.asdict(party.tls).items():
        if not Path(value).is_file():
            raise ClusterConfigError(f"party {party.id}: TLS {key} file {value} does not exist")


def _canonical_host_port(address: str, where: str) -> Tuple[str, int]:
    host, port = split_address(address, where)
    host = {"localhost": "127.0.0.1", "::1": "127.0.0.1"}.get(host.lower(), host.lower())
    return host, port


def _only(raw: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ClusterConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _unique(values: List[str], what: str, source: str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ClusterConfigError(f"{source}: duplicate {what} {v!r}")
        seen.add(v)


def _positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ClusterConfigError(f"{where} must be a positive number of seconds, got {value!r}")
    return float(value)
