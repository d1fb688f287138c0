"""The driver side of a cluster session: `SecureSession(cluster=...)` talks to the parties through this.

It checks that the three parties are up and agree with the driver (package and SPU versions, the
cluster config), opens a session on all of them, sends each party its own share of every input and
nothing else, and turns the parties' own cost reports into one `RunStats`. Every call is bounded:
a party that does not answer, dies, or whose peers time out fails the run with a `ClusterError`
that names it, and the session is over (the surviving parties drop it and take the next one).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import time
from typing import Callable, List, Optional, Sequence

import grpc
import spu
import spu.libspu as libspu

from . import __version__, control
from .cluster_config import ClusterConfig, PartyConfig
from .profiling import RunStats, combine_party_runs
from .session import SessionError

#: how long a value transfer (share in or out) may take before the party counts as unresponsive
TRANSFER_TIMEOUT_S = 300.0


class ClusterError(SessionError):
    """A party is unreachable, disagrees with the driver, or failed during a run."""


class ClusterParties:
    """The three parties of a `spu-launch` cluster, as one session."""

    def __init__(self, cluster: ClusterConfig, runtime_config, session_id: str):
        self.cluster = cluster
        self.session_id = f"cipherdm-{session_id}"
        self._channels = [control.channel(p, cluster.driver_tls) for p in cluster.parties]
        self._pool = cf.ThreadPoolExecutor(3, thread_name_prefix=f"cluster-{session_id}")
        self._broken: Optional[str] = None
        self.sent: List[List[str]] = [[] for _ in cluster.parties]  # sha256 of what each party was sent
        try:
            check_parties(cluster, self._channels)
            timeout = cluster.connect_timeout_s + 10
            self._all("drop", lambda rank: {"session": self.session_id}, timeout)
            config = runtime_config.SerializeToString()
            self._all("open", lambda rank: {"session": self.session_id, "runtime_config": config}, timeout)
        except Exception:
            self._shutdown()
            raise

    def put(self, name: str, shares) -> None:
        """Send party i its share i only (and record a digest of it, for `sent`)."""
        def send(rank: int) -> dict:
            share = shares[rank]
            self.sent[rank].append(hashlib.sha256(share.meta + b"".join(share.share_chunks)).hexdigest())
            return {"session": self.session_id, "name": name, "meta": share.meta, "chunks": list(share.share_chunks)}

        self._all("set_var", send, TRANSFER_TIMEOUT_S)

    def fetch(self, name: str) -> list:
        replies = self._all("get_var", lambda rank: {"session": self.session_id, "name": name}, TRANSFER_TIMEOUT_S)
        shares = []
        for reply in replies:
            share = libspu.Share()
            share.meta = reply["meta"]
            share.share_chunks = list(reply["chunks"])
            shares.append(share)
        return shares

    def delete(self, names: Sequence[str]) -> None:
        if self._broken is None:
            self._all("del_var", lambda rank: {"session": self.session_id, "names": list(names)}, TRANSFER_TIMEOUT_S)

    def run(self, executable) -> RunStats:
        request = {
            "session": self.session_id, "name": executable.name, "code": executable.code,
            "inputs": list(executable.input_names), "outputs": list(executable.output_names),
        }
        start = time.perf_counter()
        # No fixed deadline: a party that dies fails its call at once, and one that hangs makes its
        # peers' SPU receives time out (recv_s in the config), which fails theirs.
        reports = self._all("run", lambda rank: request, None)
        return combine_party_runs(reports, time.perf_counter() - start)

    def close(self) -> None:
        if self._broken is None:
            try:
                self._all("close", lambda rank: {"session": self.session_id}, 30.0)
            except ClusterError:
                pass  # a party that is gone has nothing to close
        self._shutdown()

    # ------------------------------------------------------------------------------------------

    def _all(self, method: str, request: Callable[[int], dict], timeout: Optional[float]) -> list:
        """Call ``method`` on the three parties at once; the first failure fails the call at once."""
        if self._broken is not None:
            raise ClusterError(f"this cluster session is over: {self._broken}")
        futures = {}
        for rank, channel in enumerate(self._channels):
            stub = channel.unary_unary(control.path(method))
            futures[self._pool.submit(_call, stub, request(rank), timeout)] = rank
        done, pending = cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            fut = failed[0]
            party = self.cluster.parties[futures[fut]]
            message = _describe(fut.exception(), party, method)
            if method in ("run", "open"):
                self._broken = message
            for other in pending:
                other.cancel()
            raise ClusterError(message) from fut.exception()
        return [f.result() for f in sorted(done, key=futures.get)]

    def _shutdown(self) -> None:
        for ch in self._channels:
            ch.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _call(stub, message: dict, timeout: Optional[float]) -> dict:
    return control.decode(stub(control.encode(message), timeout=timeout))


def _describe(error: BaseException, party: PartyConfig, method: str) -> str:
    if isinstance(error, grpc.RpcError):
        code = error.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            when = "during the run (it died or lost its network)" if method == "run" else f"({method})"
            return f"party {party.id} at {party.control_address} is unreachable {when}: {error.details()}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"party {party.id} at {party.control_address} did not answer {method} in time"
        return f"party {party.id} refused {method}: {error.details()}"
    return f"party {party.id}: {method} failed: {error}"


def hello(cluster: ClusterConfig, channels=None, timeout: Optional[float] = None) -> List[dict]:
    """Each party's hello (or {"party": id, "error": why} for one that does not answer)."""
    channels = channels or [control.channel(p, cluster.driver_tls) for p in cluster.parties]
    timeout = cluster.connect_timeout_s if timeout is None else timeout
    replies = []
    for party, channel in zip(cluster.parties, channels):
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            replies.append(_call(channel.unary_unary(control.path("hello")), {}, timeout))
        except grpc.FutureTimeoutError:
            replies.append({"party": party.id, "error": f"unreachable at {party.control_address} after {timeout:g} s"})
        except grpc.RpcError as e:
            replies.append({"party": party.id, "error": _describe(e, party, "hello")})
    return replies


def check_parties(cluster: ClusterConfig, channels) -> None:
    """Raise ClusterError unless every party is up and runs what the driver runs."""
    problems = []
    for party, reply in zip(cluster.parties, hello(cluster, channels)):
        if "error" in reply:
            problems.append(f"party {party.id} {reply['error']}")
            continue
        if reply["party"] != party.id:
            problems.append(f"{party.control_address} answers as party {reply['party']}, the config says {party.id}")
        if reply["package"] != __version__ or reply["spu"] != spu.__version__:
            problems.append(
                f"party {party.id} runs cipherdm-spu {reply['package']} / spu {reply['spu']}, "
                f"the driver {__version__} / {spu.__version__}"
            )
        if reply["config"] != cluster.fingerprint:
            problems.append(
                f"party {party.id} was started with a different cluster config "
                f"(fingerprint {reply['config']}, the driver's {cluster.fingerprint})"
            )
    if problems:
        raise ClusterError("the cluster is not ready: " + "; ".join(problems))
