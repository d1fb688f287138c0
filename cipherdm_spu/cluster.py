"""spu-launch: the cluster's command line: certificates, parties, status, and the owner's models (upload, info,
delete).

    spu-launch --config configs/3pc.json certs        # a development PKI where the config expects it
    spu-launch --config configs/3pc.json              # every party whose host is this machine
    spu-launch --config configs/3pc.json --party P2   # one party (on its own host)
    spu-launch --config configs/3pc.json status       # which parties are up (as client "user")
    spu-launch --config configs/3pc.json upload --model checkpoints/mnist-ddpm-silu --model-id mnist-silu
                                                      # the model owner shares its model (as "owner")
    spu-launch --config configs/3pc.json info --model-id mnist-silu    # what each party holds under that id
    spu-launch --config configs/3pc.json delete --model-id mnist-silu  # the owner deletes its model

Each party is its own OS process (see `cipherdm_spu.party`). Started together, the launcher supervises
them: Ctrl-C or SIGTERM stops all of them cleanly; a party that fails to start stops the others; a
party that dies later is reported and the others keep serving. Users sample with
`scripts/run_ddim.py --cluster CONFIG --model-id ID --model-owner OWNER` (or run_ddpm.py, run_sd.py): each
owner's model ids are its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from tqdm import tqdm

from . import cluster_config
from .child_python import check_python_path, module_command, safe_import_path
from .client import PartyClients, require_role
from .cluster_config import ClusterConfig
from .console import printable, warning_line
from .errors import ClusterConfigError, ClusterError, InputError, PartyError
from .messages import ModelRef
from .models import ConfigError
from .models.schedulers import SchedulerConfigError
from .netem import Link, LinkEmulator
from .plan import NAME, Policy

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
    p.add_argument("command", nargs="?", choices=["start", "status", "certs", "upload", "info", "delete"],
                   default="start",
                   help="start parties (default), report which are up, make development certificates, upload a model "
                        "as its owner, report what each party holds under a model id (owner or user), or delete a "
                        "model as its owner")
    p.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG), help=f"cluster config (default: {DEFAULT_CONFIG})")
    p.add_argument("--party", help="start: only this party (its id in the config)")
    p.add_argument("--share-memory-gib", type=_positive_gib, default=None, metavar="GIB",
                   help="start: the most memory the models' shares and a session's input shares may take in each "
                        "party, all together; an upload or a session beyond it is refused. A session holds its model's "
                        "shares a second time, in its SPU runtime (default: a quarter of this machine's memory)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="start: a private folder for the parties' SPU logs (default: a new temporary folder, 0700)")
    p.add_argument("--as", dest="identity", default=None,
                   help="status/upload/info/delete: the client identity in tls.clients (default: user for status, "
                        "owner for the others)")
    p.add_argument("--clients", default="owner,user",
                   help="certs: the client identities to make certificates for (default: owner,user)")
    p.add_argument("--model", type=Path, help="upload: a local diffusers model directory (or a pipeline with unet/)")
    p.add_argument("--model-id", help="upload: the id users will sample with, in this owner's own namespace (users "
                                      "name the owner too: --model-owner); info/delete: the model's id")
    p.add_argument("--model-owner", default=None, metavar="OWNER",
                   help="info: whose model --model-id is, its owner's certificate name (an owner's own by default; "
                        "a user names it)")
    p.add_argument("--controlnet", type=Path, default=None, metavar="DIR",
                   help="upload: a local diffusers ControlNetModel directory, uploaded with the Stable Diffusion UNet "
                        "of --model as one model (users then pass --control-image)")
    p.add_argument("--policy", type=Path, default=None,
                   help="upload: a JSON policy file {users, protocol_sets, max_batch, max_steps, input_bound, "
                        "max_guidance_scale, max_controlnet_scale} (default: any user, any installed protocol set, "
                        "batch <= 64, steps <= 1000, every secret input of a step clamped to [-256, 256], guidance "
                        "scale <= 20, |ControlNet scale| <= 2)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cluster = cluster_config.load(args.config)
        if args.command == "status":
            return status(cluster, args.identity or "user")
        if args.command == "certs":
            from .pki import make_development_pki

            written = make_development_pki(cluster, [c.strip() for c in args.clients.split(",") if c.strip()])
            print(f"wrote {len(written)} files (keys 0600) under {written[0].parent}; the CAs' keys are not kept")
            return 0
        if args.command == "upload":
            return upload(cluster, args)
        if args.command in ("info", "delete"):
            return (model_info if args.command == "info" else delete)(cluster, args)
        check_python_path()  # (starting: a party, or the launcher of the local ones)
        if args.party:
            from .jobs import SamplingCatalog
            from .party import serve

            with warnings.catch_warnings(), safe_import_path(), _kept_if_logged(args) as log_dir:  # (all restored
                warnings.showwarning = warning_line  # for a caller in this process: the tests)
                return serve(cluster, args.party, SamplingCatalog(), log_dir, _share_memory(args))
        with safe_import_path(), _kept_if_logged(args) as log_dir:
            return supervise(args.config, cluster, log_dir, _share_memory(args))
    except (ClusterConfigError, PartyError, ClusterError, InputError, ConfigError, SchedulerConfigError) as e:
        print(printable(f"spu-launch: {e}"), file=sys.stderr)
        return 2 if isinstance(e, (ClusterConfigError, PartyError, ValueError)) else 1


def _positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, not {text!r}")
    return value


def _share_memory(args) -> int:
    """The parties' share-memory budget in bytes: --share-memory-gib, or a quarter of this machine's physical memory
    (a session's SPU runtime holds its model's shares again)."""
    if args.share_memory_gib is not None:
        return int(args.share_memory_gib * 2**30)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


@contextlib.contextmanager
def _kept_if_logged(args) -> Iterator[Path]:
    """--log-dir, or a new temporary folder (said on the console: the parties' logs go there), which is removed again
    when the parties end without anything logged (they failed to start: the console says why)."""
    if args.log_dir is not None:
        yield args.log_dir
        return
    log_dir = Path(tempfile.mkdtemp(prefix="cipherdm-spu-"))
    print(f"spu-launch: party logs in {log_dir}", flush=True)
    try:
        yield log_dir
    finally:
        try:
            files = list(log_dir.iterdir())
            if all(f.is_file() and not f.is_symlink() and f.stat().st_size == 0 for f in files):
                for f in files:
                    f.unlink()
                log_dir.rmdir()
                print(f"spu-launch: nothing was logged; {log_dir} removed", file=sys.stderr, flush=True)
        except OSError:  # changed meanwhile: kept
            pass


def status(cluster: ClusterConfig, identity: str) -> int:
    """Print one line per party; exit 0 when all three are up."""
    up = 0
    with PartyClients(cluster, identity) as clients:
        replies = clients.hello(timeout=min(cluster.connect_timeout_s, 5.0))
    for party, reply in zip(cluster.parties, replies):
        if isinstance(reply, str):
            print(printable(f"{party.id}  DOWN  {reply}"))
            continue
        up += 1
        state = "busy" if reply.busy else "idle"
        agrees = "" if reply.config == cluster.fingerprint else "  (started with a DIFFERENT config)"
        print(printable(f"{party.id}  UP    {party.control_address}  {state}  cipherdm-spu {reply.package}, spu {reply.spu}"
                        f"{agrees}"))
    print(f"{up}/3 parties up")
    return 0 if up == len(cluster.parties) else 1


def _model_ref(args) -> ModelRef:
    """The model --model-id (and, for info, --model-owner) names."""
    if args.model_id is None or not NAME.fullmatch(args.model_id):
        raise ClusterConfigError(f"{args.command} needs --model-id ID (1-64 letters, digits, '.', '_' or '-')")
    owner = args.model_owner
    if owner is not None and (args.command != "info" or cluster_config.role_of(owner) != "owner"):
        raise ClusterConfigError("--model-owner names an owner (owner or owner-NAME), for info only: an owner deletes "
                                 "only its own models")
    return ModelRef(args.model_id, owner or "")


def model_info(cluster: ClusterConfig, args) -> int:
    """Print what each party holds under the model id: its owner, whether sealed, the manifest digest; then the
    manifest's kind and policy. Exit 0 when the three hold one sealed model."""
    ref = _model_ref(args)
    with PartyClients(cluster, args.identity or "owner") as clients:
        if clients.role == "user" and not ref.owner:
            raise ClusterConfigError("info as a user needs --model-owner OWNER, whose model --model-id is (as "
                                     "`spu-launch upload` printed it)")
        outcomes = clients.call_each("model_info", ref)
    held = [o for o in outcomes if not isinstance(o, str)]
    for party, outcome in zip(cluster.parties, outcomes):
        if isinstance(outcome, str):
            print(printable(f"{party.id}  {outcome}"))
        else:
            state = "sealed" if outcome.sealed else "uploading"
            print(printable(f"{party.id}  {state}  owner: {outcome.owner}  manifest: {outcome.digest[:16]}"))
    agreed = len(held) == 3 and len({(o.owner, o.digest) for o in held}) == 1
    if held:
        manifest = json.loads(held[0].manifest)
        print(printable(f"kind {manifest.get('kind')}; policy {json.dumps(manifest.get('policy'), sort_keys=True)}"))
    if len(held) == 3 and not agreed:
        print("the parties hold DIFFERENT models under this id")
    return 0 if agreed and all(o.sealed for o in held) else 1


def delete(cluster: ClusterConfig, args) -> int:
    """The owner deletes its model from each party (each refusal is named); exit 0 when all three deleted it."""
    ref = _model_ref(args)
    with PartyClients(cluster, args.identity or "owner") as clients:
        require_role(clients, "owner")
        outcomes = clients.call_each("model_delete", ref)
    for party, outcome in zip(cluster.parties, outcomes):
        print(printable(f"{party.id}  {outcome if isinstance(outcome, str) else 'deleted'}"))
    return 0 if not any(isinstance(o, str) for o in outcomes) else 1


def upload(cluster: ClusterConfig, args) -> int:
    """The model owner's upload: share the model under --model-id, with --policy."""
    from .cli_common import load_model_dir
    from .jobs import upload_model

    if args.model is None or args.model_id is None:
        raise ClusterConfigError("upload needs --model DIR and --model-id ID")
    if not NAME.fullmatch(args.model_id):
        raise ClusterConfigError(f"--model-id {args.model_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    policy = Policy()
    if args.policy is not None:
        try:
            policy = Policy.from_dict(json.loads(args.policy.read_text()))
        except (OSError, ValueError) as e:
            raise ClusterConfigError(f"--policy {args.policy}: {e}") from None
    if not args.model.is_dir():
        raise ClusterConfigError(f"--model {args.model} is not a directory")
    try:
        model, params, scheduler = load_model_dir(args.model)
    except (OSError, ValueError) as e:
        raise ClusterConfigError(f"cannot load --model {args.model}: {e}") from None
    if args.controlnet is not None:
        from .models import ControlledUNet, ControlNetModel, UNet2DConditionModel

        if not isinstance(model, UNet2DConditionModel):
            raise ClusterConfigError(f"--controlnet goes with a Stable Diffusion UNet; --model {args.model} is not one")
        try:
            controlnet, controlnet_params = ControlNetModel.from_pretrained(args.controlnet)
            model, params = ControlledUNet.combine(model, params, controlnet, controlnet_params)
        except ValueError as e:
            raise ClusterConfigError(f"cannot load --controlnet {args.controlnet}: {e}") from None
    with PartyClients(cluster, args.identity or "owner") as clients, \
            tqdm(desc=f"uploading {args.model_id}", unit="tensor") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        sealed = upload_model(clients, args.model_id, model, params, scheduler, policy, progress)
    print(printable(f"model {args.model_id} shared with the three parties (manifest {sealed.digest[:16]}); users name "
                    f"it --model-id {args.model_id} --model-owner {sealed.owner}"))
    return 0


def supervise(config_path: Path, cluster: ClusterConfig, log_dir: Path, share_memory: int) -> int:
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
            [*module_command("cipherdm_spu.cluster"), "--config", str(config_path), "--party", party_id,
             "--log-dir", str(log_dir), "--share-memory-gib", repr(share_memory / 2**30)],
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


@contextlib.contextmanager
def loopback_cluster(folder: Path, link: Optional[Link] = None,
                     clients=("owner", "user")) -> Iterator[Tuple[Path, Optional[LinkEmulator]]]:
    """Three parties on this machine, started as the README says (a config on free loopback ports, development
    certificates, one spu-launch), their links through `netem` relays when ``link`` is given; yields the config
    the parties run on and the emulator (or None). Everything it started is stopped on exit."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(6)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in sockets]
    config = cluster_config.write_config(folder / "3pc.json", {
        "parties": [{"id": f"P{i}", "spu_address": f"127.0.0.1:{ports[i]}", "control_address": f"127.0.0.1:{ports[3 + i]}"}
                    for i in range(3)],
        "runtime": {"protocol": "ABY3", "field": "FM64", "fraction_bits": 18},
        "tls": {"party_ca": "tls/party-ca.pem", "client_ca": "tls/client-ca.pem",
                "parties": {f"P{i}": {"cert": f"tls/P{i}.pem", "key": f"tls/P{i}.key"} for i in range(3)},
                "clients": {c: {"cert": f"tls/{c}.pem", "key": f"tls/{c}.key"} for c in clients}},
    })
    from .pki import make_development_pki

    make_development_pki(cluster_config.load(config), clients)
    emulator = None
    with contextlib.ExitStack() as stack:
        if link is not None:
            emulator = stack.enter_context(LinkEmulator(config, link))
            config = emulator.write(folder / "3pc-routed.json")
        log = open(folder / "launcher.out", "a")
        stack.callback(log.close)
        launcher = subprocess.Popen([*module_command("cipherdm_spu.cluster"), "--config", str(config),
                                     "--log-dir", str(folder / "logs")], stdout=log, stderr=subprocess.STDOUT)
        stack.callback(_stop_all, [launcher])
        _wait_up(cluster_config.load(config), launcher, folder / "launcher.out")
        yield config, emulator


def _wait_up(cluster: ClusterConfig, launcher: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S + 30
    with PartyClients(cluster, "user") as clients:
        while time.monotonic() < deadline:
            if launcher.poll() is not None:
                raise ClusterError(f"spu-launch exited ({launcher.returncode}): {out.read_text()[-2000:]}")
            if not any(isinstance(reply, str) for reply in clients.hello(timeout=1.0)):
                return
            time.sleep(0.5)
    raise ClusterError(f"the loopback cluster did not come up in time; see {out}")


if __name__ == "__main__":
    sys.exit(main())
