"""cipherdm_spu.link_front: only a peer party's certificate reaches a session's SPU link; plaintext (which SPU's
own link server would answer) and clients' certificates are refused before a byte is relayed, and between sessions
the front keeps the port and relays nothing."""

import contextlib
import logging
import socket
import ssl
import stat
import threading
import time

import pytest

from cipherdm_spu import cluster_config
from cipherdm_spu import link_front
from cipherdm_spu.link_front import MAX_HANDSHAKES_PER_ADDRESS, REFUSALS_LOGGED_PER_MINUTE, LinkFront

from .cluster_fixtures import free_ports, make_certs, write_config


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("front") / "cluster.json")
    make_certs(path)
    return cluster_config.load(path)


def _echo_worker(front, received):
    """A stand-in for a session's worker: listens on the open session's socket, echoes and records what it gets."""
    assert front.open_session() == f"unix:{front.socket_path}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(front.socket_path))
    server.listen()

    def echo():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    received.append(data)
                    conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    return server


@pytest.fixture
def front(cluster):
    """A front for P0 on a free port with a session open, and what that session's socket received."""
    party = cluster.parties[0]
    port = free_ports(1)[0]
    front = LinkFront(f"127.0.0.1:{port}", party.tls, ["P1", "P2"])
    received = []
    server = _echo_worker(front, received)
    yield front, port, received
    front.close()
    server.close()


def _peer_connection(cluster, port, peer="P1"):
    tls = cluster.party(peer).tls
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    return _tls_client(tls, tls.trusted_ca).wrap_socket(raw)


def _relayed(cluster, port):
    """A peer's connection through which a byte has gone to the worker and back."""
    conn = _peer_connection(cluster, port, "P2")
    conn.sendall(b"x")
    assert conn.recv(16) == b"x"
    return conn


def _ends(conn) -> bool:
    """Whether the far side ends the connection (rather than answering) after we send a byte."""
    try:
        conn.sendall(b"x")
        return conn.recv(16) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def _tls_client(credentials, trusted_ca):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(trusted_ca)
    if credentials is not None:
        context.load_cert_chain(credentials.cert, credentials.key)
    return context


def test_a_peer_with_a_party_certificate_is_relayed_both_ways(cluster, front):
    front, port, received = front
    with _peer_connection(cluster, port) as conn:
        conn.sendall(b"share bytes")
        assert conn.recv(4096) == b"share bytes"
    assert b"".join(received) == b"share bytes"


def test_a_party_certificate_that_is_not_a_peers_is_refused(cluster, front):
    """P0's own certificate (of the party CA, but no peer of P0's) gets no further than the handshake."""
    front, port, received = front
    own = cluster.parties[0].tls
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with _tls_client(own, own.trusted_ca).wrap_socket(raw) as conn:
                conn.sendall(b"forged")
                assert conn.recv(4096) == b""
                raise ConnectionError("closed without relaying")
    assert received == []


def test_the_private_socket_is_in_a_folder_only_its_user_can_enter(front):
    front, _, _ = front
    assert stat.S_IMODE(front.folder.stat().st_mode) == 0o700


def test_no_socket_folder_under_a_temporary_folder_others_could_swap_it_in(front, tmp_path, monkeypatch):
    """Under a TMPDIR that others may write and that is not sticky, another user could rename the socket's folder and
    put one of theirs in its place (an independent review's finding): refused, and nothing is left behind."""
    import tempfile

    front, _, _ = front
    front.end_session()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    with pytest.raises(OSError, match="others may write it and it is not sticky"):
        front.open_session()
    assert front.folder is None and list(shared.iterdir()) == []
    shared.chmod(0o1777)  # sticky, as /tmp: others cannot rename what is not theirs
    assert front.open_session().startswith(f"unix:{shared}/cdm-link-")


def test_a_plaintext_push_never_reaches_the_link(front):
    """What SPU's link server would take from anyone: an HTTP push of a forged message."""
    front, port, received = front
    forged = (b"POST /org.interconnection.link.ReceiverService/Push HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/json\r\nContent-Length: 40\r\n\r\n"
              b'{"sender_rank":1,"key":"s:P2P-1:1->0"}  ')
    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        conn.settimeout(15)
        conn.sendall(forged)
        try:
            answer = conn.recv(4096)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"HTTP")
    assert received == []


@pytest.mark.parametrize("who", ["user", "none"])
def test_a_client_certificate_or_none_is_refused(cluster, front, who):
    front, port, received = front
    credentials = cluster.client(who) if who != "none" else None
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with _tls_client(credentials, cluster.parties[0].tls.trusted_ca).wrap_socket(raw) as conn:
                conn.sendall(b"forged")
                assert conn.recv(4096) == b""  # TLS 1.3: the refusal may only show on the first read
                raise ConnectionError("closed without relaying")
    assert received == []


def test_relayed_records_are_sent_at_once(cluster, front):
    """TCP_NODELAY on the peer's connection: otherwise an answer of several TLS records waits for an acknowledgement
    (tens of ms per link message on Linux)."""
    front, port, _ = front
    with _peer_connection(cluster, port) as conn:
        conn.sendall(b"x")
        assert conn.recv(16) == b"x"
        relayed = [s for s in front._open if s.family != socket.AF_UNIX]
        assert relayed and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in relayed)


def test_ending_a_session_ends_its_connections_and_keeps_the_port(cluster, front):
    """Between sessions the front keeps spu_address (no other local process can take it), relays nothing, and the
    next session gets a new private folder."""
    front, port, received = front
    conn = _relayed(cluster, port)
    folder = front.folder
    front.end_session()
    assert _ends(conn)
    conn.close()
    assert not folder.exists() and front.folder is None
    with pytest.raises((ssl.SSLError, OSError)):  # no session open: a peer's connection is closed at once
        with _peer_connection(cluster, port) as idle:
            assert _ends(idle)
            raise ConnectionError("closed without relaying")
    assert b"".join(received) == b"x"
    with pytest.raises(OSError):  # the port is still the front's
        socket.create_server(("127.0.0.1", port))
    server = _echo_worker(front, received)
    try:
        assert front.folder != folder
        with _peer_connection(cluster, port) as again:
            again.sendall(b"y")
            assert again.recv(16) == b"y"
    finally:
        server.close()


def test_a_connection_accepted_in_one_session_never_reaches_the_next(cluster, front):
    """A connection belongs to the session open when it was accepted: one that finishes its handshake after that
    session ended (and another opened) is closed, not relayed to the new session's worker."""
    front, port, received = front
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    deadline = time.monotonic() + 15
    while not front._handshaking and time.monotonic() < deadline:  # accepted, handshaking
        time.sleep(0.01)
    front.end_session()
    server = _echo_worker(front, received)
    try:
        tls = cluster.party("P1").tls
        with pytest.raises((ssl.SSLError, OSError)):
            with _tls_client(tls, tls.trusted_ca).wrap_socket(raw) as conn:
                assert _ends(conn)
                raise ConnectionError("closed without relaying")
    finally:
        raw.close()
        server.close()
    assert received == []


def test_one_session_at_a_time(front):
    front, _, _ = front
    with pytest.raises(RuntimeError, match="open"):
        front.open_session()


def test_closing_ends_relayed_connections_and_frees_the_port(cluster, front):
    front, port, _ = front
    conn = _relayed(cluster, port)
    folder = front.folder
    front.close()
    conn.settimeout(15)
    try:
        assert conn.recv(16) == b""
    except (ssl.SSLError, ConnectionError):
        pass
    conn.close()
    assert not folder.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        front.open_session()


def test_a_flood_of_refused_connections_is_logged_a_few_lines_a_minute(front, caplog):
    """Anyone who reaches the port can be refused as fast as it connects: the party's log must not grow with it."""
    front, port, received = front
    flood = REFUSALS_LOGGED_PER_MINUTE + 15

    def refusals():
        return [r.getMessage() for r in caplog.records if "SPU link front" in r.getMessage()]

    def refuse_one():
        with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\n\r\n")
            conn.settimeout(15)
            with contextlib.suppress(OSError):
                conn.recv(4096)  # the front closes it

    with caplog.at_level(logging.WARNING, logger="cipherdm_spu.link_front"):
        for _ in range(flood):
            refuse_one()
        deadline = time.monotonic() + 30
        while front._refused._left_out < flood - REFUSALS_LOGGED_PER_MINUTE and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(refusals()) == REFUSALS_LOGGED_PER_MINUTE
        front._refused._minute_began -= 60.0  # a minute later: the count of those left out, then the next refusal
        refuse_one()
        deadline = time.monotonic() + 30
        while len(refusals()) < REFUSALS_LOGGED_PER_MINUTE + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = refusals()
    assert lines[-2] == "SPU link front: 15 more connections refused in the last minute, not logged one by one"
    assert lines[-1].startswith("SPU link front: refused ") and received == []


def test_one_address_cannot_hold_every_handshake_slot(cluster, front, monkeypatch):
    """Connections that never start their handshake hold a slot each until HANDSHAKE_S: from one address only a few
    are let in, the rest closed at once, and a peer dialling from another address is relayed meanwhile."""
    monkeypatch.setattr(link_front, "HANDSHAKE_S", 60.0)  # held past this test's waits: nothing here times out
    front, port, received = front
    idle = []
    try:
        for _ in range(link_front.MAX_HANDSHAKES + 4):  # more than all the slots, from 127.0.0.2
            conn = socket.socket()
            conn.bind(("127.0.0.2", 0))
            conn.settimeout(15)
            conn.connect(("127.0.0.1", port))
            idle.append(conn)
        for conn in idle[MAX_HANDSHAKES_PER_ADDRESS:]:  # closed by the front without a byte from us
            conn.settimeout(10)
            with contextlib.suppress(ConnectionError):
                assert conn.recv(16) == b""
        assert front._handshaking == {"127.0.0.2": MAX_HANDSHAKES_PER_ADDRESS}
        assert _relayed(cluster, port) and received  # the peer, from 127.0.0.1
    finally:
        for conn in idle:
            conn.close()


def test_handshake_slots_count_against_an_ipv4_address_or_an_ipv6_64():
    from cipherdm_spu.link_front import _source

    assert _source(("10.0.0.7", 5)) == "10.0.0.7" == _source(("::ffff:10.0.0.7", 5, 0, 0))
    assert _source(("2001:db8::1", 5, 0, 0)) == _source(("2001:db8::ffff:1", 5, 0, 0)) == "2001:db8::/64"
    assert _source(("2001:db8:0:1::1", 5, 0, 0)) == "2001:db8:0:1::/64"
    assert _source(("fe80::1%eth0", 5, 0, 2)) == "fe80::/64"
