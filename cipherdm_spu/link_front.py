"""The SPU link's front door: mutual TLS that nobody can skip.

SPU 0.9.5's brpc link server, even with TLS enabled, also answers plaintext on the same port (brpc detects the
protocol per connection, and the link exposes no option to refuse plaintext). Anyone who reached a party's
``spu_address`` could then push messages as any peer into a running session (silently wrong results, a forged
agreement) or make the worker allocate without bound. So a session's worker listens on a Unix socket in a folder
only the party's own user can enter, and the party serves ``spu_address`` with this front for as long as it runs (so
that no other local process can take the port between sessions): it completes a TLS handshake that requires a
certificate of the party CA (the peers' own; clients' certificates come from another CA) whose common name is one of
the other parties' ids, and only then relays the bytes to the open session's worker. A connection that does not
finish the handshake never reaches it; one that arrives while no session is open is closed, and one accepted during
a session is relayed to that session's worker or to none.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Set

from . import private_dir
from .cluster_config import Credentials, split_address
from .errors import PrivatePathError

log = logging.getLogger(__name__)

#: how long a connection may take to finish its TLS handshake
HANDSHAKE_S = 5.0
#: connections in their handshake at once (anyone who reaches the port can open one), and from one address (an IPv6
#: /64): one address cannot hold every handshake slot and so keep the peers' dials waiting
MAX_HANDSHAKES = 32
MAX_HANDSHAKES_PER_ADDRESS = 4
#: authenticated connections relayed at once (a session's peers open a few)
MAX_RELAYS = 16
#: refusals logged one by one per minute; beyond, only their count (anyone can be refused, as fast as it connects)
REFUSALS_LOGGED_PER_MINUTE = 20
_CHUNK = 1 << 18


class _RefusalLog:
    """Warnings about refused connections, at most REFUSALS_LOGGED_PER_MINUTE a minute: a flood of connections from
    anyone who reaches the port must not fill the party's log. Those left out are counted in the next minute's
    first line."""

    def __init__(self):
        self._lock = threading.Lock()
        self._minute_began, self._logged, self._left_out = time.monotonic(), 0, 0

    def __call__(self, peer, why: str, *args) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._minute_began >= 60.0:
                if self._left_out:
                    log.warning("SPU link front: %d more connections refused in the last minute, not logged one by one",
                                self._left_out)
                self._minute_began, self._logged, self._left_out = now, 0, 0
            if self._logged >= REFUSALS_LOGGED_PER_MINUTE:
                self._left_out += 1
                return
            self._logged += 1
        log.warning("SPU link front: refused %s (" + why + ")", peer, *args)


def _source(peer) -> str:
    """Whom a connection's handshake slot counts against: its IPv4 address (also when mapped into IPv6), or its IPv6
    /64, the block one host usually holds (one address each would let a single host hold every slot)."""
    address = ipaddress.ip_address(peer[0].split("%")[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def server_context(tls: Credentials) -> ssl.SSLContext:
    """TLS that requires the peer's certificate, signed by ``tls.trusted_ca`` (the party CA)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(tls.trusted_ca)
    context.load_cert_chain(tls.cert, tls.key)
    return context


def common_name(secure: ssl.SSLSocket) -> str:
    """The common name of a verified peer certificate ("" if it has none)."""
    for rdn in (secure.getpeercert() or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""


def _shut(*socks: socket.socket) -> None:
    """End both directions of each socket at the OS level: the threads reading them see the end. Never a TLS unwrap
    (which would leave the socket in plaintext for the other direction's thread), and never a close while another
    thread may still use the socket (its descriptor could be reused meanwhile)."""
    for s in socks:
        try:
            socket.socket.shutdown(s, socket.SHUT_RDWR)
        except OSError:
            pass


def _end(*socks: socket.socket) -> None:
    """`_shut` and close sockets no other thread uses."""
    _shut(*socks)
    for s in socks:
        s.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until either ends or fails."""
    try:
        while True:
            data = src.recv(_CHUNK)
            if not data:
                return
            dst.sendall(data)
    except OSError:
        return


def new_socket_folder() -> Path:
    """A new folder for a session's socket (its real path): 0700, so no other user can reach the socket, on a path no
    one else can change (or sticky, as /tmp), so no one can swap the folder for one of theirs; OSError otherwise."""
    made = Path(tempfile.mkdtemp(prefix="cdm-link-"))
    try:
        with private_dir.opened_folder(made, make=False) as checked:
            return checked.path
    except (PrivatePathError, OSError) as e:
        shutil.rmtree(made, ignore_errors=True)
        raise OSError(f"its SPU link's socket folder under {made.parent}: {e}") from None


class LinkFront:
    """Serve ``address`` (host:port) with mutual TLS for the parties ``peers`` (their ids: their certificates' common
    names), relaying each authenticated connection to the private Unix socket of the session open when it was
    accepted (`open_session`), while that session lasts."""

    def __init__(self, address: str, tls: Credentials, peers: Iterable[str]):
        self.context = server_context(tls)
        self.peers = frozenset(peers)
        host, port = split_address(address, "spu_address")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, port), family=family)
        self.folder: Optional[Path] = None  # the open session's private folder
        self._session = 0  # counts sessions opened and ended: a connection is tied to the count at its accept
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: Set[socket.socket] = set()  # the open session's relayed connections, both ends
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._handshaking: Dict[str, int] = {}  # source address -> its connections in their handshake
        self._relays = threading.BoundedSemaphore(MAX_RELAYS)
        self._refused = _RefusalLog()
        threading.Thread(target=self._accept, daemon=True, name="spu-link-front").start()

    @property
    def socket_path(self) -> Optional[Path]:
        """The open session's socket (None when none is open)."""
        return None if self.folder is None else self.folder / "link.sock"

    def open_session(self) -> str:
        """A new private socket for a session's worker to listen on; returns its address (brpc's Unix form)."""
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the SPU link front is closed")
            if self.folder is not None:
                raise RuntimeError("a session is open on the SPU link front already")
            self.folder = new_socket_folder()
            self._session += 1
            return f"unix:{self.socket_path}"

    def end_session(self) -> None:
        """End the open session's relayed connections and remove its socket's folder (nothing if none is open)."""
        with self._lock:
            folder, self.folder = self.folder, None
            self._session += 1
            _shut(*self._open)  # their relays close them
            self._open.clear()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def _accept(self) -> None:
        while not self._closed.is_set():
            self._handshakes.acquire()
            try:
                conn, peer = self.listener.accept()
            except OSError:  # closed; or out of descriptors for a moment: try again
                self._handshakes.release()
                if self._closed.wait(0.05):
                    return
                continue
            source = _source(peer)
            with self._lock:
                session = self._session if self.folder is not None else None
                crowded = self._handshaking.get(source, 0) >= MAX_HANDSHAKES_PER_ADDRESS
                if session is not None and not crowded:
                    self._handshaking[source] = self._handshaking.get(source, 0) + 1
            if session is None or crowded:  # a peer that dials before this party's session opens dials again
                self._handshakes.release()
                if crowded:
                    self._refused(peer, "%d connections from its address in their handshake already",
                                  MAX_HANDSHAKES_PER_ADDRESS)
                conn.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(conn, peer, session), daemon=True,
                                 name="spu-link-front-conn").start()
            except RuntimeError:  # no thread to be had: refuse this one
                self._handshake_ended(peer)
                conn.close()

    def _handshake_ended(self, peer) -> None:
        source = _source(peer)
        with self._lock:
            left = self._handshaking.pop(source) - 1
            if left:
                self._handshaking[source] = left
        self._handshakes.release()

    def _handshake(self, conn: socket.socket, peer):
        """The connection under TLS, from a peer party; None (closed, logged) otherwise."""
        try:
            # the relayed link messages are requests and answers, each of one or more TLS records: Nagle's algorithm
            # would hold a record back until the previous one is acknowledged, a delayed acknowledgement later
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(HANDSHAKE_S)
            secure = self.context.wrap_socket(conn, server_side=True)
            secure.settimeout(None)
        except (OSError, ssl.SSLError) as e:
            self._refused(peer, "no valid party certificate: %s", e)
            conn.close()
            return None
        name = common_name(secure)
        if name not in self.peers:
            self._refused(peer, "certificate of %r, not of a peer party", name)
            _end(secure)
            return None
        return secure

    def _serve(self, conn: socket.socket, peer, session: int) -> None:
        try:
            secure = self._handshake(conn, peer)
        finally:
            self._handshake_ended(peer)
        if secure is None:
            return
        if not self._relays.acquire(blocking=False):
            self._refused(peer, "%d connections relayed already", MAX_RELAYS)
            _end(secure)
            return
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                folder = self.folder if self._session == session else None
            if folder is None:  # its session ended during the handshake
                return
            try:
                inner.connect(str(folder / "link.sock"))
            except OSError:
                return
            if not self._track(session, secure, inner):
                return
            back = threading.Thread(target=lambda: (_pump(inner, secure), _shut(secure, inner)), daemon=True)
            back.start()
            _pump(secure, inner)
            _shut(secure, inner)  # either direction ending ends both (brpc does not half-close)
            back.join()
        finally:
            with self._lock:
                self._open.difference_update((secure, inner))
            _end(secure, inner)
            self._relays.release()

    def _track(self, session: int, *socks: socket.socket) -> bool:
        """Count ``socks`` among the open session's connections; False when ``session`` is no longer open."""
        with self._lock:
            if self._session != session:
                return False
            self._open.update(socks)
            return True

    def close(self) -> None:
        """Stop accepting, end the open session (its relayed connections and its socket's folder)."""
        self._closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread and stops listening (Linux)
        except OSError:
            pass
        self.listener.close()
        self.end_session()
