"""The party's control service on the wire (`party._handler`), served in-process around a stand-in for the party's
state: what the client of a share-carrying call can make a party read, hold and wait for. (The real party's checks of
callers, headers and shares: tests/test_security.py.)"""

import concurrent.futures as cf
import threading
import types

import grpc
import pytest

from cipherdm_spu import messages, party
from cipherdm_spu.errors import PartyError
from cipherdm_spu.messages import METHODS, Empty, ModelPut, SharePart

#: the shares the stand-in's model "m" expects in one model_put: 3 and 2 bytes
SIZES = [3, 2]


class _Service:
    """A party's methods: model_put receives the shares of model "m" (`party._receive`); others answer Empty."""

    def __init__(self):
        self.party = types.SimpleNamespace(id="P0")
        self.received, self.entered = [], threading.Semaphore(0)

    def model_put(self, caller, msg, parts):
        if msg.model_id == "slow":  # shares that arrive slowly: a first part, then the rest when the client sends it
            next(parts)
            self.entered.release()
            list(parts)
            raise PartyError("slow: its shares ended")
        if msg.model_id != "m":
            raise PartyError(f"no model {msg.model_id!r}")
        self.received.append(party._receive(parts, SIZES, "model 'm'"))
        return Empty()

    def __getattr__(self, name):
        return lambda caller, msg: Empty()


@pytest.fixture
def served(monkeypatch):
    """(service, channel): `party._handler` on an in-process server, every caller taken for the owner."""
    monkeypatch.setattr(party, "peer_identity", lambda auth: ("owner", "owner"))
    service = _Service()
    server = grpc.server(cf.ThreadPoolExecutor(party.CONTROL_THREADS), maximum_concurrent_rpcs=32,
                         options=[("grpc.max_receive_message_length", party.MAX_REQUEST_BYTES)])
    server.add_generic_rpc_handlers((party._handler(service),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=messages.CHANNEL_OPTIONS)
    yield service, channel
    channel.close()
    server.stop(0)


def put(channel, stream, timeout=30):
    return channel.stream_unary(METHODS["model_put"].path)(iter(stream), timeout=timeout)


def refusal(call) -> tuple:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def header(model_id="m"):
    return ModelPut(model_id, ["a", "b"], [b"", b""]).encode()


def test_shares_arrive_in_parts_however_a_client_cuts_them(served):
    service, channel = served
    for parts in ([b"abcde"], [b"ab", b"cd", b"e"], [b"abc", b"de"]):
        put(channel, [header()] + [SharePart(p).encode() for p in parts])
    assert service.received == [[b"abc", b"de"]] * 3
    # the client's own framing: the header, then each share's content in parts of at most PART_BYTES
    big = bytes(range(256)) * (messages.PART_BYTES // 128 + 1)
    stream = list(messages.share_stream(ModelPut("m", ["w"], [b""]), [big, b"xy"]))
    assert [len(SharePart.decode(raw).content) for raw in stream[1:]] == [messages.PART_BYTES] * 2 + [
        len(big) - 2 * messages.PART_BYTES, 2]
    assert b"".join(SharePart.decode(raw).content for raw in stream[1:]) == big + b"xy"


@pytest.mark.parametrize("parts, message", [
    ([b"abcdef"], "a part of 6 bytes after 0 of the 5 expected"),
    ([b"abc", b"def"], "a part of 3 bytes after 3 of the 5 expected"),
    ([b"abcd"], "4 bytes of share content, expected 5"),
    ([b"ab", b"", b"cde"], "a part of 0 bytes after 2 of the 5 expected"),
    ([b"abcde", b"f"], "more share content than the 5 bytes expected"),
])
def test_a_party_reads_no_more_and_no_less_than_the_named_shares(served, parts, message):
    service, channel = served
    code, details = refusal(lambda: put(channel, [header()] + [SharePart(p).encode() for p in parts]))
    assert (code, message in details) == (grpc.StatusCode.FAILED_PRECONDITION, True), details
    assert service.received == []


def test_a_malformed_stream_is_refused(served):
    _, channel = served
    for stream in ([], [b"\xff garbage"], [header(), b"\xff garbage"], [header(), Empty().encode()]):
        assert refusal(lambda: put(channel, stream))[0] == grpc.StatusCode.INVALID_ARGUMENT, stream


def test_parts_are_not_read_when_the_header_is_refused(served):
    """The method refuses the header (no such model) before it takes a part: gRPC's flow control then holds the
    client's stream, which stops long before its 64 MiB are sent."""
    _, channel = served
    taken = []

    def stream():
        yield header("other")
        for i in range(64):
            taken.append(i)
            yield SharePart(bytes(messages.PART_BYTES)).encode()

    code, details = refusal(lambda: put(channel, stream()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no model 'other'" in details
    assert len(taken) < 16, len(taken)


def test_a_message_larger_than_a_manifest_request_is_refused_unread(served):
    _, channel = served
    too_big = party.MAX_REQUEST_BYTES + 1
    hello = channel.unary_unary(METHODS["hello"].path)
    assert refusal(lambda: hello(bytes(too_big), timeout=30))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal(lambda: put(channel, [header(), SharePart(bytes(too_big)).encode()]))[0] == (
        grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert hello(Empty().encode(), timeout=30) == Empty().encode()  # a manifest-sized request still arrives


def test_a_stream_that_never_ends_is_cancelled(served, monkeypatch):
    """A client that sends a header and then nothing would hold one of the party's threads: after RECEIVE_S the party
    cancels the call (here one second; the client's own deadline is longer)."""
    _, channel = served
    monkeypatch.setattr(party, "RECEIVE_S", 1.0)
    stop = threading.Event()

    def stalled():
        yield header()
        stop.wait(60)

    try:
        code, details = refusal(lambda: put(channel, stalled(), timeout=60))
    finally:
        stop.set()
    assert code == grpc.StatusCode.CANCELLED, (code, details)


def test_calls_receiving_shares_leave_threads_for_the_others(served, monkeypatch):
    """RECEIVING_TURNS calls of model_put receiving shares: one more is refused as soon as it would read a part, one
    refused on its header takes no turn, control calls are served, and the turns come back when the streams end."""
    service, channel = served
    monkeypatch.setattr(party, "MAX_CALLS_PER_CLIENT", party.CONTROL_THREADS)  # (one client plays them all)
    most = party.RECEIVING_TURNS["model_put"]
    stop = threading.Event()

    def stalled():
        yield header("slow")
        yield SharePart(b"a").encode()
        stop.wait(60)

    stub = channel.stream_unary(METHODS["model_put"].path)
    calls = [stub.future(stalled(), timeout=60) for _ in range(most)]
    try:
        for _ in calls:
            assert service.entered.acquire(timeout=30)
        code, details = refusal(lambda: put(channel, [header(), SharePart(b"abcde").encode()]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"receiving the shares of {most} other model_put calls" in details
        assert "no model 'other'" in refusal(lambda: put(channel, [header("other")]))[1]
        hello = channel.unary_unary(METHODS["hello"].path)
        assert hello(Empty().encode(), timeout=30) == Empty().encode()
    finally:
        stop.set()
    for call in calls:  # their streams ended: their turns given back
        with pytest.raises(grpc.RpcError, match="its shares ended"):
            call.result()
    for _ in range(most + 1):
        put(channel, [header(), SharePart(b"abcde").encode()])
    assert service.received == [[b"abc", b"de"]] * (most + 1)


def test_a_client_has_a_few_calls_at_once_and_none_waits_long_for_its_request(served, monkeypatch):
    """One client holds at most MAX_CALLS_PER_CLIENT calls at once (here two, stalled in their shares); a call whose
    client never sends its request (any method: a unary one too) is cancelled after REQUEST_S (here one second)."""
    service, channel = served
    monkeypatch.setattr(party, "MAX_CALLS_PER_CLIENT", 2)
    stop = threading.Event()

    def stalled():
        yield header("slow")
        yield SharePart(b"a").encode()
        stop.wait(60)

    calls = [channel.stream_unary(METHODS["model_put"].path).future(stalled(), timeout=60) for _ in range(2)]
    try:
        for _ in calls:
            assert service.entered.acquire(timeout=30)
        code, details = refusal(lambda: channel.unary_unary(METHODS["hello"].path)(Empty().encode(), timeout=30))
        assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "party P0: owner has 2 calls in progress already")
    finally:
        stop.set()
    for call in calls:
        with pytest.raises(grpc.RpcError, match="its shares ended"):
            call.result()
    monkeypatch.setattr(party, "REQUEST_S", 1.0)
    never = threading.Event()

    def nothing():
        never.wait(60)
        yield from ()

    try:  # (a unary method, reached as a stream that sends nothing)
        assert refusal(lambda: channel.stream_unary(METHODS["hello"].path)(nothing(), timeout=60))[0] == (
            grpc.StatusCode.CANCELLED)
    finally:
        never.set()
    assert channel.unary_unary(METHODS["hello"].path)(Empty().encode(), timeout=30) == Empty().encode()


def test_a_partys_logs_start_afresh_at_their_size_limit_and_stay_private(tmp_path, monkeypatch):
    """Uploads and sessions add to a party's logs: each starts afresh at MAX_LOG_BYTES, one older file kept, every file
    readable by the party's user alone."""
    import logging
    import os
    import stat

    monkeypatch.setattr(party, "MAX_LOG_BYTES", 1000)
    path = party.private_log_file(tmp_path / "logs", "party-P0.log")
    handler = party._PrivateRotatingFileHandler(path, maxBytes=party.MAX_LOG_BYTES, backupCount=1)
    log = logging.getLogger("test_party.rotation")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        for i in range(100):
            log.info("line %03d %s", i, "x" * 40)
    finally:
        log.removeHandler(handler)
        handler.close()
    spu_log = party.private_log_file(tmp_path / "logs", "spu-P0.log")
    with open(spu_log, "a") as f:
        f.write("y" * 999)
    party.rotate_log(spu_log)  # below the limit: kept
    assert spu_log.stat().st_size == 999
    with open(spu_log, "a") as f:
        f.write("y")
    party.rotate_log(spu_log)
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["party-P0.log", "party-P0.log.1", "spu-P0.log", "spu-P0.log.1"]
    for file in path.parent.iterdir():
        assert stat.S_IMODE(os.stat(file).st_mode) == 0o600, file
        assert file.stat().st_size <= 1000 + 100, file
    assert (path.parent / "spu-P0.log").stat().st_size == 0
    assert "line 099" in path.read_text()


def test_every_share_carrying_method_has_its_own_receiving_turns():
    assert set(party.RECEIVING_TURNS) == {m.name for m in METHODS.values() if m.streams_shares}
    assert sum(party.RECEIVING_TURNS.values()) < party.CONTROL_THREADS


def test_a_workers_last_reply_is_read_though_it_ended_just_after():
    """A session's worker that refuses (the parties disagree) sends why and ends at once: a reply that arrives between
    the party's wait and its look at the process is read, not reported as a runtime that ended (a loaded machine's
    suite once saw that)."""
    import multiprocessing as mp

    from cipherdm_spu.party import _Worker

    ours, theirs = mp.Pipe()
    worker = _Worker.__new__(_Worker)  # its process stood in for: the reply comes as the process is seen to be gone
    worker.party, worker.conn, worker.lock = types.SimpleNamespace(id="P0"), ours, threading.Lock()

    def is_alive():
        theirs.send(("error", "the parties disagree about this session"))
        return False

    worker.process = types.SimpleNamespace(is_alive=is_alive, exitcode=0)
    with pytest.raises(PartyError, match="party P0: the parties disagree about this session"):
        worker.call("ready", None, timeout=5)
