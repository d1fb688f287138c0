"""The SPU link's front door: mutual TLS that nobody can skip.

SPU 0.9.5's brpc link server, even with TLS enabled, also answers plaintext on the same port (brpc detects the
protocol per connection, and the link exposes no option to refuse plaintext). Anyone who reached a party's
``spu_address`` could then push messages as any peer into a running session (silently wrong results, a forged
agreement) or make the worker allocate without bound. So a session's worker listens on a Unix socket in a folder
only the party's own user can enter, and the party serves ``spu_address`` with this front: it completes a TLS
handshake that requires a certificate of the party CA (the peers' own; clients' certificates come from another CA)
and only then relays the bytes to the worker. A connection that does not finish the handshake never reaches it.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from typing import List

from .cluster_config import Credentials, split_address

log = logging.getLogger(__name__)

#: how long a connection may take to finish its TLS handshake
HANDSHAKE_S = 10.0
_CHUNK = 1 << 18


def server_context(tls: Credentials) -> ssl.SSLContext:
    """TLS that requires the peer's certificate, signed by ``tls.trusted_ca`` (the party CA)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(tls.trusted_ca)
    context.load_cert_chain(tls.cert, tls.key)
    return context


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until src ends, then end dst's sending side (the other direction may go on)."""
    try:
        while True:
            data = src.recv(_CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class LinkFront:
    """Serve ``address`` (host:port) with mutual TLS, relaying each authenticated connection to a private Unix
    socket (`worker_address`, for the worker's link to listen on)."""

    def __init__(self, address: str, tls: Credentials):
        self.context = server_context(tls)
        host, port = split_address(address, "spu_address")
        self.folder = Path(tempfile.mkdtemp(prefix="cdm-link-"))  # 0700: no other user can reach the socket
        self.socket_path = self.folder / "link.sock"
        self.listener = socket.create_server((host, port), reuse_port=False)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="spu-link-front").start()

    @property
    def worker_address(self) -> str:
        """The address the worker's SPU link listens on (brpc's Unix socket form)."""
        return f"unix:{self.socket_path}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True, name="spu-link-front-conn").start()

    def _track(self, *socks: socket.socket) -> bool:
        with self._lock:
            if self._closed.is_set():
                return False
            self._open.extend(socks)
            return True

    def _serve(self, conn: socket.socket, peer) -> None:
        try:
            conn.settimeout(HANDSHAKE_S)
            secure = self.context.wrap_socket(conn, server_side=True)
            secure.settimeout(None)
        except (OSError, ssl.SSLError) as e:
            log.warning("SPU link front: refused %s (no valid party certificate: %s)", peer, e)
            conn.close()
            return
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            inner.connect(str(self.socket_path))
        except OSError:
            secure.close()
            inner.close()
            return
        if not self._track(secure, inner):
            secure.close()
            inner.close()
            return
        back = threading.Thread(target=_pump, args=(inner, secure), daemon=True)
        back.start()
        _pump(secure, inner)
        back.join()
        for s in (secure, inner):
            s.close()

    def close(self) -> None:
        """Stop accepting, end every relayed connection, remove the socket's folder."""
        self._closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread and stops listening (Linux)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            for s in self._open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._open.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
