"""Certificates for a cluster, and the identity a control call arrives with.

Two certificate authorities keep the roles apart (see `cluster_config`): the party CA signs the three
parties' certificates (common name and DNS name = the party id, plus the party's hosts), which serve
the SPU link both ways and the control services; the client CA signs the clients' (common name = the
client's name, whose prefix is its role). `make_development_pki` writes a complete set for one
config, for development and tests; a deployment's operators run their own CAs and give each host only
its own key.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
from pathlib import Path
from typing import Iterable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import private_dir
from .cluster_config import ClusterConfig, is_ip, role_of, split_address
from .errors import ClusterConfigError, PrivatePathError

#: how long development certificates are valid
DEVELOPMENT_DAYS = 30


def make_development_pki(cluster: ClusterConfig, clients: Iterable[str] = ("owner", "user")) -> list[Path]:
    """Write the CAs, the parties' and the named clients' certificates where ``cluster`` expects them.

    Keys are written 0600 (and never over an existing file), so a second run refuses rather than
    replacing a deployment's keys. Returns the paths written; where one cannot be written (a folder others could
    change, `private_dir`), none is left.
    """
    for name in clients:
        cluster.client(name)  # refuses a name the config does not list
    party_ca_path = Path(cluster.parties[0].tls.trusted_ca)
    client_ca_path = Path(cluster.parties[0].client_ca)
    planned = [party_ca_path, client_ca_path]
    for p in cluster.parties:
        planned += [Path(p.tls.cert), Path(p.tls.key)]
    for name in clients:
        planned += [Path(cluster.clients[name].cert), Path(cluster.clients[name].key)]
    existing = [str(p) for p in planned if p.exists()]
    if existing:
        raise ClusterConfigError(f"refusing to overwrite existing TLS files: {', '.join(existing)} "
                                 "(remove them first to make a new development set)")

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(common_name, key, issuer_name, issuer_key, *, ca=False, names=(), usage=()):
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer_name or subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=DEVELOPMENT_DAYS))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
        return builder.sign(issuer_key or key, hashes.SHA256())

    def new_key():
        return ec.generate_private_key(ec.SECP256R1())

    written = []

    def write(path: Path, data: bytes, private: bool) -> None:
        """Into a folder no one else can change, nor anything on its path (`private_dir`): the parties read these
        files by path, and whoever could swap a CA in would be let in."""
        parent = Path(path).absolute().parent
        try:
            with private_dir.opened_folder(parent) as folder:
                fd = os.open(path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o600 if private else 0o644, dir_fd=folder.fd)
        except PrivatePathError as e:
            raise ClusterConfigError(f"TLS folder {parent}: {e}; no one but this user (uid {os.getuid()}) and "
                                     "root may be able to change it or a folder on its path") from None
        except OSError as e:
            raise ClusterConfigError(f"TLS folder {parent}: cannot write {path.name} in it ({e})") from None
        written.append(path)  # (removed if anything after fails, this file's write included)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as e:  # a full disk, a quota
            raise ClusterConfigError(f"TLS folder {parent}: cannot write {path.name} in it ({e})") from None

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def pem_cert(cert) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    try:  # all or nothing: files left by a failed run would make the next one refuse to overwrite them
        cas = {}
        for label, path in (("party", party_ca_path), ("client", client_ca_path)):
            key = new_key()
            cert = certificate(f"cipherdm-spu {label} CA", key, None, None, ca=True)
            cas[label] = (cert, key)
            write(path, pem_cert(cert), private=False)  # the CA's key is not kept: nothing more can be signed

        party_cert, party_key = cas["party"]
        for p in cluster.parties:
            hosts = {split_address(a, p.id)[0] for a in (p.spu_address, p.control_address)}
            names = [x509.DNSName(p.id)] + [_general_name(h) for h in sorted(hosts)]
            key = new_key()
            cert = certificate(p.id, key, party_cert.subject, party_key, names=names,
                               usage=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH))
            write(Path(p.tls.key), pem_key(key), private=True)
            write(Path(p.tls.cert), pem_cert(cert), private=False)
        client_cert, client_key = cas["client"]
        for name in clients:
            key = new_key()
            cert = certificate(name, key, client_cert.subject, client_key, usage=(ExtendedKeyUsageOID.CLIENT_AUTH,))
            write(Path(cluster.clients[name].key), pem_key(key), private=True)
            write(Path(cluster.clients[name].cert), pem_cert(cert), private=False)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return written


def shares_a_key(pem_a: os.PathLike, pem_b: os.PathLike) -> bool:
    """Whether any certificate in PEM file a has the public key of any in PEM file b: the same CA however its file is
    named or encoded (one CA for parties and clients would let a client join the parties' SPU link)."""
    keys = [{c.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
             for c in x509.load_pem_x509_certificates(Path(p).read_bytes())} for p in (pem_a, pem_b)]
    return bool(keys[0] & keys[1])


def _general_name(host: str):
    return x509.IPAddress(ipaddress.ip_address(host)) if is_ip(host) else x509.DNSName(host)


def peer_identity(auth_context: dict) -> tuple[Optional[str], Optional[str]]:
    """(name, role) of a control call's client, from gRPC's auth context of a mutual-TLS channel.

    The name is the common name of the client certificate, which the control service has already
    verified against the client CA; the role is what that name grants (None: no role, refused).
    """
    if auth_context.get("transport_security_type") != [b"ssl"]:
        return None, None
    names = auth_context.get("x509_common_name") or []
    if len(names) != 1:
        return None, None
    try:
        name = names[0].decode("utf-8")
    except UnicodeDecodeError:  # (a lenient decoding could give two certificates' names one string)
        return None, None
    return name, role_of(name)
