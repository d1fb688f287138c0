"""spu-launch: start the parties of a three-party cluster from its config, or ask which are up.

    spu-launch --config configs/3pc.json              # every party whose host is this machine
    spu-launch --config configs/3pc.json --party P2   # one party (on its own host)
    spu-launch --config configs/3pc.json status       # which parties are up

Each party is its own OS process (see `cipherdm_spu.party`). Started together, the launcher supervises
them: Ctrl-C or SIGTERM stops all of them cleanly; a party that fails to start stops the others; a
party that dies later is reported and the others keep serving.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List

from . import cluster_config
from .cluster_config import ClusterConfig, ClusterConfigError

DEFAULT_CONFIG = "configs/3pc.json"
STARTUP_TIMEOUT_S = 60.0


def local_hosts() -> set:
    """Names and addresses by which this machine can be meant in a config."""
    names = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname(), socket.getfqdn()}
    try:
        names.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return {n.lower() for n in names}


def local_parties(cluster: ClusterConfig) -> List[str]:
    here = local_hosts()
    return [p.id for p in cluster.parties if p.control_host.lower() in here]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="spu-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", nargs="?", choices=["start", "status"], default="start",
                   help="start parties (default) or report which parties are up")
    p.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG), help=f"cluster config (default: {DEFAULT_CONFIG})")
    p.add_argument("--party", help="start only this party (its id in the config)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="where each party writes SPU's log (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cluster = cluster_config.load(args.config)
        if args.command == "status":
            return status(cluster)
        log_dir = args.log_dir or Path(tempfile.gettempdir()) / "cipherdm-spu-cluster"
        log_dir.mkdir(parents=True, exist_ok=True)
        if args.party:
            from .party import PartyError, serve

            try:
                return serve(cluster, args.party, log_dir)
            except PartyError as e:
                print(f"spu-launch: {e}", file=sys.stderr)
                return 2
        return supervise(args.config, cluster, log_dir)
    except ClusterConfigError as e:
        print(f"spu-launch: {e}", file=sys.stderr)
        return 2


def status(cluster: ClusterConfig) -> int:
    """Print one line per party; exit 0 when all three are up."""
    from .driver import hello

    up = 0
    for party, reply in zip(cluster.parties, hello(cluster, timeout=min(cluster.connect_timeout_s, 5.0))):
        if "error" in reply:
            print(f"{party.id}  DOWN  {reply['error']}")
            continue
        up += 1
        state = "busy" if reply["busy"] else ("in session " + reply["session"] if reply["session"] else "idle")
        agrees = "" if reply["config"] == cluster.fingerprint else "  (started with a DIFFERENT config)"
        print(f"{party.id}  UP    {party.control_address}  {state}  cipherdm-spu {reply['package']}, spu {reply['spu']}{agrees}")
    print(f"{up}/3 parties up")
    return 0 if up == len(cluster.parties) else 1


def supervise(config_path: Path, cluster: ClusterConfig, log_dir: Path) -> int:
    """Start the local parties as child processes and watch them until a signal or their end."""
    ids = local_parties(cluster)
    if not ids:
        print(f"spu-launch: no party of {config_path} has a host on this machine; use --party on each host",
              file=sys.stderr)
        return 2
    children = {}
    ready = set()
    for party_id in ids:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cipherdm_spu.cluster", "--config", str(config_path), "--party", party_id,
             "--log-dir", str(log_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        children[party_id] = proc
        threading.Thread(target=_echo, args=(party_id, proc, ready), daemon=True).start()

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    started = time.monotonic()
    reported = set()
    code = 0
    while not stopping.is_set():
        for party_id, proc in children.items():
            rc = proc.poll()
            if rc is None or party_id in reported:
                continue
            reported.add(party_id)
            if party_id not in ready:
                print(f"spu-launch: party {party_id} failed to start (exit {rc}); stopping the others", file=sys.stderr)
                stopping.set()
                code = 2
            else:
                print(f"spu-launch: party {party_id} exited (code {rc}); the others keep serving", file=sys.stderr)
        if len(reported) == len(children):
            break
        if len(ready) < len(children) and time.monotonic() - started > STARTUP_TIMEOUT_S:
            print(f"spu-launch: parties {sorted(set(ids) - ready)} not ready after {STARTUP_TIMEOUT_S:g} s; stopping",
                  file=sys.stderr)
            stopping.set()
            code = 2
        stopping.wait(0.2)
    _stop_all(children.values())
    return code


def _echo(party_id: str, proc: subprocess.Popen, ready: set) -> None:
    for line in proc.stdout:
        if line.startswith(f"party {party_id} ready"):
            ready.add(party_id)
        print(f"[{party_id}] {line}", end="", flush=True)


def _stop_all(procs, grace_s: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
