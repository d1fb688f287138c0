"""PartyClients' session close: each party at once, one that was unreachable asked again (waiting for its
connection), and what was never confirmed said, whatever the others answered."""

import threading
import types

import grpc
import pytest

from cipherdm_spu.client import CLOSE_WAIT_S, PartyClients


class _Failure(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "a test's failure"


def _clients(answers):
    """PartyClients whose calls answer from ``answers[rank]``, in turn: None (done), a status code (raised as gRPC's
    error) or an exception (raised as it is, e.g. a reply that does not decode)."""
    parties = [types.SimpleNamespace(id=f"P{r}", control_address=f"127.0.0.1:{9000 + r}") for r in range(3)]
    clients = PartyClients.__new__(PartyClients)
    clients.cluster = types.SimpleNamespace(parties=parties, connect_timeout_s=5.0, recv_timeout_s=60.0)
    clients.identity = "user"
    clients.calls, lock = [], threading.Lock()

    def call(rank, method, request, timeout=None, wait_for_ready=False):
        with lock:
            clients.calls.append((rank, method, request.session_id, timeout, wait_for_ready))
            answer = answers[rank].pop(0) if answers[rank] else None
        if isinstance(answer, grpc.StatusCode):
            raise _Failure(answer)
        if isinstance(answer, Exception):
            raise answer

    clients.call = call
    return clients


def test_a_close_reaches_every_party_once_when_all_answer():
    clients = _clients([[], [], []])
    assert clients.close_session("s1") == []
    assert sorted(clients.calls) == [(r, "session_close", "s1", None, False) for r in range(3)]


def test_an_unreachable_party_is_asked_again_waiting_for_its_connection():
    clients = _clients([[], [grpc.StatusCode.UNAVAILABLE], []])
    assert clients.close_session("s1") == []
    assert [c for c in clients.calls if c[0] == 1] == [(1, "session_close", "s1", None, False),
                                                     (1, "session_close", "s1", CLOSE_WAIT_S, True)]
    assert len(clients.calls) == 4  # the others once


def test_what_never_confirmed_the_close_is_said_and_the_others_are_closed_all_the_same():
    clients = _clients([[grpc.StatusCode.PERMISSION_DENIED],
                        [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED],
                        [ValueError("not a reply")]])
    reasons = clients.close_session("s1")
    assert sorted(rank for rank, *_ in clients.calls) == [0, 1, 1, 2]  # a refusal is not asked again
    assert reasons == [
        "party P0 refused session_close: a test's failure",
        f"party P1 at 127.0.0.1:9001 is unreachable (session_close): a test's failure; still after {CLOSE_WAIT_S:g} s",
        "party P2: session_close failed: not a reply",
    ]


@pytest.mark.parametrize("second", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED])
def test_a_second_failure_of_another_kind_is_said_as_it_is(second):
    clients = _clients([[], [grpc.StatusCode.UNAVAILABLE, second], []])
    (reason,) = clients.close_session("s1")
    assert reason.startswith("party P1 ")
    assert "still after" not in reason


def test_the_three_closes_run_at_once():
    """A party that takes its time (a deadline) does not hold the others' closes: each call here waits for the other
    two to have started."""
    clients = _clients([[], [], []])
    started = threading.Barrier(3, timeout=10)
    call = clients.call
    clients.call = lambda *args, **kwargs: (started.wait(), call(*args, **kwargs))
    assert clients.close_session("s1") == []
