"""The control channel's wire format: one typed message per request and reply, and who may call what.

Every method of a party's control service takes one message and returns one, msgpack-encoded (bytes stay bytes);
the two that carry shares (`Method.streams_shares`) take a header naming them, then the shares' content in
`SharePart` messages, which a party reads only once it has checked the caller and the header, and never past the
bytes the named shares take. Each message is a frozen dataclass; `decode` refuses a message with a missing, extra or
wrongly typed field, so a party never acts on a malformed request. `METHODS` lists every method with its request and
reply types and the client roles allowed to call it: the model owner uploads and deletes its models; a user opens a
sampling session on a model, shares its inputs, runs the steps and alone receives its session's result shares. No
method returns a weight share or an intermediate value, and none takes code: the parties compile what they run (see
`cipherdm_spu.party`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Dict, Iterator, List, Sequence

import msgpack

from .errors import MessageError

SERVICE = "cipherdm_spu.Party"
#: a client's channel options: no size limit on the replies it receives (a session's result share can exceed gRPC's
#: 4 MB default); a party limits what it receives itself (`party.MAX_REQUEST_BYTES`)
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
#: the most share content one `SharePart` carries
PART_BYTES = 1 << 20
#: the most items a list of a message may hold (a flood of tiny items would cost a party far more memory decoded)
MAX_LIST_ITEMS = 4096
#: the longest a party holds a call open while a job it started runs; the client then calls again
POLL_S = 5.0


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of every request and reply: typed fields, msgpack on the wire."""

    def encode(self) -> bytes:
        return msgpack.packb(dataclasses.asdict(self), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes):
        try:
            raw = msgpack.unpackb(data, raw=False, max_array_len=MAX_LIST_ITEMS, max_map_len=64)
        except Exception as e:  # noqa: BLE001 - msgpack raises several types for garbage
            raise MessageError(f"{cls.__name__}: not a msgpack message ({type(e).__name__})") from None
        if not isinstance(raw, dict):
            raise MessageError(f"{cls.__name__}: expected a map")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if set(raw) != set(names):
            raise MessageError(f"{cls.__name__}: fields {sorted(raw)}, expected {sorted(names)}")
        for name in names:
            if not _matches(raw[name], hints[name]):
                raise MessageError(f"{cls.__name__}.{name}: expected {hints[name]}, got {type(raw[name]).__name__}")
        return cls(**raw)


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (list, List):
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


# -- messages ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Empty(Message):
    pass


@dataclasses.dataclass(frozen=True)
class HelloReply(Message):
    party: str
    rank: int
    package: str
    spu: str
    #: the cluster config's fingerprint: what parties and clients must agree on
    config: str
    #: the caller as this party authenticated it
    client: str
    role: str
    busy: bool


@dataclasses.dataclass(frozen=True)
class ModelBegin(Message):
    """Start an upload: the public manifest (model config, scheduler, policy, tensor list) as JSON."""

    model_id: str
    manifest: str


@dataclasses.dataclass(frozen=True)
class ModelPut(Message):
    """The header of this party's shares of some of the model's tensors (names from the manifest's tensor list): their
    metas; their contents (`share_wire`) follow, in this order, as `SharePart` messages."""

    model_id: str
    names: List[str]
    metas: List[bytes]


@dataclasses.dataclass(frozen=True)
class ModelRef(Message):
    """A model: its owner's id for it, in the owner's own namespace (``owner`` its certificate name; "" names the
    caller's own model)."""

    model_id: str
    owner: str = ""


@dataclasses.dataclass(frozen=True)
class ModelInfo(Message):
    model_id: str
    #: the client that uploaded it (its certificate's name)
    owner: str
    manifest: str
    sealed: bool
    #: sha256 of the manifest: the three parties must hold the same model
    digest: str


@dataclasses.dataclass(frozen=True)
class SessionOpen(Message):
    """Open a sampling session: the job (sampler, steps, batch, protocol set...) as JSON."""

    session_id: str
    model_id: str
    job: str
    #: whose model: the owner's certificate name (each owner's model ids are its own namespace)
    model_owner: str


@dataclasses.dataclass(frozen=True)
class SessionPut(Message):
    """The header of this party's share of one of the job's input slots ("x", "condition/0", "noise/3", ...): its meta;
    its content follows as `SharePart` messages."""

    session_id: str
    slot: str
    meta: bytes


@dataclasses.dataclass(frozen=True)
class SharePart(Message):
    """Some of the content of the shares a header names, in order: a client's parts (`share_stream`) hold at most
    PART_BYTES and never span two shares; a party takes any cut that fits its largest request."""

    content: bytes


@dataclasses.dataclass(frozen=True)
class SessionStep(Message):
    session_id: str
    index: int


@dataclasses.dataclass(frozen=True)
class SessionRef(Message):
    session_id: str


@dataclasses.dataclass(frozen=True)
class Progress(Message):
    """A long job's state: "running" (call again) or "done", with its report as JSON."""

    state: str
    report: str


@dataclasses.dataclass(frozen=True)
class Share(Message):
    """A party's share of a session's result: its meta and its content (`share_wire`)."""

    meta: bytes
    content: bytes


# -- methods -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    request: type
    reply: type
    roles: frozenset
    #: whether a call may take long (a transfer or a poll): its deadline grows accordingly
    long: bool = False
    #: whether the request is a stream: the header (``request``), then the content of the shares it names as
    #: `SharePart` messages (`share_stream`)
    streams_shares: bool = False

    @property
    def path(self) -> str:
        return f"/{SERVICE}/{self.name}"


OWNER, USER = "owner", "user"

METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("hello", Empty, HelloReply, frozenset({OWNER, USER})),
    Method("model_begin", ModelBegin, Empty, frozenset({OWNER})),
    Method("model_put", ModelPut, Empty, frozenset({OWNER}), long=True, streams_shares=True),
    Method("model_seal", ModelRef, ModelInfo, frozenset({OWNER})),
    Method("model_delete", ModelRef, Empty, frozenset({OWNER})),
    Method("model_info", ModelRef, ModelInfo, frozenset({OWNER, USER})),
    Method("session_open", SessionOpen, Progress, frozenset({USER}), long=True),
    Method("session_start", SessionRef, Progress, frozenset({USER}), long=True),
    Method("session_put", SessionPut, Empty, frozenset({USER}), long=True, streams_shares=True),
    Method("session_step", SessionStep, Progress, frozenset({USER}), long=True),
    Method("session_result", SessionRef, Share, frozenset({USER}), long=True),
    Method("session_close", SessionRef, Empty, frozenset({USER})),
)}


def share_stream(header: Message, contents: Sequence[bytes]) -> Iterator[bytes]:
    """A share-carrying request on the wire: the header, then each share's content in parts of at most PART_BYTES."""
    yield header.encode()
    for content in contents:
        for offset in range(0, len(content), PART_BYTES):
            yield SharePart(content[offset:offset + PART_BYTES]).encode()
