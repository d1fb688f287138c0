"""PartyClients' session close: retried where a party was unreachable, and what was never confirmed is said."""

import types

import grpc
import pytest

from cipherdm_spu import client
from cipherdm_spu.client import PartyClients


class _Failure(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "a test's failure"


def _clients(answers):
    """PartyClients whose calls answer from ``answers[rank]``: each entry None (done) or a status code raised once."""
    parties = [types.SimpleNamespace(id=f"P{r}", control_address=f"127.0.0.1:{9000 + r}") for r in range(3)]
    clients = PartyClients.__new__(PartyClients)
    clients.cluster = types.SimpleNamespace(parties=parties, connect_timeout_s=5.0, recv_timeout_s=60.0)
    clients.calls = []

    def call(rank, method, request):
        clients.calls.append((rank, method, request.session_id))
        code = answers[rank].pop(0) if answers[rank] else None
        if code is not None:
            raise _Failure(code)

    clients.call = call
    return clients


@pytest.fixture(autouse=True)
def _no_wait(monkeypatch):
    monkeypatch.setattr(client, "CLOSE_RETRY_S", 0.0)


def test_a_close_reaches_every_party_once_when_all_answer():
    clients = _clients([[], [], []])
    assert clients.close_session("s1") == []
    assert clients.calls == [(0, "session_close", "s1"), (1, "session_close", "s1"), (2, "session_close", "s1")]


def test_an_unreachable_party_is_asked_again_and_the_others_are_not():
    clients = _clients([[], [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE], []])
    assert clients.close_session("s1") == []  # the third try reached it
    assert [rank for rank, _, _ in clients.calls] == [0, 1, 2, 1, 1]


def test_what_never_confirmed_the_close_is_said_and_a_refusal_is_not_retried():
    down = [grpc.StatusCode.UNAVAILABLE] * client.CLOSE_TRIES
    clients = _clients([[grpc.StatusCode.PERMISSION_DENIED], down, [grpc.StatusCode.DEADLINE_EXCEEDED]])
    reasons = clients.close_session("s1")
    assert [rank for rank, _, _ in clients.calls] == [0, 1, 2] + [1] * (client.CLOSE_TRIES - 1)
    assert len(reasons) == 3
    assert reasons[0] == "party P0 refused session_close: a test's failure"
    assert reasons[1].startswith("party P1 at 127.0.0.1:9001 is unreachable (session_close)")
    assert reasons[2].startswith("party P2 at 127.0.0.1:9002 did not answer session_close within")
