"""Attacks on a cluster started as the README says (certificates, spu-launch, an owner's upload), each refused.

Threat model (SECURITY.md): semi-honest parties with an honest majority; no client, local process or
single party trusted. Every test plays one attack that worked against the earlier cluster.
"""

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import grpc
import msgpack
import numpy as np
import pytest

from cipherdm_spu import cluster_config as cc
from cipherdm_spu import registry
from cipherdm_spu.client import PartyClients
from cipherdm_spu.errors import ClusterError, PartyError, ProtocolError
from cipherdm_spu.jobs import sample_on_cluster
from cipherdm_spu.messages import (CHANNEL_OPTIONS, METHODS, SERVICE, Empty, ModelBegin, ModelPut, ModelRef, SessionOpen,
                                   SessionRef, SessionStep, SharePart)
from cipherdm_spu.compiler_process import CompilerProcess
from cipherdm_spu.party import MAX_MANIFEST_BYTES, SESSION_SHARE_PART, TENSOR_OVERHEAD_BYTES, private_log_file
from cipherdm_spu.registry import ProtocolSet
from cipherdm_spu.share_wire import content_of

from .cluster_fixtures import TINY_JOB, make_certs, tiny_inputs, write_config

pytestmark = pytest.mark.slow


def channel(config: Path, party: int, cert=None, key=None, ca=None, secure=True):
    """A raw gRPC channel to one party's control service, with whatever credentials an attacker has."""
    cluster = cc.load(config)
    p = cluster.parties[party]
    if not secure:
        return grpc.insecure_channel(p.control_address, options=CHANNEL_OPTIONS)
    read = lambda f: Path(f).read_bytes() if f else None  # noqa: E731
    creds = grpc.ssl_channel_credentials(read(ca or p.tls.trusted_ca), read(key), read(cert))
    return grpc.secure_channel(p.control_address, creds,
                               options=CHANNEL_OPTIONS + [("grpc.ssl_target_name_override", p.id)])


def raw_call(ch, method: str, payload: bytes, timeout=10.0) -> bytes:
    return ch.unary_unary(f"/{SERVICE}/{method}")(payload, timeout=timeout)


def refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_no_client_without_a_client_certificate(cluster):
    config, _ = cluster
    tls = config.parent / "tls"
    attempts = {
        "plaintext": channel(config, 0, secure=False),
        "TLS without a client certificate": channel(config, 0),
        "a party's own certificate as a client": channel(config, 1, cert=tls / "P1.pem", key=tls / "P1.key"),
    }
    for what, ch in attempts.items():
        for method in ("hello", "model_info", "session_result", "model_put", "session_put"):  # (the last two: streams)
            code = refused(lambda: raw_call(ch, method, Empty().encode(), timeout=5))
            assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED), (what, method, code)


def test_a_client_refuses_a_party_whose_certificate_names_another_party(cluster):
    """A client checks each party's certificate against the party's id, not only the party CA: with P0's and P1's
    control addresses swapped in its config, it reaches two genuine parties and refuses both (a SECURITY.md claim no
    test exercised, an independent review noted)."""
    config, _ = cluster
    raw = json.loads(config.read_text())
    first, second = raw["parties"][0], raw["parties"][1]
    first["control_address"], second["control_address"] = second["control_address"], first["control_address"]
    swapped = config.parent / "swapped.json"  # (beside the original: its TLS paths are relative to its folder)
    swapped.write_text(json.dumps(raw))
    with PartyClients(cc.load(config), "user") as user:  # the true config: P0 answers
        user.call(0, "hello", Empty(), timeout=10)
    with PartyClients(cc.load(swapped), "user") as user:
        for rank in (0, 1):
            with pytest.raises(grpc.RpcError) as info:
                user.call(rank, "hello", Empty(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, rank
            assert "Hostname Verification Check failed" in info.value.details(), info.value.details()
        user.call(2, "hello", Empty(), timeout=10)  # the party at its own address still answers


def test_a_client_whose_certificate_names_another_client_is_not_ready(cluster):
    """The parties know a client by its certificate's name (its models' namespace, a policy's user name), the client
    by its config key: a key whose certificate names another client is refused before anything is sent (an
    independent review: `upload` would have told users the wrong owner)."""
    config, _ = cluster
    raw = json.loads(config.read_text())
    raw["tls"]["clients"]["owner"] = raw["tls"]["clients"]["user"]
    mislabelled = config.parent / "mislabelled.json"  # (beside the original: its TLS paths are relative to its folder)
    mislabelled.write_text(json.dumps(raw))
    with PartyClients(cc.load(mislabelled), "owner") as owner:
        with pytest.raises(ClusterError, match="party P0 knows this client as 'user': the certificate of "
                                               "tls.clients.owner names another client"):
            owner.check_ready()
    with PartyClients(cc.load(config), "owner") as owner:
        owner.check_ready()


def test_a_certificate_of_another_ca_named_owner_is_refused(cluster, tmp_path):
    config, _ = cluster
    rogue = write_config(tmp_path / "rogue.json")  # the attacker's own CAs, with an "owner" client
    make_certs(rogue, clients="owner")
    ch = channel(config, 0, cert=tmp_path / "tls" / "owner.pem", key=tmp_path / "tls" / "owner.key",
                 ca=config.parent / "tls" / "party-ca.pem")
    assert refused(lambda: raw_call(ch, "model_delete", ModelRef("tiny").encode(), timeout=5)) in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def test_a_party_refuses_a_client_ca_that_is_a_copy_of_the_party_ca(tmp_path):
    """Two CA paths, one CA: a client certificate would then pass on the parties' SPU link."""
    import shutil

    from cipherdm_spu.jobs import SamplingCatalog
    from cipherdm_spu.party import serve

    config = write_config(tmp_path / "cluster.json")
    make_certs(config)
    shutil.copyfile(tmp_path / "tls" / "party-ca.pem", tmp_path / "tls" / "client-ca.pem")
    with pytest.raises(PartyError, match="is the party CA"):
        serve(cc.load(config), "P0", SamplingCatalog(), tmp_path / "logs", 1 << 30)


def test_no_method_returns_or_runs_anything_but_what_roles_allow(cluster):
    config, _ = cluster
    with PartyClients(cc.load(config), "user") as user, PartyClients(cc.load(config), "owner") as owner:
        # the old driver's methods are gone: no value fetch, no audit of names, no executables
        for method in ("get_var", "set_var", "run", "audit", "drop", "open"):
            assert refused(lambda: raw_call(user._channels[0], method, b"\x80")) == grpc.StatusCode.UNIMPLEMENTED
        # a user cannot upload, replace or delete a model; the owner cannot run or receive a session's result
        for method, request in (("model_begin", ModelBegin("evil", "{}")), ("model_delete", ModelRef("tiny")),
                                ("model_put", ModelPut("tiny", [], []))):
            assert refused(lambda: user.call(0, method, request)) == grpc.StatusCode.PERMISSION_DENIED
        for method, request in (("session_result", SessionRef("x")),
                                ("session_open", SessionOpen("x", "tiny", "{}", "owner")),
                                ("session_step", SessionStep("x", 0))):
            assert refused(lambda: owner.call(0, method, request)) == grpc.StatusCode.PERMISSION_DENIED
        # every method names its roles; none is open to a party
        assert all(m.roles <= {"owner", "user"} for m in METHODS.values())


def test_no_share_content_is_read_before_the_caller_and_the_header_are_checked(cluster):
    """Shares travel as a header and parts of a stream (a request used to be up to 512 MiB, received whole before any
    check: an independent review's finding). A user's upload, an owner's to a sealed model and an input to a session
    its sender does not hold are refused on their headers; gRPC's flow control then stops each client's 64 MiB stream
    after a few parts. And no message larger than a manifest's request is received at all, whoever sends it."""
    from cipherdm_spu.messages import PART_BYTES, SessionPut
    from cipherdm_spu.party import MAX_REQUEST_BYTES

    config, _ = cluster
    with PartyClients(cc.load(config), "user") as user, PartyClients(cc.load(config), "owner") as owner:
        for clients, method, header, code, message in (
                (user, "model_put", ModelPut("tiny", ["w"], [b""]), grpc.StatusCode.PERMISSION_DENIED,
                 "model_put is not allowed to the user role"),
                (owner, "model_put", ModelPut("tiny", ["w"], [b""]), grpc.StatusCode.FAILED_PRECONDITION,
                 "model 'tiny' is sealed"),
                (user, "session_put", SessionPut("nobody", "x", b""), grpc.StatusCode.FAILED_PRECONDITION,
                 "no session 'nobody' of user")):
            taken = []

            def stream():
                yield header.encode()
                for i in range(64):
                    taken.append(i)
                    yield SharePart(bytes(PART_BYTES)).encode()

            with pytest.raises(grpc.RpcError) as info:
                clients._channels[0].stream_unary(METHODS[method].path)(stream(), timeout=60)
            assert (info.value.code(), message in info.value.details()) == (code, True), info.value.details()
            assert len(taken) < 16, (method, len(taken))
        for clients in (user, owner):
            assert refused(lambda: raw_call(clients._channels[0], "hello", bytes(MAX_REQUEST_BYTES + 1))) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_malformed_messages_are_refused(cluster):
    config, _ = cluster
    with PartyClients(cc.load(config), "user") as user:
        ch = user._channels[0]
        for payload in (b"\xff\x00garbage", json.dumps({"model_id": "tiny"}).encode(),
                        Empty().encode(), ModelRef("tiny").encode()[:-2]):
            assert refused(lambda: raw_call(ch, "model_info", payload)) == grpc.StatusCode.INVALID_ARGUMENT
        typed_wrong = msgpack.packb({"model_id": 7})
        extra = msgpack.packb({"model_id": "tiny", "runtime_config": b"snapshot"})
        for payload in (typed_wrong, extra):
            assert refused(lambda: raw_call(ch, "model_info", payload)) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_session_cannot_be_taken_over_and_is_dropped_when_abandoned(cluster):
    config, _ = cluster
    cluster_cfg = cc.load(config)
    with PartyClients(cluster_cfg, "user") as alice, PartyClients(cluster_cfg, "user-bob") as bob:
        job = json.dumps(TINY_JOB, sort_keys=True)
        alice.until_done("session_open", SessionOpen("alice-1", "tiny", job, "owner"), "opening")
        alice.until_done("session_start", SessionRef("alice-1"), "starting")
        # nobody without a party certificate reaches the session's SPU link (its brpc server alone would take this
        # forged message from P1 to P0, in plaintext, as the next one P0 reads)
        for party in cluster_cfg.parties:
            assert _plaintext_push(party.spu_address, "alice-1:P2P-1:1->0") == b"", party.id
        # bob can neither open over it, nor step, read, or close alice's session
        with pytest.raises(ClusterError, match="busy with another session"):
            bob.until_done("session_open", SessionOpen("bob-1", "tiny", job, "owner"), "opening")
        with pytest.raises(ClusterError, match="busy with another session"):
            bob.until_done("session_open", SessionOpen("alice-1", "tiny", job, "owner"), "opening")
        for method, request in (("session_result", SessionRef("alice-1")), ("session_step", SessionStep("alice-1", 0))):
            assert "no session 'alice-1' of user-bob" in _details(lambda: bob.call(0, method, request))
        bob.call_all("session_close", SessionRef("alice-1"))  # no effect on alice's session
        assert all(r.busy for r in alice.hello())
        # the result is released only after the last step, and steps only in order
        assert "released only after the last step" in _details(lambda: alice.call(0, "session_result", SessionRef("alice-1")))
        assert "cannot run now" in _details(lambda: alice.call(0, "session_step", SessionStep("alice-1", 1)))
        # alice goes silent: the parties drop her session and its shares after timeouts.session_idle_s
        deadline = time.monotonic() + 60
        while any(r.busy for r in alice.hello()) and time.monotonic() < deadline:
            time.sleep(1)
        assert not any(r.busy for r in alice.hello())
        assert "no session 'alice-1'" in _details(lambda: alice.call(0, "session_step", SessionStep("alice-1", 0)))
        # between sessions each party still holds its spu_address: no local process can take it (and have the next
        # session fail), and a forged push still gets nothing
        for party in cluster_cfg.parties:
            host, _, port = party.spu_address.rpartition(":")
            with pytest.raises(OSError):
                socket.create_server((host, int(port)))
            assert _plaintext_push(party.spu_address, "alice-1:P2P-1:1->0") == b"", party.id


@pytest.mark.slow
def test_inconsistent_replicated_shares_are_refused_before_a_step(cluster, monkeypatch):
    """Party i holds components (a_i, a_{i+1}) of each value. A user who gave P0 a wrong copy of x's a_1 would get
    products carrying e * (a weight's component): weight components read off its results (found by an independent
    attacker review). The parties compare the copies (digests, each only to the party holding the component) and
    refuse the step; the session ends, and the next one, consistent, runs."""
    from cipherdm_spu.messages import SessionPut

    config, _ = cluster
    original = PartyClients.call

    def tampering_call(self, rank, method, request, **kwargs):
        if isinstance(request, SessionPut) and rank == 0 and request.slot == "x":
            content = bytearray(kwargs["contents"][0])
            content[8] ^= 1  # element 0's second component (a_1): P1 holds the true one
            kwargs["contents"] = [bytes(content)]
        return original(self, rank, method, request, **kwargs)

    _, x_t, labels = tiny_inputs()
    with PartyClients(cc.load(config), "user") as user:
        monkeypatch.setattr(PartyClients, "call", tampering_call)
        with pytest.raises(ClusterError, match=r"shares of slot/x disagree: a client gave them inconsistent shares"):
            sample_on_cluster(user, "tiny", TINY_JOB, x_t, labels, owner="owner")
        assert not any(r.busy for r in user.hello())
        monkeypatch.setattr(PartyClients, "call", original)
        image, _, _ = sample_on_cluster(user, "tiny", TINY_JOB, x_t, labels, owner="owner")
        assert np.isfinite(image).all()


@pytest.mark.parametrize("tampered", [None, (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)],
                         ids=lambda t: "consistent" if t is None else f"P{t[0]}-component-{t[1]}")
def test_the_parties_refuse_shares_whose_copies_disagree_wherever_the_copy_is_wrong(tampered):
    """Three SPU runtimes on an in-memory link, as a session's workers: each party checks y's replicated shares
    (`_consistent_shares`), runs x * y, and checks again (the check and SPU's own use of the link stay in step).
    A wrong byte in either component any one party holds makes all three refuse, naming the value."""
    import jax
    import spu
    import spu.libspu as libspu
    import spu.utils.frontend as frontend

    from cipherdm_spu import share_wire, spu_config
    from cipherdm_spu.party import _consistent_shares

    config = spu_config.runtime_config({})
    io = spu.Io(3, config)
    x, y = np.arange(1, 7, dtype=np.float32).reshape(2, 3), np.full((2, 3), 0.5, np.float32)
    spec = jax.ShapeDtypeStruct((2, 3), np.float32)
    product, _ = frontend.compile(frontend.Kind.JAX, lambda a, b: a * b, [spec, spec], {}, ["x", "y"],
                                  [libspu.Visibility.VIS_SECRET] * 2, lambda outs: ["z"])
    shares = {name: io.make_shares(value, libspu.Visibility.VIS_SECRET) for name, value in (("x", x), ("y", y))}
    contents = {name: [content_of(s.share_chunks) for s in parts] for name, parts in shares.items()}
    if tampered is not None:
        rank, component = tampered
        wrong = bytearray(contents["y"][rank])
        wrong[component * 8] ^= 1  # element 0's component (a_rank or a_rank+1), 8 bytes each
        contents["y"][rank] = bytes(wrong)
    desc = libspu.link.Desc()
    for rank in range(3):
        desc.add_party(f"P{rank}", f"mem:{rank}")
    desc.recv_timeout_ms = 30_000
    results, errors = {}, {}

    def worker(rank):
        try:
            link = libspu.link.create_mem(desc, rank)
            runtime = spu.Runtime(link, config)
            checks = []
            for name in ("x", "y"):
                share = libspu.Share()
                share.meta, share.share_chunks = shares[name][rank].meta, share_wire.chunks_of(contents[name][rank])
                runtime.set_var(name, share)
                checks.append((name, *share_wire.component_digests(share.meta, contents[name][rank], 6)))
            for _ in range(2):
                _consistent_shares(link, checks)
                runtime.run(libspu.Executable(name="xy", input_names=["x", "y"], output_names=["z"], code=product.code))
            results[rank] = runtime.get_var("z")
        except Exception as e:  # noqa: BLE001 - what each party reports
            errors[rank] = str(e)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if tampered is None:
        assert errors == {} and np.allclose(io.reconstruct([results[r] for r in range(3)]), x * y)
    else:
        assert sorted(errors) == [0, 1, 2] and results == {}
        assert all("the parties' shares of y disagree" in e for e in errors.values()), errors


def _plaintext_push(address: str, key: str) -> bytes:
    """What a party's spu_address answers to an HTTP push of a forged link message (the link's own wire form)."""
    body = json.dumps({"sender_rank": 1, "key": key, "value": "RVZJTA==", "trans_type": "MONO"}).encode()
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /org.interconnection.link.ReceiverService/Push HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        try:
            return conn.recv(4096)
        except (ConnectionResetError, socket.timeout):
            return b""


def _details(call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.details()


def test_the_owners_policy_binds_users_and_jobs(cluster):
    config, _ = cluster
    with PartyClients(cc.load(config), "user") as user:
        bad_jobs = {
            "refuses the job: .*runtime": {**TINY_JOB, "runtime": {"enable_runtime_snapshot": True}},
            "refuses the job: .*steps must be": {**TINY_JOB, "steps": 0},
            "refuses the job: .*eta must be": {**TINY_JOB, "eta": float("nan")},
            # a public sigma of eta * sqrt(variance) would scale the user's noise past the ring before any clamp
            r"refuses the job: eta must be in \[0, 1\], got 1e\+30": {**TINY_JOB, "eta": 1e30},
            "refuses the job: .*unknown protocol set": {**TINY_JOB, "protocol_set": "my-leaky-set"},
            "refuses the job: unknown protocol set '/tmp/evil'": {**TINY_JOB, "protocol_set": "/tmp/evil"},
        }
        _, x_t, labels = tiny_inputs()
        for message, job in bad_jobs.items():
            with pytest.raises(ClusterError, match=message):
                sample_on_cluster(user, "tiny", job, x_t, labels, owner="owner")
    # a user names whose model it samples: another owner's "tiny" is another model (here none)
    with PartyClients(cc.load(config), "user") as user:
        _, x_t, labels = tiny_inputs()
        with pytest.raises(ClusterError, match="has no model 'tiny' of owner-evil"):
            sample_on_cluster(user, "tiny", TINY_JOB, x_t, labels, owner="owner-evil")
    # the policy of "tiny" lists users "user" and "user-bob" only: carol holds a valid certificate, but no right
    with PartyClients(cc.load(config), "user-carol") as carol:
        with pytest.raises(ClusterError, match="no model 'tiny'"):
            carol.call_all("model_info", ModelRef("tiny", "owner"))
        with pytest.raises(ClusterError, match="no model 'tiny'"):  # opening a session tells her no more
            carol.until_done("session_open", SessionOpen("carol-1", "tiny", json.dumps(TINY_JOB), "owner"), "opening")


def test_json_nested_past_the_recursion_limit_is_refused_as_bad_input(tmp_path):
    """A manifest or job nested deeper than Python's parser recurses (10 kB of brackets, within the size caps) is
    refused as malformed, as any bad JSON is, and the party goes on serving (an independent review: it escaped the
    error handling as a RecursionError, an internal error with a traceback in the party's log)."""
    from cipherdm_spu.jobs import parse_job, parse_manifest
    from cipherdm_spu.models import ScheduleConfig

    from .cluster_fixtures import tiny_unet

    nested = '{"overrides": ' + "[" * 5000 + "]" * 5000 + "}"
    model, _, _ = tiny_unet()
    with pytest.raises(ValueError, match="the job is not JSON"):
        parse_job(nested, model, ScheduleConfig())
    with pytest.raises(ValueError, match="not JSON"):
        parse_manifest(nested)
    with _party_in_process(tmp_path, _Catalog()) as service:
        with pytest.raises(PartyError, match="model 'm': bad manifest"):
            service.model_begin(OWNER, ModelBegin("m", nested))
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))


def test_each_owners_model_ids_are_its_own(tmp_path):
    """Model ids are per owner: another owner can neither see, take, delete nor stand in for an owner's model of the
    same id (an independent review: in one namespace an owner learnt which ids were taken, and a model uploaded first
    under an id served the users who meant another owner's), and a user names the owner whose model it samples."""
    with _party_in_process(tmp_path, _Catalog()) as service:
        eve = _owner("owner-eve")
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))
        service.model_begin(eve, ModelBegin("m", json.dumps({"policy": None})))  # no "exists": eve's own "m"
        with pytest.raises(PartyError, match=r"model 'm' exists; delete it \(spu-launch delete\) before uploading"):
            service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))
        assert service.model_seal(OWNER, ModelRef("m")).owner == "owner"
        for method in (service.model_seal, service.model_delete):  # eve reaches only her own
            with pytest.raises(PartyError, match="has no model 'm' owned by owner-eve"):
                method(eve, ModelRef("m", "owner"))
        refusals = []
        for model_id in ("m", "absent"):  # an id another owner holds is refused as one nobody holds
            with pytest.raises(PartyError, match=f"has no model '{model_id}' of owner for owner-eve") as refused:
                service.model_info(eve, ModelRef(model_id, "owner"))
            refusals.append(str(refused.value).replace(f"'{model_id}'", "ID"))
        assert refusals[0] == refusals[1]
        assert service.model_info(eve, ModelRef("m")).owner == "owner-eve"  # unsealed, her own
        assert service.model_info(_user("user"), ModelRef("m", "owner")).owner == "owner"
        for ref in (ModelRef("m"), ModelRef("m", "owner-eve")):  # a user owns nothing; eve's "m" is not sealed
            with pytest.raises(PartyError, match="has no model 'm' of (user|owner-eve) for user"):
                service.model_info(_user("user"), ref)
        with pytest.raises(PartyError, match="has no model 'm' of owner-eve$"):
            service.session_open(_user("user"), SessionOpen("s", "m", "{}", "owner-eve"))
        for bad in ("owner/m", "../owner", ""):
            with pytest.raises(PartyError, match="must be 1-64 letters"):
                service.session_open(_user("user"), SessionOpen("s", "m", "{}", bad))
            with pytest.raises(PartyError, match="must be 1-64 letters"):
                service.model_info(_user("user"), ModelRef(bad, "owner"))
            if bad:  # ("" names the caller's own namespace)
                with pytest.raises(PartyError, match="must be 1-64 letters"):
                    service.model_info(_user("user"), ModelRef("m", bad))
        service.compiler = CompilerProcess("compiler", lambda: _InProcess(stall="program"))
        assert service.session_open(_user("user"), SessionOpen("s", "m", "{}", "owner")).state == "running"
        assert service.session.model_key == "owner/m"
        with pytest.raises(PartyError, match="in use by a session"):
            service.model_delete(OWNER, ModelRef("m"))
        service.model_delete(eve, ModelRef("m"))  # hers is not the session's
        assert set(service.models) == {"owner/m"}


def test_a_client_name_that_is_no_namespace_grants_no_role():
    """A client's certificate name is its models' namespace (an owner) or its name in a policy (a user): a name the
    parties could not take as one ('/' in it, too long, not UTF-8) grants no role (an independent review: such an
    owner could fill slots no user can ever name, and a lenient decoding gives two names one string)."""
    from cipherdm_spu.pki import peer_identity

    def identity(name: bytes):
        return peer_identity({"transport_security_type": [b"ssl"], "x509_common_name": [name]})

    assert identity(b"owner-eve") == ("owner-eve", "owner") and identity(b"user") == ("user", "user")
    for name in (b"owner-a/b", b"owner-" + b"e" * 60, b"owner-\xff", b"owner-\xc3\xa9", b"user-\n"):
        assert identity(name)[1] is None, name


def test_the_policy_bounds_a_jobs_batch_steps_and_public_scales():
    """max_batch and max_steps, and the public scales a job multiplies values computed from the weights by, after the
    input clamp (an independent review: a ControlNet scale of 1e6 would undo the clamp, as huge inputs would)."""
    from cipherdm_spu.plan import MAX_JOB_SCALE, POLICY_FIELDS, JobTerms, Policy

    policy = Policy(max_batch=4, max_steps=10)
    within = JobTerms("spu", 4, 10, "{}", (), guidance_scale=20.0, controlnet_scale=-2.0)
    assert policy.refusal("user", within) is None
    for change, message in ((dict(batch=5), "batch 5 is above the policy's max_batch 4"),
                            (dict(steps=11), "11 steps are above the policy's max_steps 10"),
                            (dict(guidance_scale=1e6), "guidance_scale 1e.06 is above the policy's max_guidance_scale 20"),
                            (dict(controlnet_scale=2.5), "controlnet_scale 2.5 is beyond the policy's max_controlnet_scale 2"),
                            (dict(controlnet_scale=-1e9), "controlnet_scale -1e.09 is beyond")):
        assert re.match(message, policy.refusal("user", dataclasses.replace(within, **change))), change
    assert re.match("guidance_scale nan is above", policy.refusal("user", dataclasses.replace(
        within, guidance_scale=float("nan"))))  # (parse_job refuses it first; the policy does not rely on that)
    owners = Policy.from_dict({"max_guidance_scale": 1, "max_controlnet_scale": 0})
    assert (owners.max_guidance_scale, owners.max_controlnet_scale) == (1.0, 0.0)
    assert Policy.from_dict(owners.to_dict()) == owners and set(owners.to_dict()) == set(POLICY_FIELDS)
    # the strictest policy still serves a job that scales nothing: no guidance, no ControlNet (review of this test)
    assert owners.refusal("user", JobTerms("spu", 1, 1, "{}")) is None
    assert owners.refusal("user", JobTerms("spu", 1, 1, "{}", controlnet_scale=0.0)) is None
    for key, low in (("max_guidance_scale", 1), ("max_controlnet_scale", 0)):
        for bad in (low - 0.5, float("nan"), float("inf"), MAX_JOB_SCALE * 2, True, "5", None):
            with pytest.raises(ValueError, match=f"policy.{key} must be a number in \\[{low}, "):
                Policy.from_dict({key: bad})


def test_a_job_is_capped_before_it_is_parsed_and_a_reason_quoting_it_is_cut_in_the_log(tmp_path, caplog):
    """A job is hundreds of bytes: one of megabytes is refused at once, and a refused job's reason, which may quote
    the job, goes into the party's log cut short (an independent review: a 2 MB job wrote 4 MB to each party's log
    per session_open)."""
    from cipherdm_spu.party import MAX_JOB_BYTES, MAX_LOGGED_CHARS

    class Echoing(_Catalog):
        def terms(self, manifest, job):
            raise ValueError(f"sampler must be one of ddim, got {job!r}")

    with _party_in_process(tmp_path, Echoing()) as service:
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))
        service.model_seal(OWNER, ModelRef("m"))
        with pytest.raises(PartyError, match=f"the job is {MAX_JOB_BYTES + 1} bytes, more than {MAX_JOB_BYTES}"):
            service.session_open(_user("user"), SessionOpen("s", "m", "x" * (MAX_JOB_BYTES + 1), "owner"))
        assert service.session is None
        with caplog.at_level(logging.INFO, logger="cipherdm_spu.party"), pytest.raises(PartyError, match="refuses the job"):
            service.session_open(_user("user"), SessionOpen("s", "m", "\x85" * (MAX_JOB_BYTES // 2), "owner"))  # at the cap
        deadline = time.monotonic() + 30
        while service.session is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert dropped and all(len(line) < MAX_LOGGED_CHARS + 200 for line in dropped), [len(x) for x in dropped]
        assert "characters)" in dropped[-1]


def test_overrides_cannot_bring_kernels_the_owners_policy_does_not_allow():
    """A policy that names protocol sets binds every kernel: a job may not take the named set and swap its kernels
    for another set's (an independent review ran every op of an `spu`-only model on `cipherdm-low-byte`'s)."""
    from cipherdm_spu.jobs import SamplingCatalog, build_manifest
    from cipherdm_spu.plan import Policy

    from .cluster_fixtures import tiny_unet

    model, _, scheduler = tiny_unet()
    policy = Policy.from_dict({"protocol_sets": ["spu"]})
    manifest = build_manifest(model, scheduler, policy)
    catalog = SamplingCatalog()
    plain = {**TINY_JOB, "protocol_set": "spu"}
    assert policy.refusal("user", catalog.terms(manifest, json.dumps(plain))) is None
    swapped = {**plain, "overrides": {op: "cipherdm-low-byte" for op in ("silu", "softmax")}}
    assert "without kernels from elsewhere (overrides of silu, softmax)" in policy.refusal(
        "user", catalog.terms(manifest, json.dumps(swapped)))
    assert Policy().refusal("user", catalog.terms(manifest, json.dumps(swapped))) is None  # no list: any kernels


def test_a_party_takes_only_arithmetic_secret_shares_of_its_ring():
    """A share whose type names the ring but is a public value's (marked secret, padded to size) would have one
    party treat a user's input as public while the others treat it as secret (found by an independent review)."""
    import spu
    import spu.libspu as libspu

    cfg = libspu.RuntimeConfig(protocol=libspu.ProtocolKind.ABY3, field=libspu.FieldType.FM64)
    share = spu.Io(3, cfg).make_shares(np.ones((2, 2), np.float32), libspu.Visibility.VIS_SECRET)[0]
    content = content_of(share.share_chunks)
    check = lambda meta, content=content: _check_share(meta, content, ((2, 2), "float32"))  # noqa: E731
    check(share.meta)  # a real share passes
    forged = libspu.ValueMeta()
    forged.ParseFromString(share.meta)
    forged.storage_type = "Pub2k<FM64>"
    with pytest.raises(PartyError, match=r"must be a secret share \(aby3.AShr<FM64>\)"):
        check(forged.SerializeToString())


def test_a_share_is_its_exact_content_and_only_the_party_cuts_it_into_chunks():
    """SPU 0.9.5's Value::fromProto copies each chunk to its offset before checking the total: chunks from a client,
    a real one then more at offsets past the end, overflowed the worker's buffer (found by an independent attacker
    review, which crashed a party's worker so). Clients now send a share's content; its size must be exact; the
    party cuts the chunks; complex values are refused; lists of a message are capped."""
    import spu
    import spu.libspu as libspu

    from cipherdm_spu.errors import MessageError
    from cipherdm_spu.messages import MAX_LIST_ITEMS, SessionPut

    cfg = libspu.RuntimeConfig(protocol=libspu.ProtocolKind.ABY3, field=libspu.FieldType.FM64)
    share = spu.Io(3, cfg).make_shares(np.arange(6, dtype=np.float32).reshape(2, 3), libspu.Visibility.VIS_SECRET)[0]
    content = content_of(share.share_chunks)
    assert len(content) == 2 * 8 * 6
    checked = _check_share(share.meta, content, ((2, 3), "float32"))
    assert content_of(checked.chunks) == content
    for wrong in (content[:-1], content + b"\0", content + content, b""):
        with pytest.raises(PartyError, match=f"{len(wrong)} bytes of share data, expected 96"):
            _check_share(share.meta, wrong, ((2, 3), "float32"))
    complex_meta = libspu.ValueMeta()
    complex_meta.ParseFromString(share.meta)
    complex_meta.is_complex = True
    with pytest.raises(PartyError, match="complex"):
        _check_share(complex_meta.SerializeToString(), content, ((2, 3), "float32"))
    # the message carries no chunks: a client's chunk list is not even a SessionPut
    crafted = msgpack.packb({"session_id": "s", "slot": "x", "meta": share.meta, "chunks": list(share.share_chunks)})
    with pytest.raises(MessageError, match="fields"):
        SessionPut.decode(crafted)
    # and chunks that do not cover a value in order are refused where a client reads them
    chunks = list(share.share_chunks)
    with pytest.raises(ValueError, match="out of order|announce"):
        content_of(chunks + chunks)
    flood = ModelPut("m", ["w"] * (MAX_LIST_ITEMS + 1), [b""] * (MAX_LIST_ITEMS + 1))
    with pytest.raises(MessageError, match="not a msgpack message"):
        ModelPut.decode(flood.encode())


def _check_share(meta, content, spec):
    """PartyService._check_share of an FM64 ABY3 cluster's party, without a party."""
    import types

    from cipherdm_spu.party import PartyService

    party = types.SimpleNamespace(cluster=types.SimpleNamespace(field="FM64", protocol="ABY3"))
    party._share_bytes = lambda shape: PartyService._share_bytes(party, shape)
    party._check_meta = lambda *args: PartyService._check_meta(party, *args)
    return PartyService._check_share(party, meta, content, spec, "x")


def test_a_protocol_set_cannot_set_secrecy_relevant_runtime_options():
    for option in ({"enable_runtime_snapshot": True}, {"snapshot_dump_dir": "/tmp/x"}, {"public_random_seed": 7},
                   {"enable_pphlo_trace": True}, {"beaver_type": 1}, {"trunc_allow_msb_error": False}):
        with pytest.raises(ProtocolError, match="not settable by a protocol set"):
            registry.register_protocol_set(ProtocolSet("evil", dict(registry.protocol_set("cipherdm").kernels), option))


def test_a_party_refuses_a_program_that_reveals(tmp_path):
    """Defence in depth: even a program its own catalog built is audited before it runs."""
    from cipherdm_spu import SecureSession
    from cipherdm_spu.plan import Step, StepProgram

    with SecureSession("spu") as session:
        leaky = session.compile(lambda x: x * 2.0, np.ones(3, np.float32))
    code = leaky.mlir.replace("-> tensor<3x!pphlo.secret<f32>>", "-> tensor<3xf32>")  # the output in the clear

    class LeakyCatalog(_Catalog):
        def program(self, manifest, job, fraction_bits):
            return StepProgram(code.encode(), "leak", "spu", {}, 1, {"x": ((3,), "float32")}, (),
                               (Step(("slot:x",), (), {}, "x/1"),), "x/1")

    with _party_in_process(tmp_path, LeakyCatalog()) as service:
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))
        service.model_seal(OWNER, ModelRef("m"))
        with pytest.raises(PartyError, match="refuses to run the compiled step"):
            for _ in range(10):
                if service.session_open(_user("user"), SessionOpen("s", "m", "{}", "owner")).state == "done":
                    break
        assert service.session is None


def test_a_refused_compile_cache_is_the_partys_fault_and_its_details_stay_in_its_log(tmp_path, caplog):
    """A party whose compile cache is refused (`compile_cache`: others could change it) tells the user it cannot
    compile, not that the job is refused, and keeps the cache's path and uid in its own log (a review: they reached
    the user)."""
    from cipherdm_spu.errors import CompileCacheError

    class BadCacheCatalog(_Catalog):
        def program(self, manifest, job, fraction_bits):
            raise CompileCacheError("compile cache /home/operator/.cache/x: it is owned by uid 1234, not this user")

    with _party_in_process(tmp_path, BadCacheCatalog()) as service:
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))
        service.model_seal(OWNER, ModelRef("m"))
        with caplog.at_level(logging.ERROR, logger="cipherdm_spu.party"), \
                pytest.raises(PartyError, match="cannot compile: its compile cache is refused") as refused:
            for _ in range(10):
                if service.session_open(_user("user"), SessionOpen("s", "m", "{}", "owner")).state == "done":
                    break
        assert "/home/operator" not in str(refused.value) and "uid 1234" in caplog.text


def test_a_sessions_inputs_count_against_the_share_memory_budget(tmp_path):
    """A user's shares are held beside the models': a job whose inputs need more share memory than is left of the
    party's budget is refused once compiled, before any input arrives (an independent review: uncounted, a job of
    the default policy's largest batch would take tens of GB a party)."""
    from cipherdm_spu import SecureSession
    from cipherdm_spu.plan import Step, StepProgram

    with SecureSession("spu") as session:
        code = session.compile(lambda x: x * 2.0, np.ones(3, np.float32)).mlir.encode()

    class SizedJobs(_Catalog):  # the job names its one input slot's length
        def program(self, manifest, job, fraction_bits):
            return StepProgram(code, "step", "spu", {}, 1, {"x": ((json.loads(job)["elements"],), "float32")}, (),
                               (Step(("slot:x",), (), {}, "x/1"),), "x/1")

    manifest = json.dumps({"policy": None})
    with _party_in_process(tmp_path, SizedJobs(), share_memory=len(manifest) + 16 * 1000) as service:
        service.model_begin(OWNER, ModelBegin("m", manifest))
        service.model_seal(OWNER, ModelRef("m"))

        def open_until_done(session_id, elements):
            for _ in range(50):
                if service.session_open(_user("user"), SessionOpen(session_id, "m", json.dumps(
                        {"elements": elements}), "owner")).state == "done":
                    return True
                time.sleep(0.1)
            return False

        with pytest.raises(PartyError, match="its inputs need .* GiB of share memory, more than the party has free of"):
            open_until_done("s", 1001)
        assert service.session is None
        assert open_until_done("t", 1000)
        # reserved: an upload after the session compiled finds no room left (review: the session's check and an
        # upload's must not both take the same memory)
        with pytest.raises(PartyError, match="needs .* GiB of share memory, more than party P0 has free"):
            service.model_begin(_owner("owner-eve"), ModelBegin("n", json.dumps({"policy": None})))


def test_an_owners_models_cannot_take_the_memory_every_session_needs(tmp_path):
    """An independent attacker held a whole party's share memory with one announced model that it never uploaded,
    kept alive by share-less model_put calls, and every user's session was refused for want of room. Now models,
    sealed or announced, take at most all but 1/SESSION_SHARE_PART of the budget, and a put that carries no tensor is
    refused (it is no progress)."""
    from cipherdm_spu import SecureSession
    from cipherdm_spu.plan import Step, StepProgram

    with SecureSession("spu") as session:
        code = session.compile(lambda x: x * 2.0, np.ones(3, np.float32)).mlir.encode()

    class Sized(_Catalog):  # a manifest names its one tensor's length, a job its one input slot's
        def model_tensors(self, manifest, most):
            elements = json.loads(manifest).get("elements", 0)
            return {"w": ((elements,), "float32")} if elements else {}

        def program(self, manifest, job, fraction_bits):
            return StepProgram(code, "step", "spu", {}, 1, {"x": ((json.loads(job)["elements"],), "float32")}, (),
                               (Step(("slot:x",), (), {}, "x/1"),), "x/1")

    budget = 16 * 8000
    with _party_in_process(tmp_path, Sized(), share_memory=budget) as service:
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))
        service.model_seal(OWNER, ModelRef("m"))
        evil = _owner("owner-evil")
        def hog(free):  # a manifest whose model takes about ``free`` bytes
            return json.dumps({"elements": (free - TENSOR_OVERHEAD_BYTES - 60) // 16, "policy": None})

        with pytest.raises(PartyError, match="'hog' needs .* more than the .* models may take"):  # all that is left
            service.model_begin(evil, ModelBegin("hog", hog(budget - service.models["owner/m"].size)))
        for_models = budget - budget // SESSION_SHARE_PART
        service.model_begin(evil, ModelBegin("hog", hog(for_models - service.models["owner/m"].size)))  # never uploaded
        with pytest.raises(PartyError, match="more than party P0 has free"):
            service.model_begin(evil, ModelBegin("more", json.dumps({"elements": 1, "policy": None})))
        with pytest.raises(PartyError, match="model_put names no tensor"):
            service.model_put(evil, ModelPut("hog", [], []), None)
        for _ in range(50):  # a user's session (1000 elements: 16000 bytes, within the part kept for sessions) opens
            if service.session_open(_user("user"), SessionOpen("s", "m", json.dumps({"elements": 1000}),
                                                               "owner")).state == "done":
                break
            time.sleep(0.1)
        else:
            pytest.fail("the session did not open")


def test_a_session_abandoned_while_it_compiles_is_dropped(tmp_path):
    """A user who opens a session and goes silent must not hold the cluster for a whole compile (up to COMPILE_S):
    here a compile that never ends, given up once the user has been silent for session_idle_s."""
    with _party_in_process(tmp_path, _Catalog(), session_idle_s=2) as service:
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))
        service.model_seal(OWNER, ModelRef("m"))
        for user in ("user", "user-bob"):  # the cluster is free again for the next user
            started = []
            service.compiler = CompilerProcess("compiler", lambda: started.append(_InProcess(stall="program")) or started[-1])
            assert service.session_open(_user(user), SessionOpen(user, "m", "{}", "owner")).state == "running"
            deadline = time.monotonic() + 30
            while service.session is not None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert service.session is None
            # the compile was given up (its compiler process replaced), not waited for
            assert service.jobs.submit(lambda: None).result(timeout=30) is None and len(started) == 2


def test_pinging_a_session_does_not_hold_the_cluster(tmp_path, monkeypatch):
    """Calls that move a session on nothing (an open repeated once compiled, a result asked for early) keep it alive
    only as long as its peers may still be busy: compiling before it starts (OPENING_PROGRESS_S), linking and loading
    after (RUNNING_PROGRESS_S); an independent review held the cluster for ever by re-sending session_open."""
    from cipherdm_spu import party

    monkeypatch.setattr(party, "OPENING_PROGRESS_S", 4.0)
    monkeypatch.setattr(party, "RUNNING_PROGRESS_S", 6.0 - cc.load(write_config(tmp_path / "t.json")).connect_timeout_s)
    with _party_in_process(tmp_path, _Catalog(), session_idle_s=2) as service:
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))
        service.model_seal(OWNER, ModelRef("m"))
        alice = _user("user")
        for started, (least, most) in ((False, (6, 12)), (True, (10, 16))):  # 4 s, then 6 s, of pings every 0.5 s
            with service.lock:  # compiled here, its user waiting for the others to compile (or, started, to load)
                opened = service.session = party._Session("s", "user", "owner/m", time.monotonic(),
                                                          compiled=("program", "", b""))
                if started:
                    opened.program, opened.job_index = types.SimpleNamespace(steps=("step 0",)), 0
            pings = 0
            while service.session is opened and pings < 40:
                assert service.session_open(alice, SessionOpen("s", "m", "{}", "owner")).state == "done"
                with pytest.raises(PartyError, match="released only after" if started else "still opening"):
                    service.session_result(alice, SessionRef("s"))
                pings += 1
                time.sleep(0.5)
            assert service.session is None and least <= pings <= most, (started, pings)


def test_an_ended_session_is_never_opened_again(tmp_path, monkeypatch):
    """A user's open poll still on its way when the user closed the session (stopped while the parties compile), or
    a close that reaches a party before the open does, must not open the session there and hold the party for
    session_idle_s (a review's finding): each user's last ENDED_SESSIONS_PER_USER ended ids are refused."""
    from cipherdm_spu import party
    from cipherdm_spu.party import ENDED_SESSIONS_PER_USER

    monkeypatch.setattr(party, "POLL_S", 0.2)  # an open of a compile that never ends answers "running" sooner
    with _party_in_process(tmp_path, _Catalog()) as service:
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))
        service.model_seal(OWNER, ModelRef("m"))
        service.compiler = CompilerProcess("compiler", lambda: _InProcess(stall="program"))  # opening till it ends
        alice, bob = _user("user"), _user("user-bob")
        open_ = lambda user, session_id: service.session_open(user, SessionOpen(session_id, "m", "{}", "owner"))  # noqa: E731
        # closed while it opened, then an open that was on its way
        open_(alice, "s")
        service.session_close(alice, SessionRef("s"))
        with pytest.raises(PartyError, match=r"session 's' has ended at party P0 \(closed by its user\)"):
            open_(alice, "s")
        assert service.session is None and not service.hello(alice, Empty()).busy
        # a close that overtook its open
        service.session_close(alice, SessionRef("t"))
        with pytest.raises(PartyError, match="session 't' has ended"):
            open_(alice, "t")
        assert service.session is None
        # a session the party dropped (silence, a failed job, shutdown) is ended too
        open_(alice, "u")
        with service.lock:
            service._drop_session("a test")
        with pytest.raises(PartyError, match=r"session 'u' has ended at party P0 \(dropped by the party: its log"):
            open_(alice, "u")
        # another user's close ends nothing of alice's, and her session stays open meanwhile
        service.session_close(bob, SessionRef("v"))
        open_(alice, "v")
        service.session_close(bob, SessionRef("v"))
        assert service.session is not None and service.session.id == "v"
        service.session_close(alice, SessionRef("v"))
        # bounded: a user's closes keep only the newest ids; a malformed id is refused, not kept
        for i in range(ENDED_SESSIONS_PER_USER + 10):
            service.session_close(bob, SessionRef(f"b{i}"))
        kept = list(service.ended_sessions["user-bob"])
        assert kept == [f"b{i}" for i in range(10, ENDED_SESSIONS_PER_USER + 10)]
        with pytest.raises(PartyError, match="must be 1-64"):
            service.session_close(bob, SessionRef("x" * 65))
        assert len(service.ended_sessions["user-bob"]) == ENDED_SESSIONS_PER_USER
        # a new id opens as ever
        assert open_(alice, "w").state == "running"


def test_models_beyond_the_share_memory_budget_are_refused(tmp_path):
    """An owner's manifest decides how much share memory its model takes: a party refuses a model that would take
    more than what is left of its budget (--share-memory-gib), counting models still uploading, before any share."""

    class SizedCatalog(_Catalog):  # the manifest names its one tensor's length
        def model_tensors(self, manifest, most):
            return {"w": ((json.loads(manifest)["elements"],), "float32")}

    # 16 bytes per element (FM64, replicated), TENSOR_OVERHEAD_BYTES per tensor and the manifest's bytes: room for
    # 1000 elements in 2 models of one tensor in the models' part of the budget (all but 1/SESSION_SHARE_PART of it)
    for_models = 16 * 1000 + 2 * (TENSOR_OVERHEAD_BYTES + len(json.dumps({"elements": 600})))
    parts = SESSION_SHARE_PART - 1
    budget = SESSION_SHARE_PART * (for_models // parts) + for_models % parts
    assert budget - budget // SESSION_SHARE_PART == for_models
    with _party_in_process(tmp_path, SizedCatalog(), share_memory=budget) as service:
        other = _owner("owner-eve")
        with pytest.raises(PartyError, match=r"'big' needs \S+ GiB of share memory, more than the \S+ GiB of party P0's "
                                             r"budget that models may take \(1/8 of it is kept for sessions' inputs\)$"
                           ) as refused:
            service.model_begin(OWNER, ModelBegin("big", json.dumps({"elements": 1067})))
        service.model_begin(OWNER, ModelBegin("a", json.dumps({"elements": 600})))  # unsealed: counted all the same
        # what is free is not said (an independent review: another principal's figure would tell the size of a model
        # it may not see, or of a user's job)
        assert str(refused.value).count("GiB") == 2
        with pytest.raises(PartyError, match="'b' needs .* GiB of share memory, more than party P0 has free of the .* "
                                             "GiB models may take of its .* GiB; try again later$") as full:
            service.model_begin(other, ModelBegin("b", json.dumps({"elements": 401})))
        assert str(full.value).count("GiB") == 3  # the size asked, the models' part, the budget: never what is free
        service.model_begin(other, ModelBegin("b", json.dumps({"elements": 400})))
        service.model_delete(OWNER, ModelRef("a"))
        service.model_begin(other, ModelBegin("c", json.dumps({"elements": 600})))
        assert set(service.models) == {"owner-eve/b", "owner-eve/c"}
        # a shape whose element count wraps int64 (2**64 + 1 elements: 1 in int64) is counted in full, and refused
        # (found by an independent review: a negative size would have switched the budget off)
        service.model_delete(other, ModelRef("c"))  # room for its manifest
        with pytest.raises(PartyError, match="would not fit one call"):
            service.model_begin(OWNER, ModelBegin("wrap", json.dumps({"elements": 2**64 + 1})))


def test_calls_receiving_shares_hold_at_most_max_receiving_bytes(tmp_path, monkeypatch):
    """A call's shares are held whole until checked, so the calls receiving hold at most MAX_RECEIVING_BYTES together
    (here 200 bytes: each 8-element tensor's share takes 128): a model with a larger tensor is refused with its
    manifest, a header naming more before any share arrives, and a call while others hold too much is told to try
    again."""
    from cipherdm_spu import party

    class TwoTensors(_Catalog):
        def model_tensors(self, manifest, most):
            return {name: ((json.loads(manifest)["elements"],), "float32") for name in ("a", "b")}

    monkeypatch.setattr(party, "MAX_RECEIVING_BYTES", 200)
    share = spu_shares(np.zeros(8, np.float32))[0]
    meta, content = share.meta, content_of(share.share_chunks)
    with _party_in_process(tmp_path, TwoTensors()) as service:
        with pytest.raises(PartyError, match="the shares of a, b would not fit one call"):
            service.model_begin(OWNER, ModelBegin("big", json.dumps({"elements": 13})))
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"elements": 8})))
        with pytest.raises(PartyError, match="the shares named take 256 bytes, more than one call may carry"):
            service.model_put(OWNER, ModelPut("m", ["a", "b"], [meta, meta]), iter(()))
        go = threading.Event()

        def slow():
            go.wait(30)
            yield content

        first = threading.Thread(target=service.model_put, args=(OWNER, ModelPut("m", ["a"], [meta]), slow()))
        first.start()
        deadline = time.monotonic() + 30
        while service.receiving_bytes["model_put"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(PartyError, match="receiving other calls' shares; with this call's 128 bytes they would "
                                             "pass 200: try again shortly$"):
            service.model_put(OWNER, ModelPut("m", ["b"], [meta]), iter([content]))
        go.set()
        first.join(30)
        assert service.receiving_bytes["model_put"] == 0 and set(service.models["owner/m"].shares) == {"a"}
        service.model_put(OWNER, ModelPut("m", ["b"], [meta]), iter([content]))
        assert set(service.models["owner/m"].shares) == {"a", "b"} and not service.models["owner/m"].receiving


def test_an_upload_kept_busy_is_dropped_when_not_sealed_in_time(tmp_path, monkeypatch, caplog):
    """Calls keep an unsealed model from counting as silent, not from UNSEALED_S (here two seconds): a call still
    receiving its shares (an independent review's finding: then, no-op puts every half second) does not hold its share
    memory for ever; it is cancelled, its room given back. (A put that names no tensor is refused outright now.)"""
    from cipherdm_spu import party

    class Stalled:  # a call receiving a share that never comes, until the party cancels it (as `_ShareParts`)
        def __init__(self):
            self.cancelled = threading.Event()

        def __iter__(self):
            return self

        def __next__(self):
            self.cancelled.wait(60)
            raise PartyError("cancelled")

        def cancel(self):
            self.cancelled.set()

    class OneTensor(_Catalog):
        def model_tensors(self, manifest, most):
            return {"a": ((8,), "float32")}

    monkeypatch.setattr(party, "UNSEALED_S", 2.0)
    meta = spu_shares(np.zeros(8, np.float32))[0].meta
    stalled, failed = Stalled(), []
    with caplog.at_level(logging.INFO, logger="cipherdm_spu.party"), \
            _party_in_process(tmp_path, OneTensor(), session_idle_s=60) as service:
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))

        def receive():
            try:
                service.model_put(OWNER, ModelPut("m", ["a"], [meta]), stalled)
            except PartyError as e:
                failed.append(str(e))

        receiving = threading.Thread(target=receive)
        receiving.start()
        for _ in range(120):  # (a call receiving shares keeps it from silence: only UNSEALED_S ends it)
            with service.lock:
                if "owner/m" not in service.models:
                    break
            time.sleep(0.5)
        receiving.join(60)
        assert "owner/m" not in service.models and stalled.cancelled.is_set() and failed == ["cancelled"]
        assert service.receiving_bytes["model_put"] == 0
    assert "unsealed model owner/m dropped: not sealed 2 s after it began" in caplog.text


def test_an_input_that_never_arrives_does_not_hold_the_cluster(tmp_path, monkeypatch, caplog):
    """A call receiving a session's input keeps the session from counting as silent, never from the limit on moving it
    on: a user who keeps stalled input calls open one after another (an independent review's finding) is dropped
    after RUNNING_PROGRESS_S, not after session_idle_s, and the calls are cancelled."""
    from cipherdm_spu import party

    monkeypatch.setattr(party, "RUNNING_PROGRESS_S", 6.0 - cc.load(write_config(tmp_path / "t.json")).connect_timeout_s)

    class Stalled:  # a call still receiving: `_ShareParts.cancel` ends it
        cancelled = 0

        def cancel(self):
            self.cancelled += 1

    stalled = Stalled()
    with caplog.at_level(logging.INFO, logger="cipherdm_spu.party"), \
            _party_in_process(tmp_path, _Catalog(), session_idle_s=2) as service:
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))
        service.model_seal(OWNER, ModelRef("m"))
        with service.lock:
            opened = service.session = party._Session("s", "user", "owner/m", time.monotonic(), compiled=("program", "", b""))
            opened.program, opened.job_index = types.SimpleNamespace(steps=("step 0",)), 0
            opened.receiving["x"] = stalled
        deadline = time.monotonic() + 60
        while service.session is opened and time.monotonic() < deadline:
            time.sleep(0.2)
        assert service.session is None and stalled.cancelled == 1
    assert "session s dropped: user did not move it on for 6 s" in caplog.text, caplog.text


def test_a_padded_manifest_is_refused_and_a_manifest_counts_against_the_budget(tmp_path):
    """A manifest is kilobytes: one padded to fill a party's memory is refused before it is parsed (an independent
    review held 200 MB manifests outside the share-memory budget), and what a party keeps of it is counted."""
    with _party_in_process(tmp_path, _Catalog(), share_memory=1 << 20) as service:
        padded = json.dumps({"policy": None, "config": {"_pad": "A" * MAX_MANIFEST_BYTES}})
        with pytest.raises(PartyError, match=f"its manifest is {len(padded)} bytes, more than {MAX_MANIFEST_BYTES}"):
            service.model_begin(OWNER, ModelBegin("m", padded))
        assert not service.models
        small = json.dumps({"policy": None, "config": {"_pad": "A" * 1000}})
        service.model_begin(OWNER, ModelBegin("m", small))  # a model of no tensors: its manifest alone is counted
        assert service.models["owner/m"].size == len(small)
        with pytest.raises(PartyError, match="needs .* of share memory"):
            service.model_begin(_owner("owner-eve"), ModelBegin("n", json.dumps({"policy": None, "config": {
                "_pad": "A" * (MAX_MANIFEST_BYTES - 100)}})))  # within the cap, beyond what is left of the budget


def test_an_owners_manifest_cannot_break_a_users_compile(tmp_path, monkeypatch):
    """Manifests are judged in a process of their own: an owner whose manifest overruns its deadline (its judge
    killed) leaves a user's compile in progress untouched (an independent review: with one shared compiler process,
    the owner's overrun killed the user's compile)."""
    from cipherdm_spu import party

    monkeypatch.setattr(party, "JUDGE_S", 2.0)
    with _party_in_process(tmp_path, _Catalog()) as service:
        service.model_begin(OWNER, ModelBegin("m", json.dumps({"policy": None})))
        service.model_seal(OWNER, ModelRef("m"))
        compilers, judges = [], []
        service.compiler = CompilerProcess("compiler", lambda: compilers.append(_InProcess(stall="program")) or compilers[-1])
        service.judge = CompilerProcess("judge", lambda: judges.append(_InProcess(stall="model_tensors")) or judges[-1])
        assert service.session_open(_user("user"), SessionOpen("s", "m", "{}", "owner")).state == "running"  # compiling
        with pytest.raises(PartyError, match="judge: the job took more than 2 s"):
            service.model_begin(_owner("owner-mallory"), ModelBegin("slow", json.dumps({"policy": None})))
        assert len(judges) == 2 and len(compilers) == 1  # the judge was restarted, the user's compiler not
        assert service.session is not None and service.session.job is not None and not service.session.job.done()
        service.session_close(_user("user"), SessionRef("s"))


def _owner(name):
    from cipherdm_spu.party import Caller

    return Caller(name, "owner")


def _user(name):
    from cipherdm_spu.party import Caller

    return Caller(name, "user")


OWNER = _owner("owner")


class _Catalog:
    """A party's catalog for the in-process tests: models of no tensors, any job; tests override what they probe."""

    def model_tensors(self, manifest, most):
        return {}

    def terms(self, manifest, job):
        from cipherdm_spu.plan import JobTerms

        return JobTerms("spu", 1, 1, job)

    def program(self, manifest, job, fraction_bits):
        raise AssertionError("not compiled in this test")


@contextlib.contextmanager
def _party_in_process(tmp_path, catalog, share_memory=1 << 30, **timeouts):
    """P0's control service in this process, on ``catalog``, its compiler a stand-in (`_InProcess`)."""
    from cipherdm_spu.party import PartyService

    config = write_config(tmp_path / "3pc.json", **timeouts)
    make_certs(config)
    cluster = cc.load(config)
    service = PartyService(cluster, cluster.parties[0], catalog, tmp_path / "spu.log", share_memory)
    service.judge.close()
    service.compiler.close()
    service.judge, service.compiler = CompilerProcess("judge", _InProcess), CompilerProcess("compiler", _InProcess)
    try:
        yield service
    finally:
        service.shutdown()


class _InProcess:
    """A stand-in for the party's compiler process (the tests' catalogs are defined in them): runs a job at once,
    except one of the catalog method named ``stall``, which never finishes."""

    def __init__(self, stall: str = ""):
        self.stall = stall

    def submit(self, fn, *args):
        import concurrent.futures as cf

        future = cf.Future()
        if fn.__name__ != self.stall:
            future.set_result(fn(*args))
        return future

    def shutdown(self, **kwargs):
        pass


def test_log_files_are_private_and_symlinks_are_refused(tmp_path):
    path = private_log_file(tmp_path / "logs", "party-P0.log")
    assert oct(path.stat().st_mode & 0o777) == oct(0o600) and oct((tmp_path / "logs").stat().st_mode & 0o777) == oct(0o700)
    (tmp_path / "target").write_text("")
    (tmp_path / "logs" / "evil.log").symlink_to(tmp_path / "target")
    path = private_log_file(tmp_path / "logs", "evil.log")  # the symlink is moved aside, never followed
    (aside,) = (tmp_path / "logs").glob("evil.log.moved-*")
    assert not path.is_symlink() and aside.is_symlink()
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(PartyError, match="has mode 777: others may write it"):
        private_log_file(shared, "party-P0.log")


def test_a_log_folder_under_a_folder_others_can_write_is_refused_before_anything_is_written(tmp_path):
    """The weakness the compile cache's first review found, in the party's log folder: only the folder itself was
    checked, by path, and the folders made above it followed the umask. Whoever can write a folder above can swap
    the log folder for its own between the check and SPU's open of its log by path, and read what a party logs."""
    above = tmp_path / "open"
    above.mkdir()
    above.chmod(0o777)
    with pytest.raises(PartyError, match=f"{above} on its path has mode 777"):
        private_log_file(above / "cluster" / "logs", "party-P0.log")
    assert not (above / "cluster").exists()
    old = os.umask(0)
    try:
        above.chmod(0o1777)  # sticky, as /tmp: others cannot swap what is this user's
        private_log_file(above / "cluster" / "logs", "party-P0.log")
    finally:
        os.umask(old)
    assert [stat.S_IMODE((above / p).stat().st_mode) for p in ("cluster", "cluster/logs")] == [0o700, 0o700]


def test_a_log_is_opened_by_the_path_that_was_checked(tmp_path):
    """An independent review's attack: ``--log-dir S/link/../logs``, S sticky and the link this user's, was checked
    where the kernel walks it (the link's target's parent), but Python's logging drops ``..`` by text and wrote to
    S/logs, a folder another user had made there. The log's real path is what the party opens."""
    from cipherdm_spu.party import _PrivateRotatingFileHandler

    sticky, home = tmp_path / "sticky", tmp_path / "home"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (home / "private").mkdir(parents=True, mode=0o700)
    (sticky / "link").symlink_to(home / "private")
    (sticky / "logs").mkdir()
    (sticky / "logs").chmod(0o777)  # theirs
    path = private_log_file(sticky / "link" / ".." / "logs", "party-P0.log")
    assert path == home / "logs" / "party-P0.log"
    handler = _PrivateRotatingFileHandler(path, maxBytes=1000, backupCount=1)
    try:
        assert handler.baseFilename == str(home / "logs" / "party-P0.log")
    finally:
        handler.close()
    assert not list((sticky / "logs").iterdir())


def test_the_spu_log_is_a_file_of_this_users_alone_in_a_private_folder(tmp_path, monkeypatch):
    """SPU opens its log by path (a session's ``log_file``, a script's ``--out/spu.log``, ``CIPHERDM_SPU_LOG``): a
    folder above that others can write is refused, a symlink of another user's on the path too (a review had a
    session's log follow one into the user's .bashrc: the path was resolved before it was checked), and a log file
    someone left (here a hard link to a file elsewhere) is moved aside, never written."""
    from cipherdm_spu import SecureSession
    from cipherdm_spu.errors import PrivatePathError
    from cipherdm_spu.profiling import SpuLog

    above = tmp_path / "open"
    above.mkdir()
    above.chmod(0o777)
    with pytest.raises(PrivatePathError, match="on its path has mode 777"):
        SpuLog.get(above / "out" / "spu.log")
    with monkeypatch.context() as m:  # (restored at once: SPU's log stays where the process's SpuLog says)
        m.setattr(SpuLog, "_instance", None)
        m.setenv("CIPHERDM_SPU_LOG", str(above / "spu.log"))
        with pytest.raises(PrivatePathError, match="has mode 777: others may write it"):
            SpuLog.get()
    if os.getuid() == 0:
        sticky, home = tmp_path / "sticky", tmp_path / "home"
        sticky.mkdir()
        sticky.chmod(0o1777)
        home.mkdir(mode=0o700)
        (home / ".bashrc").write_text("")
        (sticky / "spu.log").symlink_to(home / ".bashrc")
        os.lchown(sticky / "spu.log", 65534, 65534)
        with pytest.raises(PrivatePathError, match="sticky has mode 1777: others may write it"):
            SecureSession("spu", log_file=str(sticky / "spu.log"))  # a log's own folder is this user's alone
        (sticky / "link").symlink_to(home)
        os.lchown(sticky / "link", 65534, 65534)
        with pytest.raises(PrivatePathError, match="link on its path is a symlink owned by uid 65534"):
            SecureSession("spu", log_file=str(sticky / "link" / ".bashrc"))
        assert (home / ".bashrc").read_text() == ""
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    (tmp_path / "theirs.log").write_text("")
    os.link(tmp_path / "theirs.log", out / "spu.log")
    with SecureSession("spu", log_file=str(out / "spu.log")) as session:
        session.run(lambda v: v + 1.0, np.ones(2, np.float32))
    assert (tmp_path / "theirs.log").read_text() == "" and (out / "spu.log").stat().st_nlink == 1


@pytest.mark.skipif(os.getuid() != 0, reason="a symlink of another user's needs root to make")
def test_a_log_folder_reached_through_another_users_symlink_is_refused(tmp_path):
    sticky, mine = tmp_path / "sticky", tmp_path / "mine"
    sticky.mkdir()
    sticky.chmod(0o1777)
    mine.mkdir(mode=0o700)
    (sticky / "logs").symlink_to(mine)
    os.lchown(sticky / "logs", 65534, 65534)  # theirs: they may point it elsewhere between a check and SPU's open
    with pytest.raises(PartyError, match="is a symlink owned by uid 65534"):
        private_log_file(sticky / "logs", "party-P0.log")
    assert not list(mine.iterdir())


def test_an_output_folder_others_could_change_is_refused_and_ones_own_closed(tmp_path):
    """The image is written into --out by path: no one else may be able to change the folder or one above it."""
    from cipherdm_spu.cli_common import private_output_dir
    from cipherdm_spu.errors import UsageError

    above = tmp_path / "open"
    above.mkdir()
    above.chmod(0o777)
    with pytest.raises(UsageError, match=f"{above} on its path has mode 777"):
        private_output_dir(above / "run")
    assert not (above / "run").exists()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o707)
    with pytest.raises(UsageError, match="has mode 707: others may write it"):
        private_output_dir(shared)
    mine = tmp_path / "mine"
    mine.mkdir()
    mine.chmod(0o755)  # others may list an existing folder (never read what is written there: 0600), as before
    assert private_output_dir(mine) == mine and stat.S_IMODE(mine.stat().st_mode) == 0o755
    assert stat.S_IMODE(private_output_dir(tmp_path / "new" / "run").stat().st_mode) == 0o700
    from cipherdm_spu.cli_common import write_json

    (mine / "report.json").mkdir()  # left where the result goes, in a folder once open to others
    write_json(mine / "report.json", {"secret": 1})
    assert json.loads((mine / "report.json").read_text()) == {"secret": 1}
    assert stat.S_IMODE((mine / "report.json").stat().st_mode) == 0o600 and len(list(mine.glob("report.json.moved-*"))) == 1


def test_user_inputs_are_refused_beyond_the_fixed_point_range():
    from cipherdm_spu import InputError, SecureSession

    with SecureSession("spu") as session:
        with pytest.raises(InputError, match="beyond"):
            session.share(np.array([2e13], np.float32))
        session.share(np.array([1.7e13], np.float32))  # within the range: shared


def test_an_embedded_session_leaves_no_log_behind(tmp_path):
    script = ("from cipherdm_spu.profiling import SpuLog; from cipherdm_spu import SecureSession; import numpy as np\n"
              "with SecureSession('spu') as s: s.run(lambda x: x * 2.0, np.ones(2, np.float32))\n"
              "print(SpuLog.get().path)")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CIPHERDM_SPU_LOG"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    log = Path(result.stdout.strip().splitlines()[-1])
    assert log.name == "spu.log" and not log.parent.exists()


def test_the_parties_refuse_a_session_they_were_told_different_things_about(cluster):
    """Two clients that each describe one session to different parties (here: alice to P0, bob to P1 and P2, one
    session id) are refused by all three, over the SPU link, before any share of one meets another's. (Another
    session id per party already fails to form a link: SPU's link keys carry the session id.)"""
    config, _ = cluster
    job = json.dumps(TINY_JOB, sort_keys=True)
    request = SessionOpen("mixed", "tiny", job, "owner")
    with PartyClients(cc.load(config), "user") as alice, PartyClients(cc.load(config), "user-bob") as bob:
        callers = [alice, bob, bob]
        try:
            with pytest.raises(grpc.RpcError) as info:
                for method, message in (("session_open", request), ("session_start", SessionRef("mixed"))):
                    for _ in range(200):
                        futures = [c._pool.submit(c.call, rank, method, message) for rank, c in enumerate(callers)]
                        if all(f.result().state == "done" for f in futures):
                            break
            assert "disagree about this session" in info.value.details()
        finally:
            for rank, c in enumerate(callers):
                c.call(rank, "session_close", SessionRef("mixed"))


def test_the_parties_refuse_a_session_one_of_them_would_run_with_other_runtime_options(tmp_path):
    """A party whose operator shadowed a protocol set (`CIPHERDM_PROTOCOLS_PATH`: the same kernels, so the same
    executable, but another SPU runtime option) is not run beside the others: the runtime configuration is part of
    what the three parties agree on over the SPU link, so all three refuse before any share of one meets another's
    (found by an independent review: the executables' digests alone matched, and mismatched runtimes would have run)."""
    import os

    from cipherdm_spu.jobs import upload_model
    from cipherdm_spu.plan import Policy

    from .cluster_fixtures import start, stop, tiny_unet, wait_up

    shadow = tmp_path / "protocols"
    shadow.mkdir()
    spec = json.loads((Path(__file__).resolve().parent.parent / "configs/protocols/spu.json").read_text())
    (shadow / "spu.json").write_text(json.dumps({**spec, "runtime": {"fxp_exp_mode": "EXP_PADE"}}))
    config = write_config(tmp_path / "3pc.json")
    make_certs(config)
    shadowed = {**os.environ, "CIPHERDM_PROTOCOLS_PATH": str(shadow)}
    procs = [start(config, tmp_path / "logs", party=p, env=shadowed if p == "P2" else None) for p in ("P0", "P1", "P2")]
    try:
        wait_up(config, procs)
        model, params, scheduler = tiny_unet()
        with PartyClients(cc.load(config), "owner") as owner:
            upload_model(owner, "tiny", model, params, scheduler, Policy())
        _, x_t, labels = tiny_inputs()
        with PartyClients(cc.load(config), "user") as user:
            with pytest.raises(ClusterError, match="disagree about this session") as refused:
                sample_on_cluster(user, "tiny", {**TINY_JOB, "protocol_set": "spu"}, x_t, labels, owner="owner")
            assert "P2 was asked for something else" in str(refused.value) or "P0, P1" in str(refused.value)
    finally:
        stop(procs)


def test_an_owner_has_a_quota_and_silent_uploads_expire(cluster):
    config, _ = cluster
    with PartyClients(cc.load(config), "owner") as owner:
        manifest = owner.call(0, "model_info", ModelRef("tiny")).manifest
        held = {"tiny"}
        try:
            for i in range(4):
                try:
                    owner.call_all("model_begin", ModelBegin(f"quota-{i}", manifest))
                    held.add(f"quota-{i}")
                except ClusterError as e:
                    assert "holds 4 models" in str(e)
                    break
            else:
                pytest.fail("the per-owner quota never refused an upload")
            # a share of the wrong size is refused, whatever its meta says, and no more of it read than expected
            name = "w/params/conv_in/bias"  # (8,) in the tiny UNet
            good = spu_shares(np.zeros(8, np.float32))
            put = ModelPut("quota-0", [name], [good[0].meta])
            assert "a part of 1048576 bytes after 0 of the 128 expected" in _details(
                lambda: owner.call(0, "model_put", put, contents=[bytes(1 << 20)]))
            # two calls sending the same tensor: one is refused, whichever the party took first
            _one_of_two_uploads_of_a_tensor_is_refused(owner, put, content_of(good[0].share_chunks))
            # a model deleted while its shares arrive: the call receiving them is cancelled, not left holding them
            stop = threading.Event()

            def stalled():
                yield ModelPut("quota-1", [name], [good[0].meta]).encode()
                stop.wait(60)
                yield from ()

            receiving = owner._channels[0].stream_unary(METHODS["model_put"].path).future(stalled(), timeout=60)
            try:
                for _ in range(100):  # (until the party has taken its header: a header-only probe is refused so)
                    time.sleep(0.2)
                    if "being uploaded by another call" in _details(lambda: owner.call(
                            0, "model_put", ModelPut("quota-1", [name], [good[0].meta]))):
                        break
                owner.call(0, "model_delete", ModelRef("quota-1"))
                with pytest.raises(grpc.RpcError) as info:
                    receiving.result()
            finally:
                stop.set()
            assert info.value.code() == grpc.StatusCode.CANCELLED, info.value.details()
            # silent unsealed uploads are dropped after session_idle_s
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    owner.call(0, "model_info", ModelRef("quota-0"))
                except grpc.RpcError:
                    break
                time.sleep(1)
            assert "no model 'quota-0'" in _details(lambda: owner.call(0, "model_info", ModelRef("quota-0")))
        finally:
            for model_id in held - {"tiny"}:
                for rank in range(3):
                    try:
                        owner.call(rank, "model_delete", ModelRef(model_id))
                    except grpc.RpcError:
                        pass  # already expired


def _one_of_two_uploads_of_a_tensor_is_refused(owner, put, content):
    """A first call sends its header and waits before its share's content; a second sends the same tensor whole."""
    go = threading.Event()

    def slow():
        yield put.encode()
        go.wait(30)
        yield SharePart(content).encode()

    first = owner._channels[0].stream_unary(METHODS["model_put"].path).future(slow(), timeout=60)
    time.sleep(1)  # (either order is checked: the party takes the first header before the second, or after)
    outcomes = []
    try:
        owner.call(0, "model_put", put, contents=[content])
        outcomes.append("accepted")
    except grpc.RpcError as e:
        outcomes.append(e.details())
    go.set()
    try:
        first.result()
        outcomes.append("accepted")
    except grpc.RpcError as e:
        outcomes.append(e.details())
    accepted, refused_one = sorted(outcomes)
    assert accepted == "accepted", outcomes
    # the second call while the first receives (the usual order), or the first once the second completed
    assert re.search("is being uploaded by another call|was already uploaded", refused_one), outcomes


def spu_shares(array):
    import spu
    import spu.libspu as libspu

    io = spu.Io(3, libspu.RuntimeConfig(protocol=libspu.ProtocolKind.ABY3, field=libspu.FieldType.FM64,
                                        fxp_fraction_bits=18))
    return io.make_shares(array, libspu.Visibility.VIS_SECRET)


def test_a_partys_compiler_process_ends_with_the_party():
    """A killed party leaves no process behind (its compiler would otherwise hold memory and CPU)."""
    import os
    import signal
    import subprocess
    import sys

    code = ("import time\nfrom cipherdm_spu.compiler_process import _spawned_pool\n"
            "print(_spawned_pool().submit(__import__('os').getpid).result(), flush=True)\ntime.sleep(60)\n")
    party = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    compiler = int(party.stdout.readline())
    os.kill(party.pid, signal.SIGKILL)
    party.wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{compiler}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{compiler}").exists() or "Z" in Path(f"/proc/{compiler}/status").read_text().split("State:")[1][:4]


def test_no_party_imports_from_the_folder_it_was_started_in(tmp_path):
    """A pickle.py that another local user left in the folder the parties were started in (a sticky /tmp takes
    anyone's new files) ran inside each party's compiler and multiprocessing helper, with the party's shares and key
    (an independent review's finding): spu-launch, the parties it starts, one started alone, and the processes they
    spawn leave that folder off their import path."""
    from cipherdm_spu.jobs import upload_model
    from cipherdm_spu.plan import Policy

    from .cluster_fixtures import output, stop, tiny_unet, wait_up

    config = write_config(tmp_path / "3pc.json")
    make_certs(config)
    planted, marker = tmp_path / "planted", tmp_path / "imported"
    planted.mkdir()
    (planted / "pickle.py").write_text(  # notes who imported it, then hands over the real pickle: nothing fails
        f"import os, sys\nwith open({str(marker)!r}, 'a') as f:\n    f.write(f'{{os.getpid()}} {{sys.argv}}\\n')\n"
        "here = os.path.dirname(os.path.abspath(__file__))\n"
        "sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != here]\n"
        "del sys.modules['pickle']\nimport pickle\nsys.modules['pickle'] = pickle\n")
    spu_launch = str(Path(sys.executable).parent / "spu-launch")

    def launch(*extra):
        out = open(tmp_path / f"launcher{len(extra)}.out", "w")
        proc = subprocess.Popen([spu_launch, "--config", str(config), "--log-dir", str(tmp_path / "logs"), *extra],
                                cwd=planted, stdout=out, stderr=subprocess.STDOUT, text=True)
        proc.output_path = out.name
        return proc

    launcher = launch()
    try:
        wait_up(config, [launcher])
        model, params, scheduler = tiny_unet()
        with PartyClients(cc.load(config), "owner") as owner:  # each party's manifest judge: a spawned process
            upload_model(owner, "tiny", model, params, scheduler, Policy())
    finally:
        stop([launcher])
    alone = launch("--party", "P0")
    try:
        deadline = time.monotonic() + 60
        while "party P0 ready" not in output(alone) and alone.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "party P0 ready" in output(alone), output(alone)
    finally:
        stop([alone])
    assert not marker.exists(), marker.read_text()


def test_a_party_refuses_protocol_sets_others_could_change_or_add(tmp_path, capsys, monkeypatch):
    """Protocol sets are looked up by name, first folder first: a set file another user could write or add (a sticky
    folder takes anyone's new files) would choose the kernels and SPU options of every session (an independent
    review's finding). A party refuses to start on one."""
    from cipherdm_spu.cluster import main as launch_main

    config = write_config(tmp_path / "3pc.json")
    make_certs(config)
    sets = tmp_path / "sets"
    sets.mkdir()
    monkeypatch.setenv("CIPHERDM_PROTOCOLS_PATH", str(sets))
    start = ["--config", str(config), "--party", "P0", "--log-dir", str(tmp_path / "logs")]
    for mode in (0o1777, 0o777):  # sticky, or open to all
        sets.chmod(mode)
        assert launch_main(start) == 2
        err = capsys.readouterr().err
        assert f"protocol sets in {sets}" in err and f"has mode {mode:o}: others may add files to it" in err, err
    sets.chmod(0o755)
    (sets / "mine.json").write_text("{}")
    (sets / "mine.json").chmod(0o666)
    assert launch_main(start) == 2
    assert "mine.json has mode 666: others may write it" in capsys.readouterr().err
    # a folder named that does not exist yet: someone else could make it (under a sticky /tmp, say) after the start
    monkeypatch.setenv("CIPHERDM_PROTOCOLS_PATH", str(tmp_path / "later"))
    assert launch_main(start) == 2
    assert "later: it does not exist" in capsys.readouterr().err


def test_a_party_refuses_to_start_on_an_import_path_or_a_tmpdir_others_could_change(tmp_path, capsys, monkeypatch):
    """-P and PYTHONSAFEPATH still honour a PYTHONPATH entry that is empty or relative (the current folder, or one under
    it), and a session's SPU link socket goes under TMPDIR (an independent review's findings): refused at the start,
    not at the first session."""
    import tempfile

    from cipherdm_spu.cluster import main as launch_main

    config = write_config(tmp_path / "3pc.json")
    make_certs(config)
    start = ["--config", str(config), "--party", "P0", "--log-dir", str(tmp_path / "logs")]
    for entries in (f":{tmp_path}", f"{tmp_path}:", "lib"):
        monkeypatch.setenv("PYTHONPATH", entries)
        assert launch_main(start) == 2
        assert "PYTHONPATH has entries" in capsys.readouterr().err
        assert launch_main(start[:2]) == 2  # the launcher of the local parties too
        assert "PYTHONPATH has entries" in capsys.readouterr().err
    monkeypatch.delenv("PYTHONPATH")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    assert launch_main(start) == 2
    err = capsys.readouterr().err
    assert f"its SPU link's socket folder under {shared}" in err and "not sticky" in err, err
    assert [p.name for p in shared.iterdir()] == []
