"""One party of the cluster: an SPU runtime on SPU's brpc link, driven over a gRPC control service.

The party holds only its own shares. A driver opens a session (every party starts a worker process
with a fresh brpc link and runtime for it, so a run that failed half-way leaves nothing behind),
sends this party its shares of the inputs, runs compiled executables, and fetches this party's shares
of the outputs. The party
never sees another party's share: the driver sends each share to its owner only, and `audit` lets a
test check exactly what arrived.

Sessions open in two phases, ``drop`` on all parties then ``open`` on all parties, so no party can
connect its new link to another's old one.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import grpc
import spu
import spu.libspu as libspu

from . import __version__, control
from .cluster_config import ClusterConfig, PartyConfig, check_tls_files, split_address
from .profiling import SpuLog, parse_party_run

log = logging.getLogger("cipherdm_spu.party")


class PartyError(RuntimeError):
    """A request the party refuses (wrong session, busy, mismatched config), sent back to the driver."""


def check_port_free(address: str, what: str) -> None:
    """Fail clearly, before starting, when a port this party must listen on is taken."""
    host, port = split_address(address, what)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # as the servers do: a port whose old connections linger in TIME_WAIT is free to listen on
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PartyError(f"{what} {address} cannot be used: {e.strerror or e}") from None


class PartyService:
    """The state of one party: at most one session, whose SPU runtime lives in a worker process.

    SPU's brpc link ends the whole process when it cannot deliver to a dead peer, so the runtime of
    a session runs in a child process: a lost peer ends the session, never the party.
    """

    def __init__(self, cluster: ClusterConfig, party: PartyConfig, log_path: Path):
        self.cluster = cluster
        self.party = party
        self.log_path = log_path
        self.session_id: Optional[str] = None
        self.worker: Optional[_Worker] = None
        self.busy = threading.Lock()  # held while the worker runs a job, or a session opens
        self.received = []  # (session, name, sha256 of the share) of every share this party was sent

    # -- methods of the control service (each takes and returns a dict) ------------------------

    def hello(self, msg: dict) -> dict:
        return {
            "party": self.party.id, "rank": self.party.rank, "package": __version__, "spu": spu.__version__,
            "config": self.cluster.fingerprint, "session": self.session_id, "busy": self.busy.locked(),
        }

    def drop(self, msg: dict) -> dict:
        """Phase one of opening a session: end the old one (refused while its run is still going)."""
        with self._exclusive():
            self._drop_session()
        return {}

    def open(self, msg: dict) -> dict:
        """Phase two: a worker with a fresh brpc link and runtime for session ``msg['session']``."""
        config = libspu.RuntimeConfig()
        config.ParseFromString(msg["runtime_config"])
        self._check_agreed(config)
        config.enable_pphlo_profile = True  # this party's own cost report (a process of its own)
        config.enable_hal_profile = False
        with self._exclusive():
            self._drop_session()
            worker = _Worker(self.cluster, self.party, self.log_path, msg["session"], config.SerializeToString())
            worker.call("ready", None, timeout=self.cluster.connect_timeout_s + 60)
            self.worker, self.session_id = worker, msg["session"]
        log.info("party %s: session %s open", self.party.id, self.session_id)
        return {}

    def set_var(self, msg: dict) -> dict:
        self._check_session(msg)
        digest = hashlib.sha256(msg["meta"] + b"".join(msg["chunks"])).hexdigest()
        self.received.append((msg["session"], msg["name"], digest))
        self._call("set_var", (msg["name"], msg["meta"], list(msg["chunks"])))
        return {}

    def get_var(self, msg: dict) -> dict:
        self._check_session(msg)
        meta, chunks = self._call("get_var", msg["name"])
        return {"meta": meta, "chunks": chunks}

    def del_var(self, msg: dict) -> dict:
        self._check_session(msg)
        self._call("del_var", list(msg["names"]))
        return {}

    def run(self, msg: dict) -> dict:
        self._check_session(msg)
        with self._exclusive():
            return self._call("run", (msg["name"], msg["code"], list(msg["inputs"]), list(msg["outputs"])))

    def close(self, msg: dict) -> dict:
        if msg.get("session") == self.session_id:
            with self._exclusive():
                self._drop_session()
        return {}

    def audit(self, msg: dict) -> dict:
        return {"received": [list(r) for r in self.received]}

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    # -- helpers -------------------------------------------------------------------------------

    def _call(self, op: str, payload):
        """One job for the worker; if it fails the session is over (the link is out of step)."""
        try:
            return self.worker.call(op, payload)
        except PartyError:
            self._drop_session()
            raise

    @contextlib.contextmanager
    def _exclusive(self):
        if not self.busy.acquire(blocking=False):
            raise PartyError(
                f"party {self.party.id} is still running a job (a run whose peer was lost ends within "
                f"the receive timeout, {self.cluster.recv_timeout_s:g} s); try again then"
            )
        try:
            yield
        finally:
            self.busy.release()

    def _check_session(self, msg: dict) -> None:
        if self.worker is None or msg.get("session") != self.session_id:
            raise PartyError(
                f"party {self.party.id} has no session {msg.get('session')!r}"
                f" (its session: {self.session_id!r}; a failed run or a newer driver ends a session)"
            )

    def _check_agreed(self, config) -> None:
        mine = self.cluster.runtime_config()
        for key in ("protocol", "field", "fxp_fraction_bits"):
            if getattr(config, key) != getattr(mine, key):
                raise PartyError(
                    f"party {self.party.id}: the driver asks for {key}={getattr(config, key)}, "
                    f"this party's cluster config says {getattr(mine, key)}"
                )

    def _drop_session(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.worker = None
        self.session_id = None


class _Worker:
    """A child process holding one session's SPU link and runtime, driven over a pipe."""

    def __init__(self, cluster, party, log_path, session_id: str, runtime_config: bytes):
        self.party = party
        context = mp.get_context("spawn")  # never fork a process that runs gRPC threads
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main, args=(child, cluster, party, str(log_path), session_id, runtime_config),
            name=f"spu-{party.id}-{session_id}", daemon=True,
        )
        self.process.start()
        child.close()
        self.lock = threading.Lock()

    def call(self, op: str, payload, timeout: Optional[float] = None):
        with self.lock:
            if op != "ready":
                self.conn.send((op, payload))
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self.conn.poll(0.2):
                if not self.process.is_alive():
                    raise PartyError(
                        f"party {self.party.id}: its SPU runtime ended during {op} (exit code "
                        f"{self.process.exitcode}; SPU's link stops the process when a peer is lost)"
                    )
                if deadline is not None and time.monotonic() > deadline:
                    raise PartyError(f"party {self.party.id}: {op} did not finish in {timeout:g} s")
            try:
                status, result = self.conn.recv()
            except EOFError:
                raise PartyError(f"party {self.party.id}: its SPU runtime ended during {op}") from None
        if status == "error":
            raise PartyError(f"party {self.party.id}: {result}")
        return result

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()  # a run blocked inside SPU cannot be interrupted any other way
        self.process.join()
        self.conn.close()


def _worker_main(conn, cluster: ClusterConfig, party: PartyConfig, log_path: str, session_id: str, runtime_config: bytes):
    """The worker process: build the link and runtime, then serve jobs until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the party process decides when this one ends
    _die_with_parent()
    spu_log = SpuLog.get(log_path)
    try:
        config = libspu.RuntimeConfig()
        config.ParseFromString(runtime_config)
        desc = libspu.link.Desc()
        desc.id = session_id
        desc.recv_timeout_ms = int(cluster.recv_timeout_s * 1000)
        desc.connect_retry_interval_ms = 200
        desc.connect_retry_times = max(1, int(cluster.connect_timeout_s / 0.2))
        for p in cluster.parties:
            desc.add_party(p.id, p.spu_address)
        if party.tls is not None:
            _enable_link_tls(desc, party)
        runtime = spu.Runtime(libspu.link.create_brpc(desc, party.rank), config)
    except Exception as e:  # noqa: BLE001 - reported to the driver through the party
        conn.send(("error", f"cannot open the SPU link: {_first_lines(e)}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            op, payload = conn.recv()
        except EOFError:
            return
        try:
            if op == "set_var":
                name, meta, chunks = payload
                share = libspu.Share()
                share.meta, share.share_chunks = meta, chunks
                runtime.set_var(name, share)
                result = None
            elif op == "get_var":
                share = runtime.get_var(payload)
                result = (share.meta, list(share.share_chunks))
            elif op == "del_var":
                for name in payload:
                    runtime.del_var(name)
                result = None
            elif op == "run":
                name, code, inputs, outputs = payload
                offset = spu_log.offset()
                start = time.perf_counter()
                runtime.run(libspu.Executable(name=name, input_names=inputs, output_names=outputs, code=code))
                seconds = time.perf_counter() - start
                result = parse_party_run(spu_log.read_from(offset))
                result["seconds"] = seconds
            else:
                raise ValueError(f"unknown job {op!r}")
        except Exception as e:  # noqa: BLE001 - reported to the driver through the party
            reply = ("error", f"{op} failed: {_first_lines(e)}")
        else:
            reply = ("ok", result)
        try:
            conn.send(reply)
        except (BrokenPipeError, EOFError):  # the party ended this session meanwhile
            return


def _die_with_parent() -> None:
    """End this worker when its party process ends, even by SIGKILL (it holds the party's SPU port)."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent was already gone before prctl took effect
        os._exit(1)

    def watch():  # elsewhere than Linux: poll
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _first_lines(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


def _enable_link_tls(desc, party: PartyConfig) -> None:
    desc.enable_ssl = True
    for opts in (desc.server_ssl_opts, desc.client_ssl_opts):
        opts.cert.certificate_path = party.tls.cert
        opts.cert.private_key_path = party.tls.key
        opts.verify.verify_depth = 1
        opts.verify.ca_file_path = party.tls.ca_cert


def _handler(service: PartyService):
    def wrap(method):
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return control.encode(method(control.decode(request)))
            except PartyError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except Exception as e:  # noqa: BLE001 - any other error goes back to the driver, the party named
                context.abort(grpc.StatusCode.INTERNAL, f"party {service.party.id}: {_first_lines(e)}")

        return grpc.unary_unary_rpc_method_handler(call)

    return grpc.method_handlers_generic_handler(
        control.SERVICE, {name: wrap(getattr(service, name)) for name in control.METHODS}
    )


def serve(cluster: ClusterConfig, party_id: str, log_dir: Path) -> int:
    """Run one party until SIGINT/SIGTERM; returns the process exit code."""
    party = cluster.party(party_id)
    check_tls_files(party)
    check_port_free(party.spu_address, f"party {party.id}: SPU link address")
    check_port_free(party.control_address, f"party {party.id}: control address")
    service = PartyService(cluster, party, Path(log_dir) / f"spu-{party.id}.log")
    server = grpc.server(cf.ThreadPoolExecutor(max_workers=8), options=control.CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((_handler(service),))
    creds = control.server_credentials(party)
    try:
        bound = (server.add_secure_port(party.control_address, creds) if creds
                 else server.add_insecure_port(party.control_address))
    except RuntimeError as e:
        raise PartyError(f"party {party.id}: cannot listen on {party.control_address}: {e}") from None
    if not bound:
        raise PartyError(f"party {party.id}: cannot listen on {party.control_address}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"party {party.id} ready: control {party.control_address}, SPU link {party.spu_address}, "
          f"config {cluster.fingerprint}", flush=True)
    stop.wait()
    print(f"party {party.id}: shutting down", flush=True)
    service.shutdown()  # first, so that a run blocked inside SPU ends and its gRPC call returns
    server.stop(grace=2).wait()
    return 0
