"""Emulated network links for a cluster whose three parties run on this machine.

Every party-to-party SPU link goes through a relay that holds each chunk for a one-way delay ``d`` and paces
it to a bandwidth ``B``. Relays, not ``tc``: this machine's kernel has no ``netem`` qdisc (``tbf``/``htb``
shape bandwidth but add no delay), while SPU's brpc link lets each party dial a peer at an address of its
own (`cluster_config`'s ``spu_dial``): party i dials party j through relay (i, j), which forwards to j's
``spu_address``. The relay only forwards bytes, so the link stays mutual TLS end to end (it sees
ciphertext, and a party still accepts only a peer holding a party-CA certificate).

The wire is each party's egress, as a host's network interface shaped to B: a chunk of n bytes that party i
sends (to either peer, on its own dials or as answers on theirs) read at time a starts at s = max(a, the end
of i's previous chunk), ends at e = s + 8n/B and is delivered at e + d. Queues are unbounded (no loss), and
store-and-forward of a chunk adds at most one chunk's 8n/B.

    python -m cipherdm_spu.netem --config configs/3pc.json --network wan --out /tmp/3pc-wan.json
        # relays up, the routed config written; spu-launch --config /tmp/3pc-wan.json on it; Ctrl-C stops
    python -m cipherdm_spu.netem --config configs/3pc.json --network wan --out /tmp/3pc-wan.json --launch
        # the same, and the three parties started on the routed config; Ctrl-C stops everything
    python -m cipherdm_spu.netem --config configs/3pc.json probe --network none lan wan
        # what the links cost: a round and a transfer over the direct links and through each emulation
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait as connection_wait
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import cluster_config
from .child_python import check_python_path, module_command, safe_import_path
from .cluster_config import ClusterConfig, split_address
from .compiler_process import die_with_parent
from .errors import ClusterConfigError, LinkEmulatorError, PartyError

#: bytes a relay reads at once (at 400 Mbps one chunk is 5 ms on the wire)
CHUNK = 256 << 10
#: the relays' scheduling priority (nice; root only): a network does not wait for the parties' CPUs
NICE = -10
#: how long starting the relays may take
START_S = 30.0
#: how often a relay looks whether its peer listens (and how long a blocked accept waits)
POLL_S = 0.05
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclasses.dataclass(frozen=True)
class Link:
    """One direction of a party-to-party link: one-way delay (seconds) and bandwidth (bits per second)."""

    delay_s: float
    bandwidth_bps: float = math.inf

    def __post_init__(self):
        if not (math.isfinite(self.delay_s) and 0 <= self.delay_s <= 10):
            raise LinkEmulatorError(f"one-way delay must be 0..10 s, got {self.delay_s!r}")
        if not (self.bandwidth_bps > 0):
            raise LinkEmulatorError(f"bandwidth must be positive, got {self.bandwidth_bps!r}")

    def describe(self) -> str:
        bw = "unlimited" if math.isinf(self.bandwidth_bps) else f"{self.bandwidth_bps / 1e6:g} Mbps"
        return f"{bw}, {self.delay_s * 1e3:g} ms one-way"


#: the SPU and Ditto papers' settings; "relay" is the relays adding nothing (what the emulator itself costs)
PRESETS = {"lan": Link(0.2e-3, 5e9), "wan": Link(20e-3, 400e6), "relay": Link(0.0)}


def link_for(network: str, delay_ms: Optional[float] = None, bandwidth_mbps: Optional[float] = None) -> Link:
    """A preset by name, or ``custom`` with a delay (ms) and a bandwidth (Mbps; None: unlimited)."""
    if network == "custom":
        if delay_ms is None:
            raise LinkEmulatorError("a custom link needs a one-way delay (--delay-ms) and may have --bandwidth-mbps")
        return Link(delay_ms / 1e3, math.inf if bandwidth_mbps is None else bandwidth_mbps * 1e6)
    if network not in PRESETS:
        raise LinkEmulatorError(f"unknown network {network!r} (presets: {', '.join(PRESETS)}, or custom)")
    return PRESETS[network]


class LinkEmulator:
    """The relays of one emulated cluster, in a child process of their own; a context manager.

    ``config()`` is the source config with every party's ``spu_dial`` routed through the relays (TLS paths
    made absolute, so it can be written anywhere). The child ends with its parent, even a killed one.
    """

    def __init__(self, config_path: os.PathLike, link: Link):
        self.source = Path(config_path)
        self.cluster = cluster_config.load(self.source)
        self.raw = json.loads(self.source.read_text())
        self.link = link
        self.routes = _routes(self.cluster)
        self.reserved = _config_ports(self.cluster)
        self.ports: Dict[Tuple[int, int], int] = {}
        self.process: Optional[mp.Process] = None

    def start(self) -> "LinkEmulator":
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, self.routes, self.reserved, self.link), daemon=True,
                                       name="cipherdm-netem")
        with safe_import_path():  # (a library caller's current folder: its resource tracker and relays never import it)
            self.process.start()
        child.close()
        try:
            if not self._conn.poll(START_S):
                raise LinkEmulatorError(f"the relays did not start in {START_S:g} s")
            status, ports = self._conn.recv()
        except (EOFError, LinkEmulatorError) as e:
            self.process.join(1)
            code = self.process.exitcode
            self.stop()
            raise LinkEmulatorError(str(e) if isinstance(e, LinkEmulatorError)
                                    else f"the relay process ended as it started (exit code {code})") from None
        if status != "ok":
            self.stop()
            raise LinkEmulatorError(f"the relays cannot start: {ports}")
        self.ports = {tuple(route): port for route, port in ports}
        return self

    def stop(self) -> None:
        """End the relays and their connections; returns when the process is gone."""
        if self.process is None:
            return
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send("stop")
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()
        self.process = None

    def cpu_seconds(self) -> float:
        """CPU seconds the relay process has used so far (Linux), to tell its load apart from the parties'."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "LinkEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def config(self) -> dict:
        raw = json.loads(json.dumps(self.raw))
        for i, party in enumerate(raw["parties"]):
            party["spu_dial"] = {self.cluster.parties[j].id: f"127.0.0.1:{self.ports[(i, j)]}"
                                 for j in range(3) if j != i}
        raw["tls"] = _absolute_paths(raw["tls"], self.source.parent)
        return raw

    def write(self, path: os.PathLike) -> Path:
        path = cluster_config.write_config(path, self.config())
        cluster_config.load(path)  # what the parties will read must validate
        return path


def _routes(cluster: ClusterConfig) -> List[Tuple[int, int, str]]:
    """(dialling rank, dialled rank, the dialled party's spu_address) for every ordered pair; refuses a
    cluster the emulator cannot sit inside."""
    for p in cluster.parties:
        host, _ = split_address(p.spu_address, f"party {p.id} spu_address")
        if host.lower() not in LOOPBACK:
            raise LinkEmulatorError(f"party {p.id}'s SPU link is on {host}: the emulator runs the three parties on "
                                    "this machine, on loopback addresses only")
        if p.spu_dial:
            raise LinkEmulatorError(f"party {p.id} already has spu_dial routes; emulate links of a config without them")
    return [(i, j, cluster.parties[j].spu_address) for i in range(3) for j in range(3) if i != j]


def _config_ports(cluster: ClusterConfig) -> Tuple[int, ...]:
    """Every port the config names: a relay must not take one, since the parties bind them after the relays
    start (a config written on free ports may name a port the OS would hand a relay)."""
    return tuple(split_address(address, "address")[1] for p in cluster.parties
                 for address in (p.spu_address, p.control_address))


def _absolute_paths(tls, base: Path):
    """The tls section with every file path absolute (relative ones are taken from the config's folder)."""
    if isinstance(tls, dict):
        return {k: _absolute_paths(v, base) for k, v in tls.items()}
    return str((base / tls).resolve()) if isinstance(tls, str) else tls


# -- the relay process -------------------------------------------------------------------------------


class _Wire:
    """One party's egress: when the last chunk put on it leaves the wire (see the module docstring)."""

    def __init__(self, link: Link):
        self.link, self.free_at, self.lock = link, 0.0, threading.Lock()

    def deliver_at(self, arrived: float, n: int) -> float:
        with self.lock:
            self.free_at = max(arrived, self.free_at) + 8 * n / self.link.bandwidth_bps
            return self.free_at + self.link.delay_s


def _pump(src: socket.socket, dst: socket.socket, wire: _Wire) -> None:
    """Forward src -> dst through ``wire``: a reader stamps each chunk's delivery time, a writer keeps it (a
    wire that adds nothing forwards at once, from the reader)."""
    if wire.link.delay_s == 0 and math.isinf(wire.link.bandwidth_bps):
        with contextlib.suppress(OSError):
            while data := src.recv(CHUNK):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        return
    chunks: queue.SimpleQueue = queue.SimpleQueue()

    def write():
        while True:
            due, data = chunks.get()
            if data is None:
                break
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    while True:
        try:
            data = src.recv(CHUNK)
        except OSError:
            data = b""
        if not data:
            chunks.put((0.0, None))
            break
        chunks.put((wire.deliver_at(time.perf_counter(), len(data)), data))
    writer.join()


class _Route:
    """One relay (i dials j): listens on its port only while j accepts connections on its SPU address, so that a
    dial before j is up is refused as a direct one would be (brpc's TLS client aborts its process when an
    accepted connection drops during the handshake). While j is down the relay tries j every POLL_S (a
    connection opened and closed at once); it stops listening again when j closes every connection (j's
    worker ended with its session) or refuses a new one."""

    def __init__(self, target: str, forward: _Wire, backward: _Wire, reserved: Tuple[int, ...]):
        self.host, self.target_port = split_address(target, "relay target")
        self.forward, self.backward = forward, backward
        self.sock = _free_port_socket(reserved)
        self.port = self.sock.getsockname()[1]
        self.conns: List[socket.socket] = []
        self.live = 0  # connections whose peer side is still open
        self.peer_gone = threading.Event()
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        listening = False
        while not self.closed.is_set():
            if not listening:
                if not _accepts(self.host, self.target_port):
                    self.closed.wait(POLL_S)
                    continue
                self.peer_gone.clear()
                self.sock.listen(16)
                listening = True
            try:
                down, _ = self.sock.accept()
            except (socket.timeout, OSError):
                if self.peer_gone.is_set():
                    listening = self._unlisten()
                continue
            try:
                upstream = socket.create_connection((self.host, self.target_port), timeout=5)
            except OSError:  # j stopped listening meanwhile: reset this dial (an error, not a clean close)
                down.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                down.close()
                listening = self._unlisten()
                continue
            for sock in (down, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.conns += [down, upstream]
                self.live += 1
            threading.Thread(target=_pump, args=(down, upstream, self.forward), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, down), daemon=True).start()

    def _answers(self, upstream: socket.socket, down: socket.socket) -> None:
        _pump(upstream, down, self.backward)
        with self.lock:
            self.live -= 1
            if self.live == 0:
                self.peer_gone.set()

    def _unlisten(self) -> bool:
        self.sock.close()
        self.sock = _bound(self.port)
        return False

    def close(self) -> None:
        self.closed.set()
        self.thread.join()
        with self.lock:
            socks = [self.sock] + self.conns
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _free_port_socket(reserved: Tuple[int, ...]) -> socket.socket:
    """`_bound` on a port the OS picks, picked again while it is one of ``reserved`` (the sockets held meanwhile
    keep the OS from handing the same port back)."""
    held = []
    try:
        while (sock := _bound(0)).getsockname()[1] in reserved:
            held.append(sock)
        return sock
    finally:
        for other in held:
            other.close()


def _bound(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:port, not listening yet (a dial to it is refused); accept() polls."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.settimeout(POLL_S)
    return sock


def _accepts(host: str, port: int) -> bool:
    """Whether ``host:port`` accepts a TCP connection now (the connection is closed at once)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def _serve(conn, routes, reserved: Tuple[int, ...], link: Link) -> None:
    """The relay process: a `_Route` per ordered pair; answers their ports, then forwards until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its parent decides when it ends
    die_with_parent()
    with contextlib.suppress(OSError):  # not root: the relays share the CPUs at the parties' priority
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    wires = [_Wire(link) for _ in range(3)]
    relays = []
    try:
        for i, j, target in routes:
            relays.append(_Route(target, wires[i], wires[j], reserved))
    except OSError as e:
        conn.send(("error", str(e)))
        return
    for relay in relays:
        relay.thread.start()
    conn.send(("ok", [((i, j), relay.port) for (i, j, _), relay in zip(routes, relays)]))
    with contextlib.suppress(EOFError, OSError):
        conn.recv()  # "stop", or the parent is gone
    for relay in relays:
        relay.close()


# -- the probe: what a round and a transfer take over the links --------------------------------------


#: how long the probe waits for the other parties' reports once one failed
PROBE_GRACE_S = 5.0


def probe(config_path: os.PathLike, rounds: int = 20, payload: int = 1 << 20, session_id: str = "netem-probe") -> dict:
    """Three processes link as the parties would (`party.link_desc`: TLS, dial routes) and time, at party 0,
    ``rounds`` all_gathers of a few bytes (each waits one one-way delay at least) and ``payload`` bytes sent
    to party 1, answered by one byte (at least 8 * payload / B + 2 d). Returns seconds per round and the
    transfer's seconds; raises LinkEmulatorError when a party cannot link (e.g. a peer failed TLS)."""
    cluster = cluster_config.load(config_path)
    context = mp.get_context("spawn")
    pipes, procs = [], []
    for rank in range(3):
        parent, child = context.Pipe()
        proc = context.Process(target=_probe_party, args=(child, cluster, rank, rounds, payload, session_id),
                               daemon=True)
        with safe_import_path():  # they hold the parties' keys
            proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    deadline = time.monotonic() + cluster.connect_timeout_s + cluster.recv_timeout_s + 60
    replies: Dict[int, tuple] = {}
    try:  # a failure ends the probe soon (its peers would wait for the failed party until their timeouts), once
        # the others had PROBE_GRACE_S to report theirs: the first to report is not always the cause
        while len(replies) < 3:
            waiting = {pipes[r]: r for r in range(3) if r not in replies}
            ready = connection_wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                if any(status != "ok" for status, _ in replies.values()):
                    break
                late = ", ".join(cluster.parties[r].id for r in waiting.values())
                raise LinkEmulatorError(f"probe: {late} did not finish in time")
            for pipe in ready:
                rank = waiting[pipe]
                try:
                    replies[rank] = pipe.recv()
                except EOFError:  # e.g. brpc ended the process: named, and the others still heard
                    procs[rank].join(1)
                    replies[rank] = ("error", f"its process ended without a report (exit code {procs[rank].exitcode})")
                if replies[rank][0] != "ok":
                    deadline = min(deadline, time.monotonic() + PROBE_GRACE_S)
    finally:
        for proc in procs:
            proc.join(5 if len(replies) == 3 else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [f"{cluster.parties[r].id}: {msg}" for r, (status, msg) in sorted(replies.items()) if status != "ok"]
    silent = [cluster.parties[r].id for r in range(3) if r not in replies]
    if silent:  # e.g. a party whose TLS dial keeps failing: its peers time out waiting for it
        errors.insert(0, f"{', '.join(silent)} did not report in {PROBE_GRACE_S:g} s after a peer failed")
    if errors:
        raise LinkEmulatorError("probe: " + "; ".join(errors))
    return replies[0][1]


def _probe_party(conn, cluster: ClusterConfig, rank: int, rounds: int, payload: int, session_id: str) -> None:
    from spu import libspu

    from .party import link_desc

    try:
        link = libspu.link.create_brpc(link_desc(cluster, cluster.parties[rank], session_id), rank)
        link.all_gather("warm-up")
        times = []
        for k in range(rounds):
            start = time.perf_counter()
            link.all_gather(str(k))
            times.append(time.perf_counter() - start)
        transfer = None
        if rank == 0:
            start = time.perf_counter()
            link.send(1, "x" * payload)
            link.recv(1)
            transfer = time.perf_counter() - start
        elif rank == 1:
            link.recv(0)
            link.send(0, "y")
        link.all_gather("done")
    except Exception as e:  # noqa: BLE001 - reported to the caller
        conn.send(("error", " ".join(str(e).split())[:300]))
        return
    conn.send(("ok", {"round_s": statistics.median(times), "rounds_s": sum(times), "transfer_s": transfer,
                      "rounds": rounds, "payload_bytes": payload}))
    # reported first: brpc may abort a process whose peer closed its TLS connection while acks were in flight
    # (more often when the acks are delayed), which is of no consequence once the probe is over
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):  # the survivors' retries to a peer already gone are noise now
        os.dup2(devnull, fd)
    link.stop_link()


# -- the command line --------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cipherdm_spu.netem", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=["run", "probe"], default="run",
                   help="run: relays until Ctrl-C (default); probe: measure rounds and a transfer per network")
    p.add_argument("--config", type=Path, default=Path("configs/3pc.json"), help="the cluster config (default: configs/3pc.json)")
    p.add_argument("--network", nargs="+", default=["wan"], choices=[*PRESETS, "none", "custom"],
                   help="lan (5 Gbps, 0.2 ms one-way), wan (400 Mbps, 20 ms), relay (relays adding nothing), "
                        "custom (--delay-ms, --bandwidth-mbps); probe also takes none (direct links) and several")
    p.add_argument("--delay-ms", type=float, help="custom: one-way delay in milliseconds")
    p.add_argument("--bandwidth-mbps", type=float, help="custom: bandwidth in Mbps (default: unlimited)")
    p.add_argument("--out", type=Path, help="run: where to write the routed config")
    p.add_argument("--launch", action="store_true", help="run: also start the three parties (spu-launch) on it")
    p.add_argument("--rounds", type=int, default=50, help="probe: all_gather rounds (default: 50)")
    p.add_argument("--payload-mb", type=float, default=4.0, help="probe: MB sent from P0 to P1 (default: 4)")
    args = p.parse_args(argv)
    with safe_import_path():  # its probe links with the parties' keys, and it may start the parties
        try:
            check_python_path()
            if args.command == "probe":
                return _probe_command(args)
            if len(args.network) != 1 or args.network[0] == "none":
                p.error("run takes one emulated network: lan, wan, relay or custom")
            if args.out is None:
                p.error("run needs --out, the routed config to write")
            with LinkEmulator(args.config, link_for(args.network[0], args.delay_ms, args.bandwidth_mbps)) as emulator:
                emulator.write(args.out)
                print(f"netem: {emulator.link.describe()} on every party link; routed config {args.out}", flush=True)
                return _wait_or_launch(args.out, args.launch)
        except (LinkEmulatorError, ClusterConfigError, PartyError) as e:
            print(f"netem: {e}", file=sys.stderr)
            return 2


def _wait_or_launch(config: Path, launch: bool) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if not launch:
        print("netem: Ctrl-C stops the relays", flush=True)
        stop.wait()
        return 0
    launcher = subprocess.Popen([*module_command("cipherdm_spu.cluster"), "--config", str(config)])
    while not stop.wait(0.5) and launcher.poll() is None:
        pass
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
    return launcher.wait()


def _probe_command(args) -> int:
    payload = int(args.payload_mb * 1e6)
    print(f"{'network':<10} {'round (ms, median)':>20} {'transfer of ' + str(args.payload_mb) + ' MB (ms)':>26}")
    for network in args.network:
        if network == "none":
            result = probe(args.config, args.rounds, payload)
        else:
            with LinkEmulator(args.config, link_for(network, args.delay_ms, args.bandwidth_mbps)) as emulator, \
                    tempfile.TemporaryDirectory() as folder:
                result = probe(emulator.write(Path(folder) / "routed.json"), args.rounds, payload)
        print(f"{network:<10} {result['round_s'] * 1e3:>20.3f} {result['transfer_s'] * 1e3:>26.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
