"""The control channel between the driver and a party: gRPC methods carrying msgpack messages.

No generated protobuf code: every method takes and returns one msgpack map (bytes stay bytes), which
keeps the wire format readable here and needs nothing beyond grpcio and msgpack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import grpc
import msgpack

from .cluster_config import ClusterConfigError, PartyConfig, TlsFiles

SERVICE = "cipherdm_spu.Party"
#: hello, the two-phase session open (drop, then open), values in and out, runs, and the share audit
METHODS = ("hello", "drop", "open", "set_var", "get_var", "del_var", "run", "close", "audit")
#: no size limit on messages: a weight share or an executable can exceed gRPC's 4 MB default
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def encode(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False)


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def server_credentials(party: PartyConfig) -> Optional[grpc.ServerCredentials]:
    """Mutual TLS for the control service when the config gives TLS files; None for plaintext."""
    if party.tls is None:
        return None
    read = lambda p: Path(p).read_bytes()  # noqa: E731
    return grpc.ssl_server_credentials(
        [(read(party.tls.key), read(party.tls.cert))], root_certificates=read(party.tls.ca_cert),
        require_client_auth=True,
    )


def channel(party: PartyConfig, driver_tls: Optional[TlsFiles]) -> grpc.Channel:
    """The driver's channel to ``party``'s control service (mutual TLS when the cluster uses TLS)."""
    if party.tls is None:
        return grpc.insecure_channel(party.control_address, options=CHANNEL_OPTIONS)
    if driver_tls is None:
        raise ClusterConfigError("the cluster uses TLS but its config has no tls.driver certificate and key")
    own = driver_tls
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(own.ca_cert).read_bytes(),
        private_key=Path(own.key).read_bytes(),
        certificate_chain=Path(own.cert).read_bytes(),
    )
    return grpc.secure_channel(party.control_address, creds, options=CHANNEL_OPTIONS)
