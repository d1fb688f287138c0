"""One party of the cluster: its own trust domain, serving authenticated clients over mutual TLS.

A party holds only its own shares and runs only programs it built itself:
- the model owner (a client whose certificate names it ``owner``/``owner-*``) uploads this party's
  shares of a model's tensors under a model id of its own namespace (a user names the owner and the id), with a
  public manifest (model and scheduler config, the owner's policy). Nobody can read them back; only their owner can
  delete them.
- a user (``user``/``user-*``) opens a sampling session on a model: the party builds the step program
  from the manifest and the user's public job description (`plan.JobCatalog`), compiles it, audits
  the compiled IR (no secret may become public), checks the job against the owner's policy, then
  starts a worker process with a fresh SPU link (peers authenticated by the party CA) and runtime,
  configured from this party's own cluster config and the protocol set's approximation options.
  The user shares its inputs into named slots, runs the steps in order, and alone receives this
  party's share of the final result.
- nothing else: no method returns a weight, an input or an intermediate share, and none takes code.

One session at a time; no session can be taken over by another client, and one whose user goes silent for
``timeouts.session_idle_s``, or does not move it on (a new input, a step, a poll of its running job) for longer
than its peers may take (`OPENING_PROGRESS_S`, `RUNNING_PROGRESS_S`), is dropped with its shares. Long jobs
(compiling, a step) run in the background: a call waits at most `messages.POLL_S` and the client calls again, so
every call has a deadline and a party that stops answering is named at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import itertools
import json
import logging
import logging.handlers
import math
import multiprocessing as mp
import os
import resource
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import grpc
import numpy as np
import spu
import spu.libspu as libspu

from . import compile_cache, ir_audit, messages, private_dir, registry, share_wire, spu_config
from ._version import __version__
from .cluster_config import ClusterConfig, PartyConfig, split_address
from .compiler_process import CompilerProcess, die_with_parent
from .console import warning_line
from .errors import CompileCacheError, PartyError, PrivatePathError
from .link_front import LinkFront, new_socket_folder
from .messages import METHODS, POLL_S
from .pki import peer_identity, shares_a_key
from .plan import NAME, JobCatalog, Policy, StepProgram, names_of
from .profiling import SpuLog, parse_party_run, private_log_path

log = logging.getLogger("cipherdm_spu.party")

#: models one party keeps at once, in all and per owner (each holds its shares in memory)
MAX_MODELS = 16
MAX_MODELS_PER_OWNER = 4
#: the most tensors one model may have
MAX_TENSORS = 1_000_000
#: the part of the share-memory budget kept for a session's inputs (1/SESSION_SHARE_PART of it): models, sealed or
#: announced, take at most the rest, so that no owner's uploads can refuse every user's sessions
SESSION_SHARE_PART = 8
#: what a party holds per model tensor beside its share (meta, chunk list, digests), counted against its budget
TENSOR_OVERHEAD_BYTES = 1024
#: how long judging a manifest or a job, and compiling a program, may take from its start (`compiler_process`)
JUDGE_S = 300.0
COMPILE_S = 3600.0
#: how long an owner's manifest waits for another's to be judged before the party answers that it is busy (briefly:
#: a waiting call holds one of the control service's threads)
JUDGE_WAIT_S = 1.0
#: the largest manifest a party takes (a model's config, scheduler and policy: kilobytes); it is held in memory
#: and counted against the share-memory budget
MAX_MANIFEST_BYTES = 1 << 20
#: the largest job a party takes (a user's public job description: a few hundred bytes of JSON), refused before it is
#: parsed; and the most of a client-influenced reason (a refused job's error) that goes into the party's log
MAX_JOB_BYTES = 1 << 16
MAX_LOGGED_CHARS = 500
#: the longest a party waits for its worker to take or give back values (they are in memory)
TRANSFER_S = 600.0
#: how long a session may go without its user moving it on (`_Session.last_progress`) while its user keeps calling:
#: the waits on its peers a user has no part in. Before it starts, as long as a peer may still judge and compile the
#: job; then as long as a peer may still link and load values (plus the link's connect timeout)
OPENING_PROGRESS_S = JUDGE_S + COMPILE_S + 60.0
RUNNING_PROGRESS_S = TRANSFER_S + 120.0
#: how long a session whose job failed waits for its user to learn why before it is dropped
FAILED_SESSION_S = 30.0
#: the longest a model may stay unsealed, however busy its owner's calls keep it (its share memory is reserved)
UNSEALED_S = 6 * 3600.0
#: how long a worker waits for its peers' link goodbye before it reports a refused session anyway
LINK_GOODBYE_S = 10.0
#: the largest message a party receives, refused unread by gRPC: a manifest's request, with room to spare. Shares
#: arrive as a stream of parts (`messages.SharePart`), read only after the caller and the header are checked
MAX_REQUEST_BYTES = MAX_MANIFEST_BYTES + (1 << 20)
#: a party's log files (its own, and its sessions' SPU runtimes') start afresh at this size, one older file kept
MAX_LOG_BYTES = 64 << 20
#: the control service's threads, and the most calls one client may have in progress on a party
CONTROL_THREADS = 16
MAX_CALLS_PER_CLIENT = 4
#: the most calls receiving shares at once, per method (the other threads stay free for control calls, and owners'
#: uploads never take the session's turns), and the most share content a method's calls hold together (each call's is
#: held whole until checked), which is also the most one call may carry: a model's largest tensor (an SD UNet's widest
#: convolution takes hundreds of MB of shares)
RECEIVING_TURNS = {"model_put": 4, "session_put": 2}
MAX_RECEIVING_BYTES = 1 << 30
#: how many of a user's ended sessions a party remembers (their ids), so that a call of an ended session that was still
#: on its way (a user's open poll in flight when it closed the session, or a close that overtook the open) cannot
#: open it again and hold the cluster for session_idle_s: a client names each session afresh (`jobs`)
ENDED_SESSIONS_PER_USER = 64
CLOSED = "closed by its user"
#: how long a call's request may take to arrive (a manifest's at most), and a share-carrying call's shares after it
REQUEST_S = 60.0
RECEIVE_S = 600.0


@dataclasses.dataclass(frozen=True)
class Caller:
    """An authenticated client: the common name of its certificate and the role it grants."""

    name: str
    role: str


@dataclasses.dataclass(frozen=True)
class _Share:
    """A secret share as this party hands it to its SPU runtime, and the digests of its two components
    (`share_wire.component_digests`) that the parties compare before a step uses it."""

    meta: bytes
    chunks: List[bytes]
    digests: Tuple[str, str]

    def value(self, name: str) -> tuple:
        """(name, meta, chunks): what the worker's set_vars takes."""
        return name, self.meta, self.chunks

    def check(self, name: str) -> tuple:
        """(name, first component's digest, second's): what the worker's check_shares takes."""
        return (name, *self.digests)


@dataclasses.dataclass
class _Model:
    owner: str
    manifest: str
    digest: str
    policy: Policy
    expected: Dict[str, tuple]
    size: int  # bytes its manifest and shares take in this party's memory, once all uploaded
    shares: Dict[str, _Share] = dataclasses.field(default_factory=dict)
    receiving: Dict[str, "_ShareParts"] = dataclasses.field(default_factory=dict)  # tensors' shares arriving now
    sealed: bool = False
    last_seen: float = dataclasses.field(default_factory=time.monotonic)
    began: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class _Session:
    id: str
    user: str
    model_key: str  # `_model_key`: whose model, and its id
    last_seen: float  # when its user's last call on it began or, for a call that waited on its job, ended
    # when its user last moved it on: opened it, started it, gave an input, began a step, or ended a call that waited on
    # its running job. Calls that change nothing (an open repeated once compiled, a result fetched again) keep a
    # session whose peers are still busy alive, but only as long as a peer may be (OPENING_PROGRESS_S,
    # RUNNING_PROGRESS_S): nobody holds the cluster by pinging it
    last_progress: float = dataclasses.field(default_factory=time.monotonic)
    polls: int = 0  # its user's calls waiting on its job now: the session is not silent meanwhile
    job: Optional[cf.Future] = None  # the open or step job in flight
    job_index: int = -1  # what the job in flight is: -1 the compile, -2 the start, i step i
    compiled: Optional[tuple] = None  # (program, agreement, runtime config) once compiled and audited
    program: Optional[StepProgram] = None  # once started: the worker is linked and holds the weights
    worker: Optional["_Worker"] = None
    slots: Dict[str, _Share] = dataclasses.field(default_factory=dict)  # the user's inputs, by slot
    receiving: Dict[str, "_ShareParts"] = dataclasses.field(default_factory=dict)  # slots' shares arriving now
    checked: set = dataclasses.field(default_factory=set)  # runtime names whose shares the parties found consistent
    reports: list = dataclasses.field(default_factory=list)
    open_report: dict = dataclasses.field(default_factory=dict)
    input_bytes: int = 0  # its inputs' share memory, reserved once compiled (`PartyService._held_share_memory`)


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
    """The state of one party: the models it holds shares of, and at most one session."""

    def __init__(self, cluster: ClusterConfig, party: PartyConfig, catalog: JobCatalog, log_path: Path,
                 share_memory: int):
        self.cluster, self.party, self.catalog, self.log_path = cluster, party, catalog, log_path
        self.share_memory = share_memory  # bytes models' shares (uploaded or announced) and a session's inputs may take
        # share content the calls receiving now hold, per method (`_reserve_receiving`)
        self.receiving_bytes = dict.fromkeys(RECEIVING_TURNS, 0)
        self.models: Dict[str, _Model] = {}  # by `_model_key`: each owner's ids are its own namespace
        self.session: Optional[_Session] = None
        self.ended_sessions: Dict[str, Dict[str, str]] = {}  # user -> {ended session id: how it ended}, oldest first
        self.lock = threading.RLock()
        self.jobs = cf.ThreadPoolExecutor(1, thread_name_prefix=f"party-{party.id}-job")
        # manifests are judged and programs compiled in processes of their own (`compiler_process`): one for owners,
        # one for the session, so that neither delays or breaks the other's work
        self.judge = CompilerProcess(f"party {party.id}'s manifest judge")
        self.compiler = CompilerProcess(f"party {party.id}'s session compiler")
        self._io = spu.Io(3, cluster.runtime_config())
        try:  # the mutual-TLS door to the sessions' SPU links, held for the party's lifetime
            self.front = LinkFront(party.spu_address, party.tls, [p.id for p in cluster.parties if p.id != party.id])
        except OSError as e:
            self.judge.close()
            self.compiler.close()
            raise PartyError(f"party {party.id} cannot serve its spu_address {party.spu_address}: {e}") from None
        self._stop = threading.Event()
        threading.Thread(target=self._drop_idle_sessions, daemon=True, name=f"party-{party.id}-idle").start()

    # -- every client ---------------------------------------------------------------------------

    def hello(self, caller: Caller, msg: messages.Empty) -> messages.HelloReply:
        return messages.HelloReply(
            party=self.party.id, rank=self.party.rank, package=__version__, spu=spu.__version__,
            config=self.cluster.fingerprint, client=caller.name, role=caller.role, busy=self.session is not None,
        )

    # -- the model owner ------------------------------------------------------------------------

    def model_begin(self, caller: Caller, msg: messages.ModelBegin) -> messages.Empty:
        _check_name(msg.model_id, "model id")
        manifest_bytes = len(msg.manifest.encode())
        if manifest_bytes > MAX_MANIFEST_BYTES:
            raise PartyError(f"model {msg.model_id!r}: its manifest is {manifest_bytes} bytes, more than "
                             f"{MAX_MANIFEST_BYTES}")
        with self.lock:
            self._check_room(caller, msg.model_id, manifest_bytes)
        try:  # in the judge's process: judging a manifest may take seconds, and never stalls this service
            manifest = json.loads(msg.manifest)
            policy = Policy.from_dict(manifest.get("policy") if isinstance(manifest, dict) else None)
            expected = dict(self.judge.run(JUDGE_S, JUDGE_WAIT_S, self.catalog.model_tensors, msg.manifest,
                                           MAX_TENSORS))
        except (ValueError, RecursionError) as e:  # (JSON nested past Python's recursion limit: RecursionError)
            raise PartyError(f"model {msg.model_id!r}: bad manifest: {e}") from None
        if len(expected) > MAX_TENSORS:  # (a catalog that ignored its bound)
            raise PartyError(f"model {msg.model_id!r} has {len(expected)} tensors, more than {MAX_TENSORS}")
        too_big = [name for name, (shape, _) in expected.items() if self._share_bytes(shape) > MAX_RECEIVING_BYTES]
        if too_big:
            raise PartyError(f"model {msg.model_id!r}: the shares of {names_of(sorted(too_big))} would not fit one call "
                             f"({MAX_RECEIVING_BYTES >> 20} MiB at most per tensor)")
        size = manifest_bytes + sum(self._share_bytes(shape) + TENSOR_OVERHEAD_BYTES for shape, _ in expected.values())
        with self.lock:
            self._check_room(caller, msg.model_id, size)
            digest = hashlib.sha256(msg.manifest.encode()).hexdigest()
            model = _Model(caller.name, msg.manifest, digest, policy, expected, size)
            self.models[_model_key(caller.name, msg.model_id)] = model
        log.info("party %s: %s began uploading model %s", self.party.id, caller.name, msg.model_id)
        return messages.Empty()

    def _check_room(self, caller: Caller, model_id: str, size: int = 0) -> None:
        """Refuse a model of the caller's that the party has no room for: the caller holds one of that id, too many
        models, or (``size``: its manifest's and shares' bytes) more share memory than is left of the models' part of
        the party's budget, or of the whole with the session's inputs."""
        if _model_key(caller.name, model_id) in self.models:
            raise PartyError(f"model {model_id!r} exists; delete it (spu-launch delete) before uploading again")
        if len(self.models) >= MAX_MODELS:
            raise PartyError(f"party {self.party.id} holds {MAX_MODELS} models already; try again later")
        if sum(m.owner == caller.name for m in self.models.values()) >= MAX_MODELS_PER_OWNER:
            raise PartyError(f"{caller.name} holds {MAX_MODELS_PER_OWNER} models on party {self.party.id}; delete one first")
        for_models = self.share_memory - self.share_memory // SESSION_SHARE_PART
        if size > for_models:
            raise PartyError(f"model {model_id!r} needs {_gib(size)} of share memory, more than the {_gib(for_models)} "
                             f"of party {self.party.id}'s budget that models may take (1/{SESSION_SHARE_PART} of it is "
                             "kept for sessions' inputs)")
        held_by_models = sum(m.size for m in self.models.values())
        if held_by_models + size > for_models or self._held_share_memory() + size > self.share_memory:
            raise PartyError(f"model {model_id!r} needs {_gib(size)} of share memory, more than party {self.party.id} "
                             f"has free of the {_gib(for_models)} models may take of its {_gib(self.share_memory)}; try "
                             "again later")

    def model_put(self, caller: Caller, msg: messages.ModelPut, parts: "_ShareParts") -> messages.Empty:
        if not msg.names:  # (it would keep an unsealed model's reservation alive for nothing: an independent review)
            raise PartyError("model_put names no tensor")
        if len(msg.names) != len(msg.metas):
            raise PartyError("model_put: names and metas differ in length")
        if len(set(msg.names)) != len(msg.names):
            raise PartyError("model_put: a tensor is named twice")
        with self.lock:  # the header, whole, before any content is read
            model = self._open_upload(caller, msg.model_id, msg.names)
            key = _model_key(caller.name, msg.model_id)
            specs = [model.expected[name] for name in msg.names]
            for name, meta, spec in zip(msg.names, msg.metas, specs):
                self._check_meta(meta, spec, f"tensor {name!r}")
            sizes = [self._share_bytes(shape) for shape, _ in specs]
            self._reserve_receiving("model_put", sum(sizes))
            model.receiving.update(dict.fromkeys(msg.names, parts))  # no other call receives them meanwhile
            model.last_seen = time.monotonic()
        try:  # receiving, checking and digesting shares takes a while: not under the lock, which every other call needs
            contents = _receive(parts, sizes, f"model {msg.model_id!r}")
            shares = {name: self._check_share(meta, content, spec, f"tensor {name!r}")
                      for name, meta, content, spec in zip(msg.names, msg.metas, contents, specs)}
            with self.lock:
                if self.models.get(key) is not model:
                    raise PartyError(f"model {msg.model_id!r} was deleted meanwhile")
                model.shares.update(shares)
                model.last_seen = time.monotonic()
        finally:
            with self.lock:
                self.receiving_bytes["model_put"] -= sum(sizes)
                for name in msg.names:
                    model.receiving.pop(name, None)
                model.last_seen = time.monotonic()
        for name, meta, content in zip(msg.names, msg.metas, contents):
            log.info("party %s: received %s sha256=%s", self.party.id, name, _digest(meta, content))
        return messages.Empty()

    def _open_upload(self, caller: Caller, model_id: str, names) -> _Model:
        """The caller's unsealed model, which has tensors of these names not uploaded, nor being received, yet."""
        model = self._owned_model(caller, model_id)
        if model.sealed:
            raise PartyError(f"model {model_id!r} is sealed; delete it (spu-launch delete) to upload again")
        for name in names:
            if name not in model.expected:
                raise PartyError(f"model {model_id!r} has no tensor {name!r}")
            if name in model.shares:
                raise PartyError(f"model {model_id!r}: tensor {name!r} was already uploaded")
            if name in model.receiving:
                raise PartyError(f"model {model_id!r}: tensor {name!r} is being uploaded by another call")
        return model

    def model_seal(self, caller: Caller, msg: messages.ModelRef) -> messages.ModelInfo:
        with self.lock:
            model = self._owned_model(caller, msg.model_id, msg.owner)
            missing = sorted(set(model.expected) - set(model.shares))
            if missing:
                raise PartyError(f"model {msg.model_id!r} misses {len(missing)} tensor(s): {names_of(missing)}")
            model.sealed = True
        log.info("party %s: model %s sealed", self.party.id, _model_key(caller.name, msg.model_id))
        return self._info(msg.model_id, model)

    def model_delete(self, caller: Caller, msg: messages.ModelRef) -> messages.Empty:
        with self.lock:
            model = self._owned_model(caller, msg.model_id, msg.owner)
            key = _model_key(caller.name, msg.model_id)
            if self.session is not None and self.session.model_key == key:
                raise PartyError(f"model {msg.model_id!r} is in use by a session; try again when it ends")
            del self.models[key]
            _cancel(model.receiving)
        log.info("party %s: model %s deleted", self.party.id, key)
        return messages.Empty()

    def model_info(self, caller: Caller, msg: messages.ModelRef) -> messages.ModelInfo:
        owner = msg.owner or caller.name
        with self.lock:
            model = self.models.get(_model_key(owner, msg.model_id))
            visible = model is not None and (
                model.owner == caller.name
                or (caller.role == messages.USER and model.sealed
                    and (model.policy.users is None or caller.name in model.policy.users)))
            if not visible:
                raise PartyError(f"party {self.party.id} has no model {msg.model_id!r} of {owner} for {caller.name}")
            return self._info(msg.model_id, model)

    # -- a user ---------------------------------------------------------------------------------

    def session_open(self, caller: Caller, msg: messages.SessionOpen) -> messages.Progress:
        _check_name(msg.session_id, "session id")
        key = _model_key(msg.model_owner, msg.model_id)
        job_bytes = len(msg.job.encode())
        if job_bytes > MAX_JOB_BYTES:
            raise PartyError(f"the job is {job_bytes} bytes, more than {MAX_JOB_BYTES}")
        with self.lock:
            session = self.session
            if session is not None:
                if session.id != msg.session_id or session.user != caller.name or session.model_key != key:
                    raise PartyError(f"party {self.party.id} is busy with another session; try again later")
            else:
                ended = self.ended_sessions.get(caller.name, {}).get(msg.session_id)
                if ended is not None:
                    raise PartyError(f"session {msg.session_id!r} has ended at party {self.party.id} ({ended}); it is "
                                     "not opened again")
                model = self.models.get(key)
                # a user the owner's policy does not list is told what model_info tells it: no such model
                if model is None or not model.sealed or (model.policy.users is not None
                                                         and caller.name not in model.policy.users):
                    raise PartyError(f"party {self.party.id} has no model {msg.model_id!r} of {msg.model_owner}")
                session = self.session = _Session(msg.session_id, caller.name, key, time.monotonic())
                session.job = self.jobs.submit(self._open, session, model, msg.job)
                log.info("party %s: session %s opening for %s on model %s", self.party.id, session.id,
                         caller.name, key)
            session.last_seen = time.monotonic()
            if session.compiled is not None:  # already compiled
                return messages.Progress("done", json.dumps(session.open_report))
        return self._progress(session, lambda: session.open_report)

    def session_start(self, caller: Caller, msg: messages.SessionRef) -> messages.Progress:
        """Phase two of opening, once all three parties compiled: link the SPU workers, agree, load the weights.
        (Apart from compiling, so that the three workers start together however long each party compiled.)"""
        with self.lock:
            session = self._user_session(caller, msg.session_id, ready=False)
            if session.program is not None:
                return messages.Progress("done", json.dumps(session.open_report))
            if session.job is not None and session.job_index == -1:
                self._settle(session, wait=False)  # the compile must have ended
            if session.compiled is None:
                raise PartyError(f"session {msg.session_id!r} is not compiled yet")
            if session.job is None and session.worker is None:
                session.job_index = -2
                session.job = self.jobs.submit(self._start, session, self.models[session.model_key])
                session.last_progress = time.monotonic()
        return self._progress(session, lambda: session.open_report)

    def session_put(self, caller: Caller, msg: messages.SessionPut, parts: "_ShareParts") -> messages.Empty:
        with self.lock:
            session = self._user_session(caller, msg.session_id, ready=True)
            spec = session.program.slots.get(msg.slot)
            if spec is None:
                raise PartyError(f"this session's job has no input slot {msg.slot!r} "
                                 f"(slots: {names_of(sorted(session.program.slots))})")
            if msg.slot in session.slots:
                raise PartyError(f"input slot {msg.slot!r} was already given")
            if msg.slot in session.receiving:
                raise PartyError(f"input slot {msg.slot!r} is being given by another call")
            self._check_meta(msg.meta, spec, f"input slot {msg.slot!r}")
            size = self._share_bytes(spec[0])
            self._reserve_receiving("session_put", size)
            session.receiving[msg.slot] = parts
        try:  # received without the lock
            (content,) = _receive(parts, [size], f"input slot {msg.slot!r}")
            share = self._check_share(msg.meta, content, spec, f"input slot {msg.slot!r}")
            with self.lock:
                if self.session is not session:
                    raise PartyError(f"session {msg.session_id!r} ended while its input {msg.slot!r} arrived")
                session.slots[msg.slot] = share  # taken now; the worker is called without the lock
                session.last_progress = time.monotonic()
        finally:
            with self.lock:
                self.receiving_bytes["session_put"] -= size
                session.receiving.pop(msg.slot, None)
                session.last_seen = time.monotonic()
        try:
            session.worker.call("set_vars", [share.value(_slot(msg.slot))], timeout=TRANSFER_S)
        except PartyError:
            with self.lock:
                session.slots.pop(msg.slot, None)
            raise
        log.info("party %s: received %s sha256=%s", self.party.id, msg.slot, _digest(msg.meta, content))
        return messages.Empty()

    def session_step(self, caller: Caller, msg: messages.SessionStep) -> messages.Progress:
        with self.lock:
            session = self._user_session(caller, msg.session_id, ready=True)
            if session.job is not None and session.job_index != msg.index:
                self._settle(session, wait=False)
            program = session.program
            done = len(session.reports)
            if 0 <= msg.index < done:
                return messages.Progress("done", json.dumps(session.reports[msg.index]))
            if msg.index != done or msg.index >= len(program.steps):
                raise PartyError(f"step {msg.index} cannot run now: {done} of {len(program.steps)} steps are done")
            if session.job is None:
                missing = sorted(set(program.slots) - set(session.slots))
                if missing:
                    raise PartyError(f"the job's input slots {names_of(missing)} were not given")
                session.job_index = msg.index
                session.job = self.jobs.submit(self._step, session, msg.index)
                session.last_progress = time.monotonic()
        return self._progress(session, lambda: session.reports[msg.index])

    def session_result(self, caller: Caller, msg: messages.SessionRef) -> messages.Share:
        with self.lock:
            session = self._user_session(caller, msg.session_id, ready=True)
            if session.job is not None:
                self._settle(session, wait=False)
            if len(session.reports) != len(session.program.steps):
                raise PartyError(f"the result is released only after the last step "
                                 f"({len(session.reports)} of {len(session.program.steps)} done)")
            worker, result = session.worker, session.program.result
        meta, chunks = worker.call("get_var", result, timeout=TRANSFER_S)
        log.info("party %s: released its share of session %s's result to %s", self.party.id, session.id, caller.name)
        return messages.Share(meta, share_wire.content_of(chunks))

    def session_close(self, caller: Caller, msg: messages.SessionRef) -> messages.Empty:
        _check_name(msg.session_id, "session id")
        with self.lock:
            session = self.session
            if session is not None and session.id == msg.session_id and session.user == caller.name:
                self._drop_session(CLOSED, told=CLOSED)
            else:  # it may not have reached this party yet: its open, still on its way, must not open it
                self._remember_ended(caller.name, msg.session_id, CLOSED)
        return messages.Empty()

    def shutdown(self) -> None:
        self._stop.set()
        with self.lock:
            self._drop_session("the party is shutting down")
        self.front.close()
        self.jobs.shutdown(wait=False, cancel_futures=True)
        self.judge.close()
        self.compiler.close()

    # -- jobs (run in the background; their errors end the session) -------------------------------

    def _open(self, session: _Session, model: _Model, job: str) -> None:
        started = time.perf_counter()
        try:  # the owner's policy first, on the job's terms: nothing it forbids is ever compiled
            def abandoned():  # a closed or dropped session never holds the compiler
                return self.session is not session

            terms = self.compiler.run(JUDGE_S, COMPILE_S, self.catalog.terms, model.manifest, job, abandoned=abandoned)
            refusal = model.policy.refusal(session.user, terms)
            if refusal:
                raise ValueError(refusal)
            program = self.compiler.run(COMPILE_S, COMPILE_S, self.catalog.program, model.manifest, terms.canonical,
                                        self.cluster.fraction_bits, abandoned=abandoned)
        except CompileCacheError as e:  # the party's own setup, not the job: its details stay in the party's log
            log.error("party %s: %s", self.party.id, e)
            raise PartyError(f"party {self.party.id} cannot compile: its compile cache is refused (its log says why)") \
                from None
        except ValueError as e:
            raise PartyError(f"party {self.party.id} refuses the job: {e}") from None
        try:
            ir_audit.audit(program.code.decode("utf-8"))
        except ValueError as e:
            raise PartyError(f"party {self.party.id} refuses to run the compiled step: {e}") from None
        compiled_s = time.perf_counter() - started
        executable = hashlib.sha256(program.code).hexdigest()
        config = self.cluster.runtime_config(program.runtime_options)
        config.enable_pphlo_profile, config.enable_hal_profile = True, False  # this party's own cost report
        runtime = config.SerializeToString()
        # what the three parties must agree on before any share meets another (whose model, too), and the SPU runtime
        # each will build, whose protocol set's options come from that party's own files (an independent review: a set
        # shadowed at one party would run mismatched flows under a matching executable): checked over the SPU link
        agreed = [session.id, session.user, session.model_key, model.owner, model.digest, terms.canonical, executable,
                  hashlib.sha256(runtime).hexdigest()]
        agreement = hashlib.sha256(json.dumps(agreed).encode()).hexdigest()
        # the user's shares are held beside the models' (an independent review: uncounted, a job of the default
        # policy's largest batch could take tens of GB a party); reserved with the compiled program, under one lock
        inputs = sum(self._share_bytes(shape) for shape, _ in program.slots.values())
        too_big = [slot for slot, (shape, _) in program.slots.items() if self._share_bytes(shape) > MAX_RECEIVING_BYTES]
        if too_big:
            raise PartyError(f"party {self.party.id} refuses the job: the shares of its inputs {names_of(sorted(too_big))} "
                             f"would not fit one call ({MAX_RECEIVING_BYTES >> 20} MiB at most per input)")
        with self.lock:
            if self.session is not session:
                raise PartyError("the session ended while it opened")
            if self._held_share_memory() + inputs > self.share_memory:
                room = "the party's whole budget," if inputs > self.share_memory else "the party has free of its"
                raise PartyError(f"party {self.party.id} refuses the job: its inputs need {_gib(inputs)} of share "
                                 f"memory, more than {room} {_gib(self.share_memory)}")
            session.input_bytes = inputs
            session.compiled = (program, agreement, runtime)
            session.open_report = {
                "executable_sha256": executable, "agreement_sha256": agreement, "compile_seconds": round(compiled_s, 3),
                "slots": {k: [list(s), d] for k, (s, d) in program.slots.items()}, "steps": len(program.steps),
                "protocol_set": program.protocol_set, "model_owner": model.owner, **program.description,
            }
        log.info("party %s: session %s compiled (executable %s)", self.party.id, session.id, executable[:16])

    def _start(self, session: _Session, model: _Model) -> None:
        program, agreement, config = session.compiled
        with self.lock:
            if self.session is not session:
                raise PartyError("the session ended while it started")
            try:
                rotate_log(self.log_path)  # (between sessions: a worker reads its runs' costs by offset)
            except OSError as e:  # its paths stay in the party's log
                log.warning("party %s: cannot start its SPU log %s afresh: %s", self.party.id, self.log_path, e)
                raise PartyError(f"party {self.party.id} cannot start its SPU log (its log says why)") from None
            worker = session.worker = _Worker(self.cluster, self.party, self.log_path, session.id, config, agreement,
                                              self.front.open_session())
        worker.call("ready", None, timeout=self.cluster.connect_timeout_s + 60)
        worker.call("set_vars", [model.shares[n].value(_tensor(n)) for n in program.resident], timeout=TRANSFER_S)
        with self.lock:
            if self.session is not session:  # dropped meanwhile (its worker is stopped with it)
                raise PartyError("the session ended while it started")
            session.program = program
        log.info("party %s: session %s open (SPU worker pid %d)", self.party.id, session.id, worker.process.pid)

    def _step(self, session: _Session, index: int) -> None:
        program, worker = session.program, session.worker
        step = program.steps[index]
        model = self.models[session.model_key]
        secret = {_tensor(n): model.shares[n] for n in step.model_tensors}
        values = [share.value(name) for name, share in secret.items()]
        for name, value in step.public.items():
            share = self._io.make_shares(np.asarray(value), libspu.Visibility.VIS_PUBLIC)[self.party.rank]
            values.append((name, share.meta, list(share.share_chunks)))
        worker.call("set_vars", values, timeout=TRANSFER_S)
        for name in step.inputs:
            kind, _, slot = name.partition(":")
            if kind == "slot":
                secret[_slot(slot)] = session.slots[slot]
        # the resident weights too (checked at the first step: by then every party has loaded them, however long that
        # took each)
        secret.update({_tensor(n): model.shares[n] for n in program.resident})
        self._check_shares(session, worker, secret)
        inputs = [_runtime_name(n) for n in step.inputs]
        # no deadline of its own: a stalled peer fails this run within the SPU link's receive timeout
        report = worker.call("run", (program.name, program.code, inputs, [step.output]))
        worker.call("del_vars", [name for name, _, _ in values] + [_runtime_name(n) for n in step.frees],
                    timeout=TRANSFER_S)
        with self.lock:
            session.reports.append(report)

    def _check_shares(self, session: _Session, worker: "_Worker", shares: Dict[str, _Share]) -> None:
        """Have the three workers check that their shares of these values (those not checked yet this session) are
        consistent (`_consistent_shares`) before a step uses them."""
        checks = [share.check(name) for name, share in shares.items() if name not in session.checked]
        if checks:
            worker.call("check_shares", checks, timeout=self.cluster.recv_timeout_s + 60)
            session.checked.update(name for name, _, _ in checks)

    def _progress(self, session: _Session, report: Callable[[], dict]) -> messages.Progress:
        """Wait up to POLL_S for the session's job; then "done" with its report, or "running"."""
        with self.lock:
            session.polls += 1
            waited = session.job is not None and not session.job.done()
        try:
            settled = self._settle(session, wait=True)
        finally:
            with self.lock:
                session.polls -= 1
                session.last_seen = time.monotonic()
                if waited:
                    session.last_progress = session.last_seen
        if not settled:
            return messages.Progress("running", "{}")
        return messages.Progress("done", json.dumps(report()))

    def _settle(self, session: _Session, wait: bool) -> bool:
        """Whether the session's job has ended (waiting up to POLL_S); a failed job ends the session."""
        job = session.job
        if job is None:
            return True
        try:
            job.result(timeout=POLL_S if wait else 0)
        except cf.TimeoutError:
            if not wait:
                raise PartyError(f"the session's {'opening' if session.job_index < 0 else f'step {session.job_index}'}"
                                 " is still running") from None
            return False
        except Exception as e:  # noqa: BLE001 - the job failed: the session is over
            with self.lock:
                if self.session is session:
                    self._drop_session(f"its job failed: {e}")
            if isinstance(e, PartyError):
                raise
            if isinstance(e, OSError):  # a file or resource of this host: its paths stay in the party's log
                log.warning("party %s: %s", self.party.id, e)
                raise PartyError(f"party {self.party.id}: an error on its host (its log says why)") from None
            raise PartyError(f"party {self.party.id}: {_first_lines(e)}") from None
        with self.lock:
            if session.job is job:
                session.job = None
        return True

    # -- helpers --------------------------------------------------------------------------------

    def _owned_model(self, caller: Caller, model_id: str, owner: str = "") -> _Model:
        """The caller's own model of this id (``owner``, if named, must be the caller)."""
        model = self.models.get(_model_key(caller.name, model_id)) if owner in ("", caller.name) else None
        if model is None:
            raise PartyError(f"party {self.party.id} has no model {model_id!r} owned by {caller.name}")
        return model

    def _user_session(self, caller: Caller, session_id: str, ready: bool) -> _Session:
        session = self.session
        if session is None or session.id != session_id or session.user != caller.name:
            raise PartyError(f"party {self.party.id} has no session {session_id!r} of {caller.name} "
                             "(a failed job, a close or a long silence ends a session)")
        session.last_seen = time.monotonic()
        if ready and session.program is None:
            raise PartyError(f"session {session_id!r} is still opening")
        return session

    def _check_share(self, meta: bytes, content, spec: tuple, what: str) -> "_Share":
        """The share of ``meta`` and ``content`` (`share_wire`), cut into chunks by this party; refused unless it is a
        secret share of ``spec``'s shape and dtype on this ring (`_check_meta`), whole: its content exactly that many
        bytes."""
        self._check_meta(meta, spec, what)
        shape, _ = spec
        expected = self._share_bytes(shape)
        if len(content) != expected:
            raise PartyError(f"{what}: {len(content)} bytes of share data, expected {expected}")
        elements = math.prod(int(d) for d in shape)
        return _Share(meta, share_wire.chunks_of(content), share_wire.component_digests(meta, content, elements))

    def _check_meta(self, meta: bytes, spec: tuple, what: str) -> None:
        """Refuse a share's meta unless it is a secret share of ``spec``'s shape and dtype on this ring (checked before
        its content is received)."""
        shape, dtype = spec
        value = libspu.ValueMeta()
        try:
            value.ParseFromString(meta)
        except Exception:  # noqa: BLE001 - anything unparsable is refused
            raise PartyError(f"{what}: not an SPU share") from None
        got_shape = tuple(value.shape.dims)
        field = self.cluster.field
        # an arithmetic share (a boolean one for bool), never a public value's type
        storage = f"{self.cluster.protocol.lower()}.{'BShr<' if dtype == 'bool' else 'AShr<' + field + '>'}"
        if value.visibility != libspu.Visibility.VIS_SECRET or not (
                value.storage_type.startswith(storage) if dtype == "bool" else value.storage_type == storage):
            raise PartyError(f"{what}: must be a secret share ({storage}), got {value.visibility}, "
                             f"{value.storage_type}")
        if (got_shape != tuple(shape) or value.is_complex
                or str(value.data_type) != f"DataType.DT_{_SPU_DTYPES[dtype]}"):
            raise PartyError(f"{what}: expected {dtype}{list(shape)}, got {value.data_type} {list(got_shape)}"
                             f"{' (complex)' if value.is_complex else ''}")

    def _reserve_receiving(self, method: str, size: int) -> None:
        """Count ``size`` bytes of shares a call of ``method`` is about to receive (under the lock), within the
        method's MAX_RECEIVING_BYTES (owners' uploads never take the session's room)."""
        if size > MAX_RECEIVING_BYTES:
            raise PartyError(f"{method}: the shares named take {size} bytes, more than one call may carry "
                             f"({MAX_RECEIVING_BYTES})")
        held = self.receiving_bytes[method]
        if held + size > MAX_RECEIVING_BYTES:
            raise PartyError(f"{method}: party {self.party.id} is receiving other calls' shares; with this call's {size} "
                             f"bytes they would pass {MAX_RECEIVING_BYTES}: try again shortly")
        self.receiving_bytes[method] = held + size

    def _held_share_memory(self) -> int:
        """The share memory taken (under the lock): every model's, uploaded or announced, and the session's inputs."""
        return sum(m.size for m in self.models.values()) + (self.session.input_bytes if self.session else 0)

    def _share_bytes(self, shape) -> int:
        """A party's share of a value of this shape: replicated shares, two ring elements per element (counted in
        Python's integers: a manifest's shapes can be anything, and int64 would wrap)."""
        return 2 * spu_config.RING_BITS[self.cluster.field] // 8 * math.prod(int(d) for d in shape)

    def _info(self, model_id: str, model: _Model) -> messages.ModelInfo:
        return messages.ModelInfo(model_id, model.owner, model.manifest, model.sealed, model.digest)

    def _drop_session(self, why: str, told: str = "dropped by the party: its log says why") -> None:
        """End the session, if any: ``why`` goes to the log, ``told`` to its user should a call of it still come."""
        session, self.session = self.session, None
        if session is None:
            return
        self._remember_ended(session.user, session.id, told)
        _cancel(session.receiving)
        try:
            if session.worker is not None:
                session.worker.stop()
        finally:
            self.front.end_session()
        log.info("party %s: session %s dropped: %s", self.party.id, session.id, _brief(why))

    def _remember_ended(self, user: str, session_id: str, how: str) -> None:
        """Refuse to open ``session_id`` for ``user`` from now on (the last ENDED_SESSIONS_PER_USER of theirs), saying
        ``how`` it ended."""
        ended = self.ended_sessions.setdefault(user, {})
        ended.pop(session_id, None)
        ended[session_id] = how
        while len(ended) > ENDED_SESSIONS_PER_USER:
            del ended[next(iter(ended))]

    def _drop_idle_sessions(self) -> None:
        """Drop a session, and an unsealed upload, whose client has been silent for session_idle_s (or, an upload, that
        is not sealed within UNSEALED_S)."""
        while not self._stop.wait(1.0):
            with self.lock:
                now, idle = time.monotonic(), self.cluster.session_idle_s
                for key, model in list(self.models.items()):  # (one receiving shares is not silent)
                    if model.sealed:
                        continue
                    if now - model.began > UNSEALED_S:
                        why = f"not sealed {UNSEALED_S:g} s after it began"
                    elif not model.receiving and now - model.last_seen > idle:
                        why = f"{idle:g} s of silence"
                    else:
                        continue
                    del self.models[key]
                    _cancel(model.receiving)
                    log.info("party %s: unsealed model %s dropped: %s", self.party.id, key, why)
                session = self.session
                if session is None or session.polls:
                    continue
                if session.job is not None and not session.job.done():
                    # a compile runs for up to COMPILE_S: one its user abandoned ends now (`CompilerProcess.run` gives
                    # it up); a step or a start is bounded by the link's timeouts and ends on its own
                    if session.compiled is None and now - session.last_seen > idle:
                        self._drop_session(f"no request from {session.user} for {idle:g} s while it compiled")
                    continue
                failed = session.job is not None and session.job.exception() is not None
                if failed and now - session.last_seen > FAILED_SESSION_S:  # its user did not come back
                    self._drop_session(f"its job failed: {session.job.exception()}")
                    continue
                if now - session.last_seen > idle and not session.receiving:  # (a call receiving an input is no silence)
                    self._drop_session(f"no request from {session.user} for {idle:g} s")
                    continue
                opening = session.program is None and session.job_index == -1
                allowed = max(idle, OPENING_PROGRESS_S if opening
                              else RUNNING_PROGRESS_S + self.cluster.connect_timeout_s)
                if now - session.last_progress > allowed:
                    self._drop_session(f"{session.user} did not move it on for {allowed:g} s")


def _gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"


_SPU_DTYPES = {"float32": "F32", "float64": "F64", "int32": "I32", "int64": "I64", "bool": "I1"}


def _brief(text: str) -> str:
    """``text`` cut to MAX_LOGGED_CHARS for the log: a reason may quote a client's job, which must not fill a party's
    disk."""
    if len(text) <= MAX_LOGGED_CHARS:
        return text
    return f"{text[:MAX_LOGGED_CHARS]}... ({len(text)} characters)"


def _receive(parts: Iterator[bytes], sizes: List[int], what: str) -> List[memoryview]:
    """The contents of shares of ``sizes`` bytes, read from a request's ``parts`` in order into one buffer (views of
    it, not copies). A party reads no more than their total: a part that would go past it, an empty part, a stream
    that ends short or goes on after it are refused, so a client cannot make a party hold more than the shares it
    expects."""
    total, received, content = sum(sizes), 0, None
    while received < total:
        part = next(parts, None)
        if part is None:
            raise PartyError(f"{what}: {received} bytes of share content, expected {total}")
        if not part or received + len(part) > total:
            raise PartyError(f"{what}: a part of {len(part)} bytes after {received} of the {total} expected")
        if content is None:  # (allocated once a part arrives)
            content = memoryview(bytearray(total))
        content[received:received + len(part)] = part
        received += len(part)
    if next(parts, None) is not None:
        raise PartyError(f"{what}: more share content than the {total} bytes expected")
    offsets = list(itertools.accumulate(sizes, initial=0))
    content = content if content is not None else memoryview(b"")
    return [content[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _cancel(receiving: Dict[str, "_ShareParts"]) -> None:
    """End the calls still receiving shares for a model or session that is gone (its share memory is free again)."""
    for parts in set(receiving.values()):
        parts.cancel()


def _check_name(name: str, what: str) -> None:
    if not NAME.fullmatch(name):
        raise PartyError(f"{what} {name!r} must be 1-64 letters, digits, '.', '_' or '-'")


def _model_key(owner: str, model_id: str) -> str:
    """Where a party holds ``owner``'s model ``model_id``: each owner's ids are its own namespace, so an owner learns
    nothing of another's ids, and a user's inputs go to the model of the owner it named ('/' is in neither name: both
    are checked here, whoever named them)."""
    _check_name(owner, "model owner")
    _check_name(model_id, "model id")
    return f"{owner}/{model_id}"


def _tensor(name: str) -> str:
    return f"model/{name}"


def _slot(name: str) -> str:
    return f"slot/{name}"


def _runtime_name(name: str) -> str:
    """A program's value name as held in the runtime (model tensors and slots are namespaced)."""
    kind, _, rest = name.partition(":")
    return {"model": _tensor, "slot": _slot}.get(kind, lambda n: name)(rest)


def _digest(meta: bytes, content) -> str:
    digest = hashlib.sha256(meta)
    digest.update(content)
    return digest.hexdigest()


class _Worker:
    """A child process holding one session's SPU link and runtime, driven over a pipe.

    SPU's brpc link ends the whole process when it cannot deliver to a lost peer, so the runtime of a
    session lives in a child: a lost peer ends the session, never the party.
    """

    def __init__(self, cluster, party, log_path, session_id: str, runtime_config: bytes, agreement: str,
                 listen: str):
        self.party = party
        context = mp.get_context("spawn")  # never fork a process that runs gRPC threads
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main,
            args=(child, cluster, party, str(log_path), session_id, runtime_config, agreement, listen),
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
                if not self.process.is_alive() and not self.conn.poll(0):  # (a last reply may wait in the pipe)
                    raise PartyError(
                        f"party {self.party.id}: its SPU runtime ended during {op} (exit code "
                        f"{self.process.exitcode}; SPU's link stops the process when a peer is lost)"
                    )
                if deadline is not None and time.monotonic() > deadline:
                    self.process.kill()  # its late reply must never answer a later call
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


def _worker_main(conn, cluster: ClusterConfig, party: PartyConfig, log_path: str, session_id: str,
                 runtime_config: bytes, agreement: str, listen: str):
    """The worker process: build the link (listening at ``listen``, behind the party's `LinkFront`), check that the
    three parties agree on the session (the same session, user, model, its owner, job, executable and runtime
    configuration), build the runtime, then serve the party's jobs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the party process decides when this one ends
    die_with_parent()
    warnings.showwarning = warning_line
    try:
        spu_log = SpuLog.get(log_path)
    except (PrivatePathError, OSError) as e:  # (its folder was checked when the party started)
        print(f"party {party.id}: cannot open its SPU log: {e}", file=sys.stderr, flush=True)
        conn.send(("error", "cannot open its SPU log (the party's output says why)"))
        return
    try:
        config = libspu.RuntimeConfig()
        config.ParseFromString(runtime_config)
        link = libspu.link.create_brpc(link_desc(cluster, party, session_id, listen), party.rank)
        agreed = link.all_gather(agreement)
    except Exception as e:  # noqa: BLE001 - reported to the client through the party
        conn.send(("error", f"cannot open the SPU link: {_first_lines(e)}"))
        return
    if len(set(agreed)) != 1:
        differ = [cluster.parties[r].id for r, a in enumerate(agreed) if a != agreement]
        # honest parties saw the same gathered values, so all refuse; before this worker is ended, the link's goodbye
        # (each party's sends delivered and acknowledged, else SPU's link ends a peer still waiting on an ack),
        # bounded: a peer that never says goodbye (it told others something else, or died) must not delay the refusal.
        # (Refusing first lets the party end this process while its gathered value is still on its way: a peer then
        # times out in its gather instead of refusing.)
        goodbye = threading.Thread(target=link.stop_link, daemon=True, name="spu-link-goodbye")
        goodbye.start()
        goodbye.join(LINK_GOODBYE_S)
        conn.send(("error", f"the parties disagree about this session (session, user, model, job, executable or "
                            "runtime): "
                            f"{', '.join(differ)} {'was' if len(differ) == 1 else 'were'} asked for something else"))
        return
    runtime = spu.Runtime(link, config)
    conn.send(("ok", None))
    while True:
        try:
            op, payload = conn.recv()
        except EOFError:
            return
        try:
            if op == "set_vars":
                for name, meta, chunks in payload:
                    share = libspu.Share()
                    share.meta, share.share_chunks = meta, chunks
                    runtime.set_var(name, share)
                result = None
            elif op == "check_shares":
                result = _consistent_shares(link, payload)
            elif op == "get_var":
                share = runtime.get_var(payload)
                result = (share.meta, list(share.share_chunks))
            elif op == "del_vars":
                for name in payload:
                    runtime.del_var(name)
                result = None
            elif op == "run":
                name, code, inputs, outputs = payload
                offset = spu_log.offset()
                start, cpu = time.perf_counter(), time.process_time()
                runtime.run(libspu.Executable(name=name, input_names=inputs, output_names=outputs, code=code))
                # this party's compute: the worker's CPU time over all its threads (SPU's and the link's), and
                # the wall time it was in the run (waiting on peers included)
                cpu, seconds = time.process_time() - cpu, time.perf_counter() - start
                result = parse_party_run(spu_log.read_from(offset))
                result["seconds"], result["cpu_seconds"] = seconds, cpu
            else:
                raise ValueError(f"unknown job {op!r}")
        except OSError as e:  # a file of the party's host (its SPU log): told to the party's output, not the client
            print(f"party {party.id}: {op} failed: {e}", file=sys.stderr, flush=True)
            reply = ("error", f"{op} failed: an error on the party's host (the party's output says why)")
        except Exception as e:  # noqa: BLE001 - reported to the client through the party
            reply = ("error", f"{op} failed: {_first_lines(e)}")
        else:
            reply = ("ok", result)
        try:
            conn.send(reply)
        except (BrokenPipeError, EOFError):  # the party ended this session meanwhile
            return


def _consistent_shares(link, checks) -> None:
    """Refuse values whose replicated shares disagree between the parties.

    Under ABY3 party i holds components (a_i, a_{i+1}) of each value, and a product's share z_i = x_i y_i + x_i y_{i+1}
    + x_{i+1} y_i: a client that gives one party a wrong copy of a component (x_{i+1} + e) adds e y_i to the product,
    where y_i is one component of the other operand (a weight's, say), and so could read weight components off its
    results. So each party sends the digests of its second components (``checks``: name, first's digest, second's) to
    the next party alone, which holds those components itself and learns nothing from them, and compares what the
    previous party sent with its own first components; the three verdicts (the public names of the values that
    disagree, never digests) are then gathered, so that all three parties refuse together."""
    link.send_async(link.next_rank(), json.dumps([[name, second] for name, _, second in checks]))
    theirs = json.loads(link.recv(link.next_rank(link.world_size - 1)))
    if [name for name, _ in theirs] != [name for name, _, _ in checks]:
        disagree = ["the list of values checked"]
    else:
        disagree = [name for (name, first, _), (_, copy) in zip(checks, theirs) if copy != first]
    names = sorted({name for verdict in link.all_gather(json.dumps(disagree)) for name in json.loads(verdict)})
    if names:
        raise ValueError(f"the parties' shares of {names_of(names)} disagree: a client gave them inconsistent shares")


def _first_lines(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


def link_desc(cluster: ClusterConfig, party: PartyConfig, session_id: str, listen: Optional[str] = None):
    """The SPU link of ``party`` for one session: it listens on its own ``spu_address`` (on ``listen`` instead where
    given: a party's sessions listen on a private socket behind `LinkFront`, which serves spu_address) and dials
    each peer at the address its config gives for that peer (`ClusterConfig.dial_addresses`: the peer's ``spu_address``
    unless ``spu_dial`` routes it, e.g. through a link emulator). Mutual TLS either way: whoever answers
    a dial must hold a certificate of the party CA."""
    desc = libspu.link.Desc()
    desc.id = session_id
    desc.recv_timeout_ms = int(cluster.recv_timeout_s * 1000)
    desc.connect_retry_interval_ms = 200
    desc.connect_retry_times = max(1, int(cluster.connect_timeout_s / 0.2))
    for p, address in zip(cluster.parties, cluster.dial_addresses(party)):
        desc.add_party(p.id, listen if listen is not None and p.id == party.id else address)
    _enable_link_tls(desc, party)
    return desc


def _enable_link_tls(desc, party: PartyConfig) -> None:
    """The SPU link over mutual TLS: peers must hold a certificate of the party CA (clients' do not). A party's own
    listener takes plaintext too (SPU's brpc server), so its sessions listen behind `LinkFront`."""
    desc.enable_ssl = True
    for opts in (desc.server_ssl_opts, desc.client_ssl_opts):
        opts.cert.certificate_path = party.tls.cert
        opts.cert.private_key_path = party.tls.key
        opts.verify.verify_depth = 1
        opts.verify.ca_file_path = party.tls.trusted_ca


def _handler(service: PartyService):
    """gRPC handlers: authenticate the caller, authorise by role, then read and decode the typed request, and answer.

    Every method is served as a stream (a unary client's one message is a stream of one), so that nothing waits on a
    client without a deadline of the party's own: a request must arrive within REQUEST_S, and a share-carrying call's
    shares within RECEIVE_S of its header, or the call is cancelled (a stalled client must not hold one of the
    CONTROL_THREADS). A client has at most MAX_CALLS_PER_CLIENT calls in progress on a party, and at most
    RECEIVING_TURNS calls of a method receive shares at once, each only once its method has checked the header
    (`_ShareParts`).
    """
    turns = {name: threading.BoundedSemaphore(most) for name, most in RECEIVING_TURNS.items()}
    in_progress: Dict[str, int] = {}
    counting = threading.Lock()

    def wrap(method: messages.Method):
        implementation = getattr(service, method.name)

        def answer(caller: Caller, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            deadline, parts = _Deadline(context, REQUEST_S), None
            try:
                first = next(requests, None)
                if first is None:
                    raise messages.MessageError(f"{method.name}: no request")
                request = method.request.decode(first)
                if not method.streams_shares:
                    if next(requests, None) is not None:
                        raise messages.MessageError(f"{method.name} takes one message")
                    deadline.stop()
                    return implementation(caller, request).encode()
                deadline.restart(RECEIVE_S)
                parts = _ShareParts(requests, context, deadline, turns[method.name],
                                    f"party {service.party.id} is receiving the shares of "
                                    f"{RECEIVING_TURNS[method.name]} other {method.name} calls; try again shortly")
                return implementation(caller, request, parts).encode()
            finally:
                deadline.stop()
                if parts is not None:
                    parts.close()

        def call(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            name, role = peer_identity(context.auth_context())
            if role is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"party {service.party.id}: a client certificate of the client CA is required, "
                              f"named owner[-NAME] or user[-NAME] (got {name!r})")
            if role not in method.roles:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"party {service.party.id}: {method.name} is not allowed to the {role} role ({name})")
            with counting:
                admitted = in_progress.get(name, 0) < MAX_CALLS_PER_CLIENT
                if admitted:
                    in_progress[name] = in_progress.get(name, 0) + 1
            if not admitted:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"party {service.party.id}: {name} has "
                              f"{MAX_CALLS_PER_CLIENT} calls in progress already")
            try:
                return answer(Caller(name, role), requests, context)
            except messages.MessageError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"party {service.party.id}: {e}")
            except PartyError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except grpc.RpcError:  # the call ended before its request or shares arrived: its status is sent already
                log.info("party %s: %s of %s cancelled before its request or shares arrived (by its client, by the "
                         "party's deadline, or with its model or session)", service.party.id, method.name, name)
                return b""
            except Exception as e:  # noqa: BLE001 - any other error goes back to the client, the party named
                log.exception("party %s: %s failed", service.party.id, method.name)
                context.abort(grpc.StatusCode.INTERNAL, f"party {service.party.id}: {_first_lines(e)}")
            finally:
                with counting:
                    in_progress[name] -= 1
                    if not in_progress[name]:
                        del in_progress[name]

        return grpc.stream_unary_rpc_method_handler(call)

    return grpc.method_handlers_generic_handler(messages.SERVICE, {m.name: wrap(m) for m in METHODS.values()})


class _Deadline:
    """Cancels a call unless stopped within its seconds: no wait on a client outlasts the party's own deadline."""

    def __init__(self, context: grpc.ServicerContext, seconds: float):
        self._context, self._timer = context, None
        self.restart(seconds)

    def restart(self, seconds: float) -> None:
        self.stop()
        self._timer = threading.Timer(seconds, self._context.cancel)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _ShareParts:
    """The contents of a share-carrying request's `messages.SharePart` messages, read only as its method takes them,
    which it does once it has checked the header. The first read takes one of the party's turns for the method
    (refused when all are taken); the turn and the call's deadline end with the stream. `cancel` ends the call from
    another thread: its model deleted or its session dropped while the shares arrive."""

    def __init__(self, requests: Iterator[bytes], context: grpc.ServicerContext, deadline: _Deadline,
                 turns: threading.BoundedSemaphore, busy: str):
        self._requests, self._context, self._deadline, self._turns = requests, context, deadline, turns
        self._busy, self._turn, self._ended = busy, False, False  # (busy: the refusal when every turn is taken)

    def __iter__(self) -> "_ShareParts":
        return self

    def __next__(self) -> bytes:
        if self._ended:
            raise StopIteration
        if not self._turn:
            if not self._turns.acquire(blocking=False):
                raise PartyError(self._busy)
            self._turn = True
        try:
            raw = next(self._requests)
        except StopIteration:
            self.close()
            raise
        return messages.SharePart.decode(raw).content

    def cancel(self) -> None:
        self._context.cancel()

    def close(self) -> None:
        """The stream is over for this party: its deadline stops, its turn is given back."""
        self._ended = True
        self._deadline.stop()
        if self._turn:
            self._turn = False
            self._turns.release()


def server_credentials(party: PartyConfig) -> grpc.ServerCredentials:
    """Mutual TLS for the control service: this party's certificate; clients must hold the client CA's."""
    read = lambda p: Path(p).read_bytes()  # noqa: E731
    return grpc.ssl_server_credentials(
        [(read(party.tls.key), read(party.tls.cert))], root_certificates=read(party.client_ca),
        require_client_auth=True,
    )


def serve(cluster: ClusterConfig, party_id: str, catalog: JobCatalog, log_dir: Path, share_memory: int) -> int:
    """Run one party until SIGINT/SIGTERM, its models' shares within ``share_memory`` bytes; returns the process exit
    code."""
    party = cluster.party(party_id)
    handler = _PrivateRotatingFileHandler(private_log_file(log_dir, f"party-{party.id}.log"), maxBytes=MAX_LOG_BYTES,
                                          backupCount=1)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    party.tls.check_files(f"party {party.id}")
    if not Path(party.client_ca).is_file():
        raise PartyError(f"party {party.id}: the client CA file {party.client_ca} does not exist")
    try:
        private_dir.check_file(Path(party.client_ca).absolute())
    except (PrivatePathError, OSError) as e:  # whoever could swap it could let in clients of its own
        raise PartyError(f"party {party.id}: the client CA file {party.client_ca}: {e}; only this user and root may "
                         "be able to change it or a folder on its path") from None
    if shares_a_key(party.tls.trusted_ca, party.client_ca):
        raise PartyError(f"party {party.id}: the client CA {party.client_ca} is the party CA {party.tls.trusted_ca} "
                         "(one CA would let a client join the parties' SPU link)")
    try:
        compile_cache.check_directory()
    except CompileCacheError as e:
        raise PartyError(f"party {party.id}: {e}") from None
    check_protocol_sets(party.id)
    check_link_folder(party.id)
    check_port_free(party.spu_address, f"party {party.id}: SPU link address")
    check_port_free(party.control_address, f"party {party.id}: control address")
    # the party's memory holds shares, its workers' the runtime's copies: no core file may write them to disk (the
    # processes it starts inherit the limit)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    service = PartyService(cluster, party, catalog, private_log_file(log_dir, f"spu-{party.id}.log"), share_memory)
    server = grpc.server(cf.ThreadPoolExecutor(max_workers=CONTROL_THREADS), maximum_concurrent_rpcs=32,
                         options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    server.add_generic_rpc_handlers((_handler(service),))
    try:
        try:
            bound = server.add_secure_port(party.control_address, server_credentials(party))
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
    finally:
        service.shutdown()  # first, so that a run blocked inside SPU ends and its gRPC call returns
    server.stop(grace=2).wait()
    return 0


def check_protocol_sets(party_id: str) -> None:
    """Refuse to start where someone other than this user and root could change or add a protocol-set file the party
    would read (`registry.protocol_set_dirs`: first match wins, so a file added to an earlier folder shadows a shipped
    set): a set chooses the kernels and the SPU options a session runs with (an independent review's finding)."""
    named = {Path(p).absolute() for p in os.environ.get("CIPHERDM_PROTOCOLS_PATH", "").split(os.pathsep) if p}
    for folder in registry.protocol_set_dirs():
        folder = folder.absolute()
        try:
            if not folder.is_dir():
                if folder in named:
                    raise PrivatePathError("it does not exist (someone else could make it)")
                while not folder.is_dir():  # a shipped folder this install lacks: no one else may make it
                    folder = folder.parent
                private_dir.check_folder(folder)
                continue
            private_dir.check_folder(folder)
            for file in sorted(folder.glob("*.json")):
                private_dir.check_file(file)
        except (PrivatePathError, OSError) as e:
            raise PartyError(f"party {party_id}: protocol sets in {folder}: {e}; only this user and root may be able "
                             "to change them or a folder on their path") from None


def check_link_folder(party_id: str) -> None:
    """Refuse to start where a session's SPU link socket could not be made (`link_front.new_socket_folder`), rather
    than fail every session."""
    try:
        os.rmdir(new_socket_folder())
    except OSError as e:
        raise PartyError(f"party {party_id}: {e}; choose a TMPDIR no one else can change (or a sticky one, as /tmp)"
                         ) from None


def private_log_file(log_dir: Path, name: str) -> Path:
    """The real path of ``log_dir/name``, a file of this user's alone in a folder that no one else can change, nor
    anything on its path (`profiling.private_log_path`: a party's logs say what it saw of its jobs, and it writes them
    by path, as SPU does)."""
    try:
        return private_log_path(Path(log_dir) / name)
    except PrivatePathError as e:
        raise PartyError(f"log folder {log_dir}: {e}; no one but this user (uid {os.getuid()}) and root may be able "
                         "to change it or a folder on its path") from None
    except OSError as e:
        raise PartyError(f"log folder {log_dir}: cannot make or open {name} in it ({e})") from None


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A log that starts afresh at ``maxBytes`` (the older file kept as ``.1``), every file created 0600 and never
    opened through a symlink (`private_log_file`'s folder is this user's alone)."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding)


def rotate_log(path: Path) -> None:
    """Start the log at ``path`` afresh (created 0600, as `private_log_file`), its content kept as ``path.1``, once it
    holds MAX_LOG_BYTES. (The SPU log, between sessions: a session's runs may take it past the limit.)"""
    try:
        full = os.stat(path, follow_symlinks=False).st_size >= MAX_LOG_BYTES
    except FileNotFoundError:  # (removed by its operator)
        full = False
    if full:
        os.replace(path, f"{path}.1")
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
