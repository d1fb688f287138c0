"""The three-role cluster on loopback: spu-launch (certs, parties, status, upload), a user's sampling run,
its agreement with the embedded session, and failures named by party. Attacks: tests/test_security.py."""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cipherdm_spu import SecureSession
from cipherdm_spu import cluster_config as cc
from cipherdm_spu import party as party_module
from cipherdm_spu.client import PartyClients
from cipherdm_spu.cluster import main as launch_main
from cipherdm_spu.errors import ClusterConfigError, ClusterError, InputError, PartyError
from cipherdm_spu.jobs import (SamplingCatalog, clamped_inputs, make_sampler as make_sampler_for_job, parse_job,
                               sample_on_cluster, upload_model)
from cipherdm_spu.models import ScheduleConfig
from cipherdm_spu.models.schedulers import SCHEDULERS, make_sampler
from cipherdm_spu.messages import Empty, ModelPut, ModelRef, SessionPut
from cipherdm_spu.plan import Policy
from cipherdm_spu.sampling import SecureDiffusion, draw_noise, sample_plaintext
from cipherdm_spu.sampling_cli import main as sampling_main

from .cluster_fixtures import (RECV_S, TINY_JOB, free_ports, make_certs, start, stop, tiny_inputs, tiny_unet, wait_up,
                               write_config)


REPO = Path(__file__).resolve().parents[1]


def user(config, name="user"):
    return PartyClients(cc.load(config), name)


@pytest.mark.slow
def test_a_user_samples_what_the_owner_uploaded_as_the_embedded_session_does(cluster):
    config, _ = cluster
    model, params, _ = tiny_unet()
    sampler, x_t, labels = tiny_inputs()
    with user(config) as clients:
        remote, stats_c, steps = sample_on_cluster(clients, "tiny", TINY_JOB, x_t, labels, owner="owner")
    with SecureSession("cipherdm") as session:
        diffusion = SecureDiffusion(session, model, params, sampler)
        embedded, stats_e, _ = diffusion.sample(x_t, [3, 8])
        # the cluster's step also clamps its secret inputs to the owner's bound (Policy.input_bound): its cost alone
        session.run(clamped_inputs(lambda w, x, c, t, k, n: (x, c), Policy().input_bound), None, x_t, labels, None,
                    None, None)
        clamp = session.last_stats
    # Fixed point with different random shares: SPU's truncation rounds at random, and our SiLU's u at 9 fraction
    # bits takes that rounding (up to 4.4e-3 per activation, either way), so two runs differ by more than the
    # 2^-18 noise of a plain product; each run holds its own bound against plaintext (tests/test_sampling.py).
    difference = np.abs(remote - embedded)
    assert difference.max() <= 0.05 and difference.mean() <= 0.005, (difference.max(), difference.mean())
    assert len(steps) == 2 and all(b > 0 for b in stats_c.bytes_sent_per_party)
    # the same program sends the same traffic, as counted by each party's own SPU profiler (the embedded run also
    # shares the time terms per step, which the cluster's owner uploaded once, in advance)
    bytes_e, actions_e = (stats_e.bytes_sent + len(steps) * clamp.bytes_sent,
                          stats_e.send_actions + len(steps) * clamp.send_actions)
    assert abs(stats_c.bytes_sent - bytes_e) <= 0.01 * bytes_e
    # (send actions vary by tens from run to run, and the clamp's own run counts its outputs' reveal)
    assert abs(stats_c.send_actions - actions_e) <= 0.015 * actions_e
    # each party's own compute: its SPU worker's CPU seconds, within the wall seconds it spent in the runs times
    # this machine's cores; one process cannot tell its three parties' CPU apart, so the embedded run leaves both empty
    assert len(stats_c.cpu_seconds_per_party) == len(stats_c.busy_seconds_per_party) == 3
    for cpu, busy in zip(stats_c.cpu_seconds_per_party, stats_c.busy_seconds_per_party):
        assert 0 < cpu <= busy * os.cpu_count() and 0 < busy <= stats_c.seconds + 1e-9
    assert stats_e.cpu_seconds_per_party == [] and stats_e.busy_seconds_per_party == []


@pytest.mark.slow
def test_a_multistep_solver_on_the_cluster_matches_the_embedded_session(cluster):
    """DPM-Solver++(2M): the parties build and audit the same state-carrying program; only the sample comes back."""
    config, _ = cluster
    model, params, scheduler = tiny_unet()
    _, x_t, labels = tiny_inputs()
    job = {**TINY_JOB, "sampler": "dpmsolver++", "steps": 3}
    with user(config) as clients:
        remote, _, steps = sample_on_cluster(clients, "tiny", job, x_t, labels, owner="owner")
    sampler = make_sampler("dpmsolver++", ScheduleConfig.from_dict(scheduler), 3, options=scheduler)
    with SecureSession("cipherdm") as session:
        diffusion = SecureDiffusion(session, model, params, sampler)
        embedded, _, _ = diffusion.sample(x_t, [3, 8])
    assert remote.shape == embedded.shape == x_t.shape and len(steps) == 3
    # random weights and no clipping (DPM-Solver++ has none): samples reach |x| ~ 60, and the two runs' fixed-point
    # rounding differs relative to that (a run measured 0.14 % at most, 0.13 % on average)
    scale, difference = np.abs(embedded).max(), np.abs(remote - embedded)
    assert difference.max() <= 0.005 * scale and difference.mean() <= 0.0005 * scale, (difference.max(), scale)


@pytest.mark.slow
def test_a_noisy_sampler_on_the_cluster_adds_the_users_step_noise(cluster):
    """DDPM adds the user's secret noise at every step but the last, shared into an input slot per step: the cluster's
    sample follows the plaintext sampler's from the same noise, and not from none or from the first two steps' noise
    swapped (the first step's noise is used, and is its own; the second's is scaled by about 0.01, the last's by 0)."""
    config, _ = cluster
    model, params, scheduler = tiny_unet()
    _, _, labels = tiny_inputs()
    # 3 steps (timesteps 666, 333, 0): with 2 (500, 0) the one noise added is scaled by about 0.01
    sampler = make_sampler("ddpm", ScheduleConfig.from_dict(scheduler), 3, options=scheduler)
    x_t, noise = draw_noise(1, sampler, (2, 1, 8, 8))
    with user(config) as clients:
        remote, _, steps = sample_on_cluster(clients, "tiny", {**TINY_JOB, "sampler": "ddpm", "steps": 3}, x_t, labels,
                                             step_noise=noise, owner="owner")
    assert len(steps) == 3 and remote.shape == x_t.shape
    plain = lambda step_noise: np.asarray(sample_plaintext(model, params, sampler, x_t, labels, step_noise))  # noqa: E731
    same = np.abs(remote - plain(noise))
    # fixed point against float32 over three steps (a run: 0.040 at most, 0.0012 on average)
    assert same.max() <= 0.1 and same.mean() <= 0.005, (same.max(), same.mean())
    for other in (np.zeros_like(noise), noise[[1, 0, 2]]):
        assert np.abs(remote - plain(other)).mean() > 20 * same.mean()


def test_parse_job_takes_the_samplers_by_name_and_refuses_bad_combinations():
    model, _, scheduler = tiny_unet()
    schedule = ScheduleConfig.from_dict(scheduler)
    for name in SCHEDULERS:
        job = parse_job(json.dumps({**TINY_JOB, "sampler": name}), model, schedule)
        assert make_sampler_for_job(job, schedule, scheduler).num_steps == TINY_JOB["steps"]
    with pytest.raises(ValueError, match="sampler must be one of"):
        parse_job(json.dumps({**TINY_JOB, "sampler": "pndm"}), model, schedule)
    with pytest.raises(ValueError, match="eta is a DDIM option"):
        make_sampler_for_job(parse_job(json.dumps({**TINY_JOB, "sampler": "unipc", "eta": 0.5}), model, schedule),
                             schedule, scheduler)
    with pytest.raises(ValueError, match="solver_order"):
        make_sampler_for_job(parse_job(json.dumps({**TINY_JOB, "sampler": "dpmsolver++"}), model, schedule),
                             schedule, {**scheduler, "solver_order": 5})
    for eta in (1.0 + 1e-6, 1e30):  # DDIM's sigma scales the user's noise by up to eta
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            parse_job(json.dumps({**TINY_JOB, "eta": eta}), model, schedule)


@pytest.mark.slow
def test_run_ddim_as_a_user_of_the_cluster_writes_private_files(cluster, tmp_path):
    config, _ = cluster
    out = tmp_path / "out"
    assert sampling_main("ddim", ["--cluster", str(config), "--model-id", "tiny", "--model-owner", "owner",
                                  "--steps", "2", "--labels", "3,8", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parties"].startswith(f"cluster {config}") and report["parties"].endswith("model tiny of owner)")
    assert report["model"] == "tiny"
    assert len(report["bytes_sent_per_party"]) == 3 and min(report["bytes_sent_per_party"]) > 0
    assert np.load(out / "samples.npy").shape == (2, 1, 8, 8)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("samples.npy", "samples.png", "report.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name


@pytest.mark.slow
def test_a_user_run_stopped_by_sigterm_closes_its_session_at_once(cluster, tmp_path):
    """`kill` (or a closed terminal) ends a cluster run as Ctrl-C does: the session is closed at every party, not held
    until their idle timeout with everyone else refused; the run prints one line, no traceback."""
    config, _ = cluster
    logs = [config.parent / "logs" / f"party-{p}.log" for p in ("P0", "P1", "P2")]
    logged_before = [log.stat().st_size for log in logs]  # the cluster is the session's: earlier tests logged too
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        run = subprocess.Popen([sys.executable, str(REPO / "scripts" / "run_ddim.py"), "--cluster", str(config),
                                "--model-id", "tiny", "--model-owner", "owner", "--steps", "50", "--labels", "3,8",
                                "--out", str(tmp_path / "out")], stderr=stderr, stdout=subprocess.DEVNULL)
    try:
        with user(config, "user-bob") as clients:  # another user of the cluster watches for the session to open
            while not any(reply.busy for reply in clients.call_all("hello", Empty())):
                assert run.poll() is None, err.read_text()
                time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=300) == -signal.SIGTERM  # after its cleanup, the process ends by the signal itself
    finally:
        if run.poll() is None:
            run.kill()
    message = err.read_text()
    assert "run_ddim.py: interrupted by SIGTERM: the run stopped; a cluster session it opened was closed" in message
    assert "Traceback" not in message
    with user(config, "user-bob") as clients:
        assert not any(reply.busy for reply in clients.call_all("hello", Empty()))
    for log, offset in zip(logs, logged_before):  # this run's lines: its session closed, not dropped as idle
        with open(log) as f:
            f.seek(offset)
            drops = re.findall(r"session (\S+) dropped: (.*)", f.read())
        assert [why for _, why in drops] == ["closed by its user"], drops


@pytest.mark.parametrize("argv, message", [
    (["--model-id", "tiny"], "--model-id and --model-owner are for --cluster runs"),
    (["--model-owner", "owner"], "--model-id and --model-owner are for --cluster runs"),
    (["--cluster", "CONFIG"], "--cluster needs --model-id"),
    (["--cluster", "CONFIG", "--model-id", "tiny"], "--cluster needs --model-owner OWNER"),
    (["--cluster", "CONFIG", "--model-id", "tiny", "--model-owner", "owner", "--compare"], "does not hold"),
    (["--cluster", "CONFIG", "--model-id", "tiny", "--model-owner", "owner", "--as", "mallory"],
     "no identity 'mallory'"),
    (["--cluster", "CONFIG", "--model-id", "tiny", "--model-owner", "user"], "--model-owner 'user' is no owner's name"),
    (["--cluster", "CONFIG", "--model-id", "tiny", "--model-owner", "owner-a/b"], "is no owner's name"),
    (["--cluster", "CONFIG", "--model-id", "tiny", "--model-owner", "owner"],
     "does not exist (make them with `spu-launch certs`; or act as an identity whose files this host has: --as NAME)"),
    (["--cluster", "CONFIG", "--model-id", "tiny", "--model-owner", "owner", "--model", "checkpoints/mnist-ddpm-mish"],
     "--model is a local model's folder; on a cluster the parties hold the model"),
    (["--eta", "nan"], "--eta must be a finite number"),
    (["--seed", "-1"], "--seed must be in"),
])
def test_user_command_line_refuses_bad_input(tmp_path, capsys, argv, message):
    config = write_config(tmp_path / "3pc.json")
    argv = [str(config) if a == "CONFIG" else a for a in argv]
    assert sampling_main("ddim", argv + ["--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_an_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert sampling_main("ddim", ["--out", str(tmp_path / "afile")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_each_party_receives_only_its_own_shares(cluster, tmp_path, monkeypatch):
    """What the clients sent to party i (digest per share) is exactly what party i logged as received."""
    config, _ = cluster
    sent = [[] for _ in range(3)]
    original = PartyClients.call

    def recording_call(self, rank, method, request, **kwargs):
        if isinstance(request, ModelPut):
            sent[rank] += [(n, _digest(m, c)) for n, m, c in zip(request.names, request.metas, kwargs["contents"])]
        elif isinstance(request, SessionPut):
            sent[rank].append((request.slot, _digest(request.meta, kwargs["contents"][0])))
        return original(self, rank, method, request, **kwargs)

    monkeypatch.setattr(PartyClients, "call", recording_call)
    model, params, scheduler = tiny_unet()
    with PartyClients(cc.load(config), "owner") as owner:
        upload_model(owner, "tiny-audit", model, params, scheduler, Policy())
    _, x_t, labels = tiny_inputs()
    with user(config) as clients:
        sample_on_cluster(clients, "tiny-audit", TINY_JOB, x_t, labels, owner="owner")
        clients.call_all("model_info", ModelRef("tiny-audit", "owner"))
    with PartyClients(cc.load(config), "owner") as owner:
        owner.call_all("model_delete", ModelRef("tiny-audit"))
    logs = [(config.parent / "logs" / f"party-P{i}.log").read_text() for i in range(3)]
    received = [re.findall(r"received (\S+) sha256=(\w+)", text) for text in logs]
    for rank in range(3):
        mine = set(sent[rank])
        assert len(mine) > 100 and mine <= set(received[rank])
        others = {d for other in range(3) if other != rank for _, d in sent[other]}
        assert not others & {d for _, d in received[rank]}


def _digest(meta, content):
    import hashlib

    return hashlib.sha256(meta + content).hexdigest()


def test_a_checkpoint_with_nan_is_refused_before_anything_is_shared(tmp_path):
    model, params, scheduler = tiny_unet()
    params["params"]["conv_in"]["kernel"] = params["params"]["conv_in"]["kernel"].at[0, 0, 0, 0].set(np.nan)
    config = write_config(tmp_path / "3pc.json")
    make_certs(config)
    with PartyClients(cc.load(config), "owner") as owner:  # no party runs: refused before any call
        with pytest.raises(InputError, match="conv_in/kernel contains NaN"):
            upload_model(owner, "bad", model, params, scheduler, Policy())


@pytest.mark.slow
def test_status_and_upload_commands(cluster, tmp_path, capsys):
    config, _ = cluster
    assert launch_main(["--config", str(config), "status"]) == 0
    out = capsys.readouterr().out
    assert "3/3 parties up" in out and out.count(" UP ") == 3
    model, params, scheduler = tiny_unet()
    model.save_pretrained(params, tmp_path / "tiny")
    (tmp_path / "tiny" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (tmp_path / "policy.json").write_text(json.dumps({"users": ["user"], "protocol_sets": ["cipherdm"]}))
    args = ["--config", str(config), "upload", "--model", str(tmp_path / "tiny"), "--model-id", "tiny-cli",
            "--policy", str(tmp_path / "policy.json")]
    assert launch_main(args) == 0
    assert "users name it --model-id tiny-cli --model-owner owner" in capsys.readouterr().out
    assert launch_main(args) == 1  # the parties refuse: this owner has a model of that id
    assert "exists" in capsys.readouterr().err
    with PartyClients(cc.load(config), "owner") as owner:
        infos = owner.call_all("model_info", ModelRef("tiny-cli"))
        assert all(i.sealed and i.owner == "owner" for i in infos)
        assert json.loads(infos[0].manifest)["policy"]["users"] == ["user"]
    # info: the owner's own, and a user's of the owner it names
    info = ["--config", str(config), "info", "--model-id", "tiny-cli"]
    assert launch_main(info) == 0
    out = capsys.readouterr().out
    assert out.count("sealed  owner: owner  manifest: ") == 3 and 'policy {"input_bound"' in out
    assert launch_main(info + ["--as", "user", "--model-owner", "owner"]) == 0
    assert out.splitlines()[:3] == capsys.readouterr().out.splitlines()[:3]
    assert launch_main(info + ["--as", "user"]) == 2  # a user owns no model: it names the owner
    assert "info as a user needs --model-owner OWNER" in capsys.readouterr().err
    # the policy is checked on the job's terms, before anything is compiled
    _, x_t, labels = tiny_inputs()
    with user(config) as clients, pytest.raises(ClusterError, match="allows protocol sets cipherdm, not 'spu'"):
        sample_on_cluster(clients, "tiny-cli", {**TINY_JOB, "protocol_set": "spu"}, x_t, labels, owner="owner")
    # delete: the owner's alone, party by party
    delete = ["--config", str(config), "delete", "--model-id", "tiny-cli"]
    assert launch_main(delete + ["--as", "user"]) == 2
    assert "has the user role; this needs the owner role" in capsys.readouterr().err
    assert launch_main(delete + ["--model-owner", "owner"]) == 2 and "for info only" in capsys.readouterr().err
    assert launch_main(delete) == 0 and capsys.readouterr().out.count("  deleted") == 3
    assert launch_main(delete) == 1 and capsys.readouterr().out.count("has no model 'tiny-cli' owned by owner") == 3
    assert launch_main(info) == 1


@pytest.mark.slow
def test_client_refuses_a_cluster_started_with_another_config(cluster, tmp_path):
    config, _ = cluster
    raw = json.loads(config.read_text())
    raw["timeouts"]["recv_s"] = 99
    other = config.parent / "other.json"
    other.write_text(json.dumps(raw))
    with PartyClients(cc.load(other), "user") as clients:
        with pytest.raises(ClusterError, match="different cluster config"):
            clients.check_ready()


def test_unreachable_party_is_reported(tmp_path):
    config = write_config(tmp_path / "3pc.json", connect_s=1)
    make_certs(config)
    with user(config) as clients:
        with pytest.raises(ClusterError, match="party P0 unreachable at 127.0.0.1:"):
            clients.check_ready()


def test_port_in_use_is_reported(tmp_path, capsys):
    ports = free_ports(6)
    config = write_config(tmp_path / "3pc.json", ports)
    make_certs(config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[3]))
        taken.listen()
        assert launch_main(["--config", str(config), "--party", "P0", "--log-dir", str(tmp_path / "logs")]) == 2
    assert "control address 127.0.0.1:%d cannot be used" % ports[3] in capsys.readouterr().err


@pytest.mark.slow
def test_a_launch_that_fails_to_start_leaves_no_empty_log_folder(tmp_path):
    """spu-launch without --log-dir makes a temporary log folder; when a party cannot start (its port taken) the
    others are stopped, and a folder where nothing was logged is removed (a newcomer found one left per try), by the
    launcher or by a party started alone (--party, as on its own host)."""
    ports = free_ports(6)
    config = write_config(tmp_path / "3pc.json", ports)
    make_certs(config)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    launch = [sys.executable, "-m", "cipherdm_spu.cluster", "--config", str(config)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[3]))
        taken.listen()
        run = subprocess.run(launch, text=True, capture_output=True, timeout=180,
                             env={**os.environ, "TMPDIR": str(temporary)})
        alone = subprocess.run(launch + ["--party", "P0"], text=True, capture_output=True, timeout=180,
                               env={**os.environ, "TMPDIR": str(temporary)})
    assert run.returncode == 2, run.stderr
    assert "party P0 failed to start" in run.stderr and "nothing was logged" in run.stderr
    assert run.stdout.count("party logs in") == 1  # the launcher says where, its parties do not repeat it
    assert alone.returncode == 2 and "cannot be used" in alone.stderr and "nothing was logged" in alone.stderr
    assert not list(temporary.glob("cipherdm-spu-*"))


def test_certs_are_private_and_never_overwritten(tmp_path, capsys):
    config = write_config(tmp_path / "3pc.json")
    make_certs(config)
    tls = tmp_path / "tls"
    for path in tls.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644), path
    assert not list(tls.glob("*ca.key"))  # the CAs' keys are not kept
    assert launch_main(["--config", str(config), "certs"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    (tls / "user.key").chmod(0o644)  # a key others can read is refused where it is used
    with pytest.raises(ClusterConfigError, match="readable by others"):
        PartyClients(cc.load(config), "user")


def test_certs_are_written_and_read_only_where_no_one_else_can_change_them(tmp_path, capsys):
    """The parties read their CAs by path: whoever could swap the client CA in (it or a folder above it) could let
    in clients of its own. `spu-launch certs` will not write under a folder others can write; the parties and
    clients refuse files under one."""
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    config = write_config(open_folder / "3pc.json")
    assert launch_main(["--config", str(config), "certs"]) == 2
    assert f"{open_folder} on its path has mode 777" in capsys.readouterr().err
    assert not (open_folder / "tls").exists()
    config = write_config(tmp_path / "3pc.json")
    make_certs(config)
    (tmp_path / "tls").chmod(0o757)  # others may write the certificates' folder
    with pytest.raises(ClusterConfigError, match=r"tls on its path has mode 757"):
        PartyClients(cc.load(config), "user")
    (tmp_path / "tls").chmod(0o700)
    (tmp_path / "tls" / "client-ca.pem").chmod(0o666)
    handlers = list(party_module.log.handlers)
    try:
        with pytest.raises(PartyError, match="client-ca.pem has mode 666: others may write it"):
            party_module.serve(cc.load(config), "P0", SamplingCatalog(), tmp_path / "logs", 2**30)
    finally:
        for handler in set(party_module.log.handlers) - set(handlers):  # the log serve started
            party_module.log.removeHandler(handler)
            handler.close()


def test_certs_are_made_all_or_none(tmp_path, capsys):
    """A client's files under a folder others can write are refused after the CAs' and parties' were written: none
    stays behind, so the run can be repeated once the folder is fixed."""
    config = write_config(tmp_path / "3pc.json", clients=("owner", "user"))
    raw = json.loads(config.read_text())
    raw["tls"]["clients"]["user"] = {"cert": "open/user.pem", "key": "open/user.key"}
    config.write_text(json.dumps(raw))
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    assert launch_main(["--config", str(config), "certs", "--clients", "owner,user"]) == 2
    assert "open has mode 777: others may write it" in capsys.readouterr().err
    assert not list((tmp_path / "tls").iterdir()) and not list((tmp_path / "open").iterdir())
    (tmp_path / "open").chmod(0o700)
    real_fdopen, opened = os.fdopen, []

    def full_disk_on_the_third_file(fd, *args, **kwargs):  # a quota or a full disk, the file made but not written
        opened.append(fd)
        if len(opened) == 3:
            os.close(fd)
            raise OSError(28, "No space left on device")
        return real_fdopen(fd, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "fdopen", full_disk_on_the_third_file)
        assert launch_main(["--config", str(config), "certs", "--clients", "owner,user"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not list((tmp_path / "tls").iterdir()) and not list((tmp_path / "open").iterdir())
    assert launch_main(["--config", str(config), "certs", "--clients", "owner,user"]) == 0
    assert (tmp_path / "open" / "user.key").is_file()


def test_a_cluster_config_others_could_change_is_refused(tmp_path):
    """It names the CAs a party trusts and the addresses it dials."""
    folder = tmp_path / "shared"
    folder.mkdir()
    config = write_config(folder / "3pc.json")
    make_certs(config)
    folder.chmod(0o757)
    with pytest.raises(ClusterConfigError, match="shared on its path has mode 757"):
        cc.load(config)
    folder.chmod(0o755)
    config.chmod(0o646)
    with pytest.raises(ClusterConfigError, match="3pc.json has mode 646: others may write it"):
        cc.load(config)
    old = os.umask(0o002)  # a shared group's umask: what the project writes itself must still load
    try:
        written = cc.write_config(tmp_path / "written.json", json.loads(config.read_text()))
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    cc.load(written)


@pytest.mark.slow
def test_a_party_killed_or_stalled_mid_run_is_named_and_the_others_recover(tmp_path):
    config = write_config(tmp_path / "3pc.json")
    make_certs(config)
    procs = {p: start(config, tmp_path / "logs", party=p) for p in ("P0", "P1", "P2")}
    cluster = cc.load(config)
    try:
        wait_up(config, procs.values())
        for proc in procs.values():  # a party's shares never reach a core file (its workers inherit the limit)
            limits = Path(f"/proc/{proc.pid}/limits").read_text()
            assert re.search(r"Max core file size\s+0\s+0\s", limits), limits
        model, params, scheduler = tiny_unet()
        with PartyClients(cluster, "owner") as owner:
            upload_model(owner, "tiny", model, params, scheduler, Policy())
        _, x_t, labels = tiny_inputs()

        # a party that dies between two steps: the next step fails at once, naming it
        def kill_p2(report):
            os.kill(procs["P2"].pid, signal.SIGKILL)

        started = time.monotonic()
        with user(config) as clients, pytest.raises(ClusterError, match="step 1 failed: party P2 .* unreachable"), \
                pytest.warns(UserWarning, match=r"was not closed there: party P2 .* unreachable .*; still after 5 s"):
            sample_on_cluster(clients, "tiny", TINY_JOB, x_t, labels, on_step=kill_p2, owner="owner")
        assert time.monotonic() - started < 600
        procs["P2"].wait()

        # a party whose control service stalls (SIGSTOP) is named within a call's deadline, never waited for
        procs["P2"] = start(config, tmp_path / "logs", party="P2")
        wait_up(config, procs.values(), parties=("P2",), limit_s=RECV_S + 120)
        os.kill(procs["P1"].pid, signal.SIGSTOP)
        try:
            with user(config) as clients, pytest.raises(ClusterError, match="party P1 .* (did not answer|unreachable)"):
                clients.call_all("hello", Empty())
        finally:
            os.kill(procs["P1"].pid, signal.SIGCONT)

        # the survivors dropped the failed session and serve the next one; P2 lost its shares when it died,
        # so the owner uploads again under a new id
        wait_up(config, procs.values(), limit_s=RECV_S + 120)
        with PartyClients(cluster, "owner") as owner:
            upload_model(owner, "tiny-again", model, params, scheduler, Policy())
        with user(config) as clients:
            result, _, _ = sample_on_cluster(clients, "tiny-again", TINY_JOB, x_t, labels, owner="owner")
        assert np.all(np.isfinite(result))

        # P1's SPU runtime stalls (its control service still answers): its peers time out, and the error blames P1
        def stall_p1_worker(report):
            pids = re.findall(r"SPU worker pid (\d+)", (tmp_path / "logs" / "party-P1.log").read_text())
            os.kill(int(pids[-1]), signal.SIGSTOP)

        with user(config) as clients, pytest.raises(ClusterError, match="P1's SPU runtime stalled"):
            sample_on_cluster(clients, "tiny-again", TINY_JOB, x_t, labels, on_step=stall_p1_worker, owner="owner")
    finally:
        stop(procs.values())


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["parties"].pop(), "exactly 3 parties"),
    (lambda r: r["parties"][1].pop("spu_address"), "missing 'spu_address'"),
    (lambda r: r["parties"][2].update(id="P0"), "duplicate party id 'P0'"),
    (lambda r: r["parties"][2].update(id="user"), "named like a client role"),
    (lambda r: r["parties"][1].update(spu_address=r["parties"][0]["spu_address"]), "duplicate address"),
    (lambda r: r["parties"][1].update(control_address="localhost:%s" % r["parties"][0]["spu_address"].split(":")[1]),
     "duplicate address"),
    (lambda r: r["parties"][0].update(control_address="127.0.0.1"), "must be 'host:port'"),
    (lambda r: r["parties"][0].update(control_address="127.0.0.1:70000"), "outside 1..65535"),
    (lambda r: r["runtime"].update(protocol="CHEETAH"), "runtime.protocol"),
    (lambda r: r["runtime"].update(protocol="SEMI2K"), "runtime.protocol must be one of ('ABY3',), got 'SEMI2K'"),
    (lambda r: r["runtime"].update(field="FM16"), "field must be one of"),
    (lambda r: r["runtime"].update(fraction_bits=0), "fraction_bits must be an integer in 1..40"),
    (lambda r: r["timeouts"].update(recv_s=-1), "timeouts.recv_s"),
    (lambda r: r["timeouts"].update(recv_s=float("inf")), "timeouts.recv_s"),
    (lambda r: r["timeouts"].update(session_idle_s=0), "timeouts.session_idle_s"),
    (lambda r: r["timeouts"].update(connect_s=30, recv_s=20), "timeouts.recv_s (20) must be at least timeouts.connect_s (30)"),
    (lambda r: r.update(extra=1), "unknown field(s) extra"),
    (lambda r: r.update(tls=None), "'tls' is required"),
    (lambda r: r["tls"].pop("client_ca"), "tls.client_ca must be a file path"),
    (lambda r: r["tls"]["parties"].pop("P1"), "tls.parties needs P1"),
    (lambda r: r["tls"].update(client_ca=r["tls"]["party_ca"]), "must be different CAs"),
    (lambda r: r["tls"]["clients"].update(mallory={"cert": "c", "key": "k"}), "named for its role"),
    (lambda r: r["tls"]["clients"]["user"].pop("key"), "tls.clients.user.key must be a file path"),
    (lambda r: r["parties"][0].update(spu_dial={"P0": "127.0.0.1:2000"}), "'P0' is not another party"),
    (lambda r: r["parties"][0].update(spu_dial={"P9": "127.0.0.1:2000"}), "'P9' is not another party"),
    (lambda r: r["parties"][0].update(spu_dial={"P1": "nowhere"}), "spu_dial.P1: address must be 'host:port'"),
    (lambda r: r["parties"][0].update(spu_dial={"P1": "127.0.0.1:1005"}), "the P1 control_address"),
    (lambda r: r["parties"][0].update(spu_dial=["127.0.0.1:2000"]), "spu_dial must be an object"),
])
def test_bad_configs_are_refused(tmp_path, edit, message):
    raw = json.loads(write_config(tmp_path / "c.json", [1001, 1002, 1003, 1004, 1005, 1006]).read_text())
    edit(raw)
    (tmp_path / "c.json").write_text(json.dumps(raw))
    with pytest.raises(ClusterConfigError, match=re.escape(message)):
        cc.load(tmp_path / "c.json")


def test_shipped_config_is_valid_and_launcher_refuses_bad_files(tmp_path, capsys):
    shipped = cc.load(os.path.join(os.path.dirname(__file__), "..", "configs", "3pc.json"))
    assert [p.id for p in shipped.parties] == ["P0", "P1", "P2"] and shipped.protocol == "ABY3"
    assert set(shipped.clients) == {"owner", "user"}
    assert launch_main(["--config", str(tmp_path / "missing.json"), "status"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert launch_main(["--config", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_launcher_refuses_a_share_memory_that_is_not_a_positive_size(tmp_path, capsys):
    config = write_config(tmp_path / "3pc.json")
    for value in ("0", "-1", "inf", "nan", "lots"):
        with pytest.raises(SystemExit) as exit_info:
            launch_main(["--config", str(config), "--party", "P0", "--share-memory-gib", value])
        assert exit_info.value.code == 2 and "must be a positive number of GiB" in capsys.readouterr().err


def test_launcher_help_runs():
    result = subprocess.run([sys.executable, "-m", "cipherdm_spu.cluster", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "upload" in result.stdout and "certs" in result.stdout
