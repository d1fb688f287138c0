"""A client of the cluster (the model owner or a user): mutually authenticated channels to the three parties.

Every call carries a deadline, runs on the three parties at once, and fails with a `ClusterError`
that names the party at fault: one that is unreachable, one that does not answer in time (its control
service hangs), or, when a step fails because peers gave up waiting, the party whose SPU runtime was
still running while the others timed out. Share i of a value goes to party i only (`put_shares`).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import grpc
import spu

from . import messages
from ._version import __version__
from .cluster_config import ClusterConfig, role_of
from .errors import ClusterConfigError, ClusterError
from .messages import METHODS, POLL_S
from .share_wire import content_of

#: grace added to a polled call's deadline (network, scheduling)
DEADLINE_GRACE_S = 10.0
#: how long a session's second close to a party that was unreachable waits for its connection to come back
CLOSE_WAIT_S = 5.0


class PartyClients:
    """The channels of one client identity (a name in the config's ``tls.clients``) to the three parties."""

    def __init__(self, cluster: ClusterConfig, identity: str):
        self.cluster = cluster
        credentials = cluster.client(identity)
        credentials.check_files(f"client {identity}", "; or act as an identity whose files this host has: --as NAME")
        self.identity, self.role = identity, role_of(identity)
        read = lambda p: Path(p).read_bytes()  # noqa: E731
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(credentials.trusted_ca), private_key=read(credentials.key),
            certificate_chain=read(credentials.cert),
        )
        # each party's certificate must name the party itself: a client never mistakes one party for another
        self._channels = [
            grpc.secure_channel(p.control_address, creds,
                                options=messages.CHANNEL_OPTIONS + [("grpc.ssl_target_name_override", p.id)])
            for p in cluster.parties
        ]
        self._pool = cf.ThreadPoolExecutor(3, thread_name_prefix=f"client-{identity}")

    # -- calls ------------------------------------------------------------------------------------

    def deadline(self, method: str) -> float:
        """A call's deadline: polled calls hold at most POLL_S; transfers get the receive timeout."""
        base = self.cluster.connect_timeout_s + DEADLINE_GRACE_S
        return base + (max(POLL_S, self.cluster.recv_timeout_s) if METHODS[method].long else 0.0)

    def call(self, rank: int, method: str, request: messages.Message, contents: Sequence[bytes] = (),
             timeout: Optional[float] = None, wait_for_ready: bool = False):
        """``method`` on one party; a share-carrying method (`messages.Method.streams_shares`) sends ``contents``, the
        content of each share its header names, after the header."""
        spec = METHODS[method]
        timeout = self.deadline(method) if timeout is None else timeout
        if spec.streams_shares:
            stub = self._channels[rank].stream_unary(spec.path)
            reply = stub(messages.share_stream(request, contents), timeout=timeout, wait_for_ready=wait_for_ready)
        elif contents:
            raise ValueError(f"{method} carries no shares")
        else:
            reply = self._channels[rank].unary_unary(spec.path)(request.encode(), timeout=timeout,
                                                                 wait_for_ready=wait_for_ready)
        return spec.reply.decode(reply)

    def call_all(self, method: str, request: Callable[[int], messages.Message] | messages.Message,
                 contents: Optional[Callable[[int], Sequence[bytes]]] = None) -> list:
        """``method`` on the three parties at once (with ``contents(rank)``, party rank's share contents, for a
        share-carrying method); the first failure raises ClusterError naming its party."""
        make = request if callable(request) else (lambda rank: request)
        futures = {self._pool.submit(self.call, rank, method, make(rank),
                                      contents=contents(rank) if contents else ()): rank
                   for rank in range(3)}
        done, pending = cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        for fut in done:
            if fut.exception() is not None:
                for other in pending:
                    other.cancel()
                raise ClusterError(self.describe(fut.exception(), futures[fut], method)) from fut.exception()
        return [f.result() for f in sorted(done, key=futures.get)]

    def until_done(self, method: str, request: messages.Message, what: str, limit_s: float = 7200.0) -> List[dict]:
        """Call a polled method on every party until all report "done"; the reports, by party.

        When a party fails, the others are asked once more, so that the error names the party at
        fault: a party still running its step while its peers timed out waiting for it is the one
        whose SPU runtime stalled. Parties that are done are asked again every round (the methods are
        idempotent: a done job answers "done" at once) so that, while a slower party still compiles or
        steps, their sessions do not fall silent for ``session_idle_s`` and get dropped.
        """
        reports: List[Optional[dict]] = [None] * 3
        deadline = time.monotonic() + limit_s
        while True:
            if time.monotonic() > deadline:
                waiting = [self.cluster.parties[r].id for r in range(3) if reports[r] is None]
                raise ClusterError(f"{what} failed: {' and '.join(waiting)} still ran it after {limit_s:g} s")
            futures = {self._pool.submit(self.call, r, method, request): r for r in range(3)}
            failures, running = {}, []
            for fut in cf.as_completed(futures):
                rank = futures[fut]
                try:
                    reply = fut.result()
                except grpc.RpcError as e:
                    failures[rank] = e
                    continue
                if reply.state == "done":
                    if reports[rank] is None:
                        reports[rank] = json.loads(reply.report)
                else:
                    running.append(rank)
            if failures:
                raise ClusterError(self._blame(failures, running, method, request, what))
            if all(r is not None for r in reports):
                return reports

    def put_shares(self, method: str, shares: Sequence, request: Callable[[int, object], messages.Message]) -> None:
        """Send share i (an SPU share) to party i only, after the header ``request(i, share i)``."""
        self.call_all(method, lambda rank: request(rank, shares[rank]),
                      contents=lambda rank: [content_of(shares[rank].share_chunks)])

    def call_each(self, method: str, request: messages.Message) -> list:
        """``method`` on each party in turn, whatever the others answer: each party's reply, or a string saying why
        it failed (naming the party). For commands that report party by party (`spu-launch info`, `delete`)."""
        outcomes = []
        for rank in range(3):
            try:
                outcomes.append(self.call(rank, method, request))
            except grpc.RpcError as e:
                outcomes.append(self.describe(e, rank, method))
        return outcomes

    def close_session(self, session_id: str) -> List[str]:
        """End session ``session_id`` at the three parties at once, each whatever the others answer. A party that was
        unreachable (a dropped connection) is asked once more, its call waiting up to CLOSE_WAIT_S for the connection
        to come back (gRPC's reconnect backoff refuses calls that do not wait): a party that never gets the close keeps
        the session, and the user's shares, until its ``session_idle_s`` (one that restarted holds none). Returns why
        each party that did not confirm the close did not (a refusal, no answer, a reply that is not one), by rank."""
        request = messages.SessionRef(session_id)

        def close_at(rank: int) -> Optional[str]:
            try:
                try:
                    self.call(rank, "session_close", request)
                except grpc.RpcError as unreachable:
                    if unreachable.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    try:
                        self.call(rank, "session_close", request, timeout=CLOSE_WAIT_S, wait_for_ready=True)
                    except grpc.RpcError as again:
                        if again.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                            raise
                        return f"{self.describe(unreachable, rank, 'session_close')}; still after {CLOSE_WAIT_S:g} s"
            except Exception as e:  # noqa: BLE001 (anything: the other parties are closed all the same)
                return self.describe(e, rank, "session_close")
            return None

        # (threads of its own: the shared pool may still run a failed job's transfers, which would hold the closes)
        with cf.ThreadPoolExecutor(3, thread_name_prefix=f"close-{self.identity}") as pool:
            return [reason for reason in pool.map(close_at, range(3)) if reason is not None]

    def hello(self, timeout: Optional[float] = None) -> list:
        """Each party's HelloReply, or a string saying why it did not answer."""
        timeout = self.cluster.connect_timeout_s if timeout is None else timeout
        replies = []
        for rank, party in enumerate(self.cluster.parties):
            try:  # waits for the connection, up to the timeout
                replies.append(self.call(rank, "hello", messages.Empty(), timeout=timeout, wait_for_ready=True))
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    replies.append(f"unreachable at {party.control_address} after {timeout:g} s ({e.details()})")
                else:
                    replies.append(self.describe(e, rank, "hello"))
        return replies

    def check_ready(self) -> None:
        """Raise ClusterError unless the three parties are up and run what this client runs."""
        problems = []
        for party, reply in zip(self.cluster.parties, self.hello()):
            if isinstance(reply, str):
                problems.append(f"party {party.id} {reply}")
                continue
            if reply.party != party.id:
                problems.append(f"{party.control_address} answers as party {reply.party}, the config says {party.id}")
            if reply.client != self.identity:  # the parties act (namespaces, policies) on the certificate's name
                problems.append(f"party {party.id} knows this client as {reply.client!r}: the certificate of "
                                f"tls.clients.{self.identity} names another client")
            if reply.package != __version__ or reply.spu != spu.__version__:
                problems.append(f"party {party.id} runs cipherdm-spu {reply.package} / spu {reply.spu}, "
                                f"this client {__version__} / {spu.__version__}")
            if reply.config != self.cluster.fingerprint:
                problems.append(f"party {party.id} was started with a different cluster config "
                                f"(fingerprint {reply.config}, this client's {self.cluster.fingerprint})")
        if problems:
            raise ClusterError("the cluster is not ready: " + "; ".join(problems))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "PartyClients":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- errors -----------------------------------------------------------------------------------

    def describe(self, error: BaseException, rank: int, method: str) -> str:
        party = self.cluster.parties[rank]
        if isinstance(error, grpc.RpcError):
            code = error.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                return f"party {party.id} at {party.control_address} is unreachable ({method}): {error.details()}"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return (f"party {party.id} at {party.control_address} did not answer {method} within "
                        f"{self.deadline(method):g} s (its control service is stalled)")
            return f"party {party.id} refused {method}: {error.details()}"
        return f"party {party.id}: {method} failed: {error}"

    def _blame(self, failures: dict, running: list, method: str, request: messages.Message, what: str) -> str:
        """The error of a failed polled call, naming the party at fault."""
        ids = lambda ranks: " and ".join(self.cluster.parties[r].id for r in sorted(ranks))  # noqa: E731
        silent = [r for r, e in failures.items()
                  if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)]
        if silent:
            return f"{what} failed: " + "; ".join(self.describe(failures[r], r, method) for r in sorted(silent))
        reasons = "; ".join(self.describe(e, r, method) for r, e in sorted(failures.items()))
        # a peer is to blame only when the failed parties all timed out waiting for one, and it still runs
        waited = all("timeout" in (e.details() or "").lower() for e in failures.values())
        stalled = [r for r in running if waited and self._still_running(r, method, request)]
        if stalled:
            return (f"{what} failed: {ids(stalled)} still ran it while {ids(failures)} gave up waiting for a peer, "
                    f"so {ids(stalled)}'s SPU runtime stalled ({reasons})")
        return f"{what} failed: {reasons}"

    def _still_running(self, rank: int, method: str, request: messages.Message) -> bool:
        try:
            return self.call(rank, method, request).state == "running"
        except grpc.RpcError:
            return False


def require_role(clients: PartyClients, role: str) -> None:
    if clients.role != role:
        raise ClusterConfigError(f"client {clients.identity!r} has the {clients.role} role; this needs the {role} role")
