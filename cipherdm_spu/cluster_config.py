"""The three-party cluster description (configs/3pc.json), validated before anything starts.

A party has an id, an address for SPU's brpc link (party to party) and an address for its control
service (clients to party, gRPC). The runtime section fixes what every party must agree on: the MPC
protocol, the ring and the fixed-point precision. TLS is required: two CAs keep the roles apart.
``party_ca`` signs the parties' certificates (the SPU link trusts only it, so only parties join a
link); ``client_ca`` signs the clients' (the control services trust only it, so a party can never act
as a client of another). A client's role is the common name of its certificate: ``owner`` or
``owner-NAME`` (the model owner), ``user`` or ``user-NAME`` (a user). Every host reads the same file
and needs only its own certificate and key, plus the CAs.

A party may also say how it reaches a peer's SPU link: ``"spu_dial": {"P1": "host:port"}`` makes this
party dial P1 there instead of at P1's ``spu_address`` (a relay, e.g. `cipherdm_spu.netem`'s link
emulator, or a port forward). It is explicit, per party and per peer, and changes no check: the link is
mutual TLS end to end, so whatever answers there must hold a certificate of the party CA. A dial
address is this party's route, not something the others must agree on, so it is not in the fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import private_dir, spu_config
from .errors import ClusterConfigError, PrivatePathError
from .plan import NAME

#: the protocols a cluster runs: ABY3's replicated shares (party i holds components i and i+1), which the parties'
#: consistency check of a client's shares relies on (`party._consistent_shares`)
THREE_PARTY_PROTOCOLS = ("ABY3",)
#: client roles, read from the common name of a client certificate ("owner", "user-alice", ...)
ROLES = ("owner", "user")
#: the longest timeout a config may set (one day): a bound, so that every wait ends
MAX_TIMEOUT_S = 86400.0


def role_of(common_name: str) -> Optional[str]:
    """The role a client certificate's common name grants ("owner", "user"), or None (also for a name a party could
    not take as an owner's namespace or a user's name: not `plan.NAME`)."""
    if not NAME.fullmatch(common_name):
        return None
    for role in ROLES:
        if common_name == role or (common_name.startswith(role + "-") and len(common_name) > len(role) + 1):
            return role
    return None


@dataclasses.dataclass(frozen=True)
class Credentials:
    """One identity's PEM files: the CA it trusts for its peers, its certificate and its key."""

    trusted_ca: str
    cert: str
    key: str

    def check_files(self, who: str, elsewhere: str = "") -> None:
        """Refuse, naming the file, where one is missing, could be changed by someone other than this user and root
        (it or anything on its path: `private_dir.check_file`), or is a key readable by others (checked on the host
        that uses them); ``elsewhere`` says how to pick another identity."""
        for what, value in dataclasses.asdict(self).items():
            if not Path(value).exists():
                raise ClusterConfigError(f"{who}: TLS {what} file {value} does not exist (make them with `spu-launch "
                                         f"certs`{elsewhere})")
            try:
                private_dir.check_file(Path(value).absolute())
            except PrivatePathError as e:
                raise ClusterConfigError(f"{who}: TLS {what} file {value}: {e}; whoever could change it or a folder on "
                                         "its path could let itself in, so only this user and root may") from None
            except OSError as e:
                raise ClusterConfigError(f"{who}: TLS {what} file {value} cannot be reached ({e})") from None
        if Path(self.key).stat().st_mode & 0o077:
            raise ClusterConfigError(f"{who}: the key {self.key} is readable by others; chmod 600 it")


@dataclasses.dataclass(frozen=True)
class PartyConfig:
    id: str
    rank: int
    spu_address: str
    control_address: str
    #: the party's certificate; ``trusted_ca`` is the party CA (its SPU link peers)
    tls: Credentials
    #: the CA of the clients this party's control service accepts
    client_ca: str
    #: (peer id, address) for each peer this party dials elsewhere than at the peer's spu_address
    spu_dial: Tuple[Tuple[str, str], ...] = ()

    @property
    def control_host(self) -> str:
        return split_address(self.control_address, "")[0]


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    parties: Tuple[PartyConfig, ...]
    #: client identities by name (e.g. "owner", "user"); ``trusted_ca`` is the party CA
    clients: Dict[str, Credentials]
    protocol: str = "ABY3"
    field: str = "FM64"
    fraction_bits: int = 18
    connect_timeout_s: float = 20.0
    recv_timeout_s: float = 120.0
    #: a session with no request from its user for this long is dropped with its shares
    session_idle_s: float = 600.0
    source: str = "<dict>"

    def party(self, party_id: str) -> PartyConfig:
        for p in self.parties:
            if p.id == party_id:
                return p
        raise ClusterConfigError(f"{self.source}: no party {party_id!r} (parties: {', '.join(p.id for p in self.parties)})")

    def dial_addresses(self, party: PartyConfig) -> List[str]:
        """The SPU link addresses ``party`` uses, by rank: its own to listen on, each peer's to dial it at."""
        routes = dict(party.spu_dial)
        return [p.spu_address if p.id == party.id else routes.get(p.id, p.spu_address) for p in self.parties]

    def client(self, name: str) -> Credentials:
        """The credentials of client ``name`` (a key of tls.clients), refused clearly when absent."""
        if name not in self.clients:
            known = ", ".join(sorted(self.clients)) or "none"
            raise ClusterConfigError(f"{self.source}: tls.clients has no identity {name!r} (it has: {known})")
        return self.clients[name]

    @property
    def fingerprint(self) -> str:
        """What every party and client must agree on: addresses, protocol, ring, precision, timeouts."""
        agreed = {
            "parties": [[p.id, p.spu_address, p.control_address] for p in self.parties],
            "runtime": [self.protocol, self.field, self.fraction_bits],
            "timeouts": [self.recv_timeout_s, self.session_idle_s],
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


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def write_config(path: os.PathLike, raw: dict) -> Path:
    """Write ``raw`` as the config file ``path``, mode 644 whatever the umask and never through a symlink, so that
    `load` accepts it (a config others could write is refused); returns the path."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(json.dumps(raw, indent=2) + "\n")
    return path


def load(path: os.PathLike) -> ClusterConfig:
    """Read and validate a cluster config file (one that someone other than this user and root could change, it or a
    folder on its path, is refused: `private_dir.check_file`); relative TLS paths are taken from the file's folder."""
    path = Path(path)
    try:
        private_dir.check_file(path.absolute())  # it names the CAs to trust and the addresses to dial
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterConfigError(f"cluster config {path} does not exist") from None
    except PrivatePathError as e:
        raise ClusterConfigError(f"cluster config {path}: {e}; it names the CAs a party trusts, so only this user and "
                                 "root may be able to change it or a folder on its path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ClusterConfigError(f"cannot read cluster config {path}: {e}") from None
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
    tls = raw.get("tls")
    if not isinstance(tls, dict):
        raise ClusterConfigError(
            f"{source}: 'tls' is required (an object with party_ca, client_ca, parties and clients): every control "
            "call is authenticated by its certificate; make a development set with `spu-launch certs`"
        )
    _only(tls, {"party_ca", "client_ca", "parties", "clients"}, f"{source}: tls")
    party_ca, client_ca = (_path(tls.get(k), f"{source}: tls.{k}", base) for k in ("party_ca", "client_ca"))
    if Path(party_ca).resolve() == Path(client_ca).resolve():
        raise ClusterConfigError(f"{source}: tls.party_ca and tls.client_ca must be different CAs "
                                 "(one CA would let a client join the parties' SPU link)")
    parties = [_party(p, rank, source, tls, party_ca, client_ca, base) for rank, p in enumerate(parties_raw)]
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
    for p in parties:
        for peer, address in p.spu_dial:
            if peer == p.id or peer not in {q.id for q in parties}:
                raise ClusterConfigError(f"{source}: party {p.id} spu_dial: {peer!r} is not another party of this config")
            owner = endpoints.get(_canonical_host_port(address, f"{source}: party {p.id} spu_dial.{peer}"))
            if owner is not None and owner != f"{peer} spu_address":
                raise ClusterConfigError(f"{source}: party {p.id} spu_dial.{peer} is {address}, the {owner}")
    clients_raw = tls.get("clients", {})
    if not isinstance(clients_raw, dict):
        raise ClusterConfigError(f"{source}: tls.clients must be an object of name -> {{cert, key}}")
    clients = {}
    for name, files in clients_raw.items():
        if role_of(name) is None:
            raise ClusterConfigError(
                f"{source}: tls.clients.{name}: a client is named for its role: owner, owner-NAME, user or user-NAME"
            )
        clients[name] = _credentials(files, party_ca, f"{source}: tls.clients.{name}", base)
    runtime = raw.get("runtime", {})
    if not isinstance(runtime, dict):
        raise ClusterConfigError(f"{source}: 'runtime' must be an object")
    _only(runtime, {"protocol", "field", "fraction_bits"}, f"{source}: runtime")
    protocol = runtime.get("protocol", "ABY3")
    if protocol not in THREE_PARTY_PROTOCOLS:
        raise ClusterConfigError(f"{source}: runtime.protocol must be one of {THREE_PARTY_PROTOCOLS}, got {protocol!r}")
    field = runtime.get("field", "FM64")
    bits = runtime.get("fraction_bits", 18)
    try:
        spu_config.check_ring(field, bits)
    except ValueError as e:
        raise ClusterConfigError(f"{source}: runtime: {e}") from None
    timeouts = raw.get("timeouts", {})
    if not isinstance(timeouts, dict):
        raise ClusterConfigError(f"{source}: 'timeouts' must be an object")
    _only(timeouts, {"connect_s", "recv_s", "session_idle_s"}, f"{source}: timeouts")
    connect = _seconds(timeouts.get("connect_s", 20.0), f"{source}: timeouts.connect_s")
    recv = _seconds(timeouts.get("recv_s", 120.0), f"{source}: timeouts.recv_s")
    idle = _seconds(timeouts.get("session_idle_s", 600.0), f"{source}: timeouts.session_idle_s")
    if recv < connect:
        # the parties link independently (each within connect_s), then agree on the session over the link:
        # the first one linked waits there, within recv_s, for the last, so recv_s must cover connect_s
        raise ClusterConfigError(f"{source}: timeouts.recv_s ({recv:g}) must be at least timeouts.connect_s "
                                 f"({connect:g}): the first party linked waits up to recv_s for the last, which "
                                 f"may take up to connect_s to link")
    return ClusterConfig(tuple(parties), clients, protocol, field, bits, connect, recv, idle, source)


def _party(raw, rank: int, source: str, tls: dict, party_ca: str, client_ca: str, base) -> PartyConfig:
    where = f"{source}: parties[{rank}]"
    if not isinstance(raw, dict):
        raise ClusterConfigError(f"{where} must be an object")
    _only(raw, {"id", "spu_address", "control_address", "spu_dial"}, where)
    for key in ("id", "spu_address", "control_address"):
        if key not in raw:
            raise ClusterConfigError(f"{where}: missing {key!r}")
    party_id = raw["id"]
    if not isinstance(party_id, str) or not party_id or not party_id.replace("-", "").replace("_", "").isalnum():
        raise ClusterConfigError(f"{where}: id must be a non-empty name of letters, digits, '-' or '_', got {party_id!r}")
    if role_of(party_id) is not None:
        raise ClusterConfigError(f"{where}: a party may not be named like a client role ({party_id!r})")
    split_address(raw["spu_address"], f"{where} ({party_id}) spu_address")
    split_address(raw["control_address"], f"{where} ({party_id}) control_address")
    parties_tls = tls.get("parties")
    if not isinstance(parties_tls, dict) or party_id not in parties_tls:
        raise ClusterConfigError(f"{source}: tls.parties needs {party_id} with 'cert' and 'key'")
    creds = _credentials(parties_tls[party_id], party_ca, f"{source}: tls.parties.{party_id}", base)
    dial = raw.get("spu_dial", {})
    if not isinstance(dial, dict):
        raise ClusterConfigError(f"{where} ({party_id}) spu_dial must be an object of peer id -> 'host:port'")
    for peer, address in dial.items():
        split_address(address, f"{where} ({party_id}) spu_dial.{peer}")
    return PartyConfig(party_id, rank, raw["spu_address"], raw["control_address"], creds, client_ca,
                       tuple(sorted(dial.items())))


def _credentials(raw, trusted_ca: str, where: str, base) -> Credentials:
    if not isinstance(raw, dict):
        raise ClusterConfigError(f"{where} must be an object with 'cert' and 'key'")
    _only(raw, {"cert", "key"}, where)
    return Credentials(trusted_ca, _path(raw.get("cert"), f"{where}.cert", base), _path(raw.get("key"), f"{where}.key", base))


def _path(value, where: str, base) -> str:
    if not isinstance(value, str) or not value:
        raise ClusterConfigError(f"{where} must be a file path, got {value!r}")
    return str(Path(value) if base is None or Path(value).is_absolute() else Path(base) / value)


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


def _seconds(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_TIMEOUT_S:
        raise ClusterConfigError(f"{where} must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {value!r}")
    return float(value)
