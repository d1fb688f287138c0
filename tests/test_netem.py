"""The link emulator: delay and bandwidth applied to the parties' TLS links (lower bounds only: load can only
slow a link down), relays that refuse while their peer is down and leave nothing behind, clear refusals, and a
dial route that cannot hand a party's link to anyone without a party certificate."""

import json
import socket
import ssl
import threading

import pytest

from cipherdm_spu import cluster_config as cc
from cipherdm_spu.errors import LinkEmulatorError
from cipherdm_spu.netem import Link, LinkEmulator, link_for, main, probe

from .cluster_fixtures import make_certs, write_config


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A loopback cluster config with its development certificates (no parties started)."""
    folder = tmp_path_factory.mktemp("netem")
    path = write_config(folder / "3pc.json", connect_s=30, recv_s=30)  # three processes importing SPU on a loaded machine
    make_certs(path, "owner,user")
    return path


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_delay_and_bandwidth_are_applied_to_the_tls_link(config, tmp_path):
    delay, bandwidth, payload, rounds = 0.03, 8e6, 200_000, 6
    with LinkEmulator(config, Link(delay, bandwidth)) as emulator:
        routed = emulator.write(tmp_path / "routed.json")
        result = probe(routed, rounds=rounds, payload=payload)
    # a round's message to a peer is sent only once the peer's previous one arrived: two rounds >= 2 one-way delays
    assert result["rounds_s"] >= rounds * delay
    # the payload crosses the wire at the bandwidth and one delay, the answer one more delay
    assert result["transfer_s"] >= 8 * payload / bandwidth + 2 * delay


def test_relays_refuse_while_the_peer_is_down_and_stop_without_a_trace(config):
    emulator = LinkEmulator(config, link_for("wan")).start()
    process, ports = emulator.process, list(emulator.ports.values())
    assert len(ports) == 6 and process.is_alive()
    assert all(refused(port) for port in ports)  # no party listens: a dial is refused, as a direct one would be
    routed = emulator.config()
    assert cc.from_dict(routed).dial_addresses(cc.from_dict(routed).parties[0])[1] == f"127.0.0.1:{emulator.ports[(0, 1)]}"
    emulator.stop()
    assert not process.is_alive() and process.exitcode == 0
    assert all(refused(port) for port in ports)


def test_a_relay_never_takes_a_port_the_config_names(config, monkeypatch):
    """The parties bind their config's ports after the relays start; a relay the OS handed one of them would
    make the routed config name one port twice (seen in CI on a config written on free ports)."""
    from cipherdm_spu import netem

    assert sorted(netem._config_ports(cc.load(config))) == sorted(
        int(p[kind].rsplit(":", 1)[1]) for p in json.loads(config.read_text())["parties"]
        for kind in ("spu_address", "control_address"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
    handed, real_bound = [], netem._bound

    def os_hands_the_reserved_port_first(port):
        sock = real_bound(taken if port == 0 and not handed else port)
        handed.append(sock)
        return sock

    monkeypatch.setattr(netem, "_bound", os_hands_the_reserved_port_first)
    relay = netem._free_port_socket((taken,))
    try:
        assert relay.getsockname()[1] != taken
        assert handed[0].fileno() == -1  # the reserved port was let go
    finally:
        relay.close()


def test_what_cannot_be_emulated_is_refused_clearly(config, tmp_path, capsys):
    raw = json.loads(config.read_text())
    raw["parties"][2]["spu_address"] = "192.0.2.7:7000"  # another host
    (tmp_path / "remote.json").write_text(json.dumps(raw))
    with pytest.raises(LinkEmulatorError, match="P2's SPU link is on 192.0.2.7"):
        LinkEmulator(tmp_path / "remote.json", link_for("lan"))
    raw = json.loads(config.read_text())
    raw["parties"][0]["spu_dial"] = {"P1": "127.0.0.1:7001"}
    (tmp_path / "routed.json").write_text(json.dumps(raw))
    with pytest.raises(LinkEmulatorError, match="already has spu_dial"):
        LinkEmulator(tmp_path / "routed.json", link_for("lan"))
    with pytest.raises(LinkEmulatorError, match="one-way delay"):
        Link(-1.0)
    with pytest.raises(LinkEmulatorError, match="bandwidth"):
        link_for("custom", delay_ms=5, bandwidth_mbps=0)
    assert main(["--config", str(tmp_path / "remote.json"), "--network", "lan", "--out", str(tmp_path / "x.json")]) == 2
    assert "on loopback addresses only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0


def test_a_dial_route_to_a_non_party_fails_tls(config, tmp_path):
    """P0 is routed to an impostor for P1 that holds a real certificate, of the client CA: P0's TLS refuses it."""
    tls = json.loads(config.read_text())["tls"]
    folder = config.parent
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / tls["clients"]["owner"]["cert"], folder / tls["clients"]["owner"]["key"])
    impostor = socket.socket()
    impostor.bind(("127.0.0.1", 0))
    impostor.listen(8)
    impostor.settimeout(0.5)
    seen, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = impostor.accept()
            except OSError:
                continue
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls_conn:
                    seen.append(("handshake", tls_conn.recv(64)))
            except (ssl.SSLError, OSError) as e:
                seen.append(("refused", str(e)))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    raw = json.loads(config.read_text())
    raw["parties"][0]["spu_dial"] = {"P1": f"127.0.0.1:{impostor.getsockname()[1]}"}
    raw["timeouts"]["connect_s"] = 2
    redirected = config.parent / "redirected.json"  # beside the certificates its relative paths name
    redirected.write_text(json.dumps(raw))
    try:
        with pytest.raises(LinkEmulatorError, match="P0"):
            probe(redirected, rounds=1, payload=10)
    finally:
        stop.set()
        thread.join()
        impostor.close()
    assert seen and all(kind == "refused" for kind, _ in seen), seen


def test_probe_over_direct_links_works(config):
    result = probe(config, rounds=2, payload=1000)
    assert result["rounds"] == 2 and result["transfer_s"] > 0
