"""A real three-process cluster on loopback: spu-launch, the driver, sampling across processes, failures."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cipherdm_spu import SecureSession, ops
from cipherdm_spu import cluster_config as cc
from cipherdm_spu.cluster import main as launch_main
from cipherdm_spu.driver import ClusterError, hello
from cipherdm_spu.sampling import SecureDiffusion, draw_noise
from cipherdm_spu.sampling_cli import main as sampling_main
from cipherdm_spu.models import DDIMSampler, ScheduleConfig, UNet2DModel

from .test_sampling import tiny_model  # noqa: F401 - the fixture

RECV_S = 6.0  # the parties' SPU receive timeout in these tests: how long survivors wait for a dead peer


def free_ports(n):
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def write_config(path, ports, **runtime):
    raw = {
        "parties": [
            {"id": f"P{i}", "spu_address": f"127.0.0.1:{ports[i]}", "control_address": f"127.0.0.1:{ports[3 + i]}"}
            for i in range(3)
        ],
        "runtime": {"protocol": "ABY3", "field": "FM64", "fraction_bits": 18, **runtime},
        "timeouts": {"connect_s": 10, "recv_s": RECV_S},
    }
    path.write_text(json.dumps(raw))
    return path


def start(config, log_dir, party=None):
    cmd = [sys.executable, "-m", "cipherdm_spu.cluster", "--config", str(config), "--log-dir", str(log_dir)]
    if party:
        cmd += ["--party", party]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_up(config, procs, parties=("P0", "P1", "P2"), limit_s=120):
    cluster = cc.load(config)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a launcher exited early:\n{p.stdout.read()}")
        replies = {r["party"]: r for r in hello(cluster, timeout=1.0)}
        if all("error" not in replies[p] and not replies[p]["busy"] for p in parties):
            return
        time.sleep(0.5)
    raise RuntimeError("the cluster did not come up")


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three parties started together by one `spu-launch`."""
    tmp = tmp_path_factory.mktemp("cluster")
    config = write_config(tmp / "3pc.json", free_ports(6))
    launcher = start(config, tmp / "logs")
    wait_up(config, [launcher])
    yield config
    stop([launcher])
    assert launcher.returncode == 0, launcher.stdout.read()


def tiny_step_inputs(model_dir):
    model, params = UNet2DModel.from_pretrained(model_dir)
    sampler = DDIMSampler(ScheduleConfig(), 2)
    x_t, noise = draw_noise(0, sampler, (2, 1, 8, 8))
    return model, params, sampler, x_t, noise


@pytest.mark.slow
def test_sampling_on_the_cluster_matches_the_embedded_session(cluster, tiny_model):  # noqa: F811
    model, params, sampler, x_t, noise = tiny_step_inputs(tiny_model)
    results = {}
    for where, kwargs in (("embedded", {}), ("cluster", {"cluster": cluster})):
        with SecureSession("cipherdm", **kwargs) as session:
            diffusion = SecureDiffusion(session, model, params, sampler)
            image, total, _ = diffusion.sample(x_t, [3, 8], noise)
            diffusion.close()
            results[where] = (image, total)
            assert not session.resident
    (embedded, stats_e), (remote, stats_c) = results["embedded"], results["cluster"]
    # Fixed point with different random shares: SPU's truncation rounds at random, and our SiLU's u at 9 fraction
    # bits takes that rounding (up to 4.4e-3 per activation, either way), so two runs differ by more than the
    # 2^-18 noise of a plain product; each run holds its own bound against plaintext (tests/test_sampling.py).
    difference = np.abs(remote - embedded)
    assert difference.max() <= 0.05 and difference.mean() <= 0.005, (difference.max(), difference.mean())
    # the same protocol sends the same traffic, as counted by each party's own SPU profiler
    assert all(b > 0 for b in stats_c.bytes_sent_per_party)
    assert abs(stats_c.bytes_sent - stats_e.bytes_sent) <= 0.01 * stats_e.bytes_sent
    # (the brpc link may split a large message where the in-memory link does not)
    assert abs(stats_c.send_actions - stats_e.send_actions) <= 0.01 * stats_e.send_actions


@pytest.mark.slow
def test_run_ddim_with_cluster_option(cluster, tiny_model, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert sampling_main("ddim", ["--model", str(tiny_model), "--steps", "2", "--labels", "1,4",
                                  "--cluster", str(cluster), "--out", str(out), "--compare"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parties"] == f"cluster {cluster}"
    assert len(report["bytes_sent_per_party"]) == 3 and min(report["bytes_sent_per_party"]) > 0
    assert report["send_actions"] > 0 and report["psnr_vs_plaintext"] > 25


@pytest.mark.slow
def test_each_party_receives_only_its_own_shares(cluster):
    with SecureSession("spu", cluster=cluster) as session:
        weights = session.share({"w": np.ones((3, 3), np.float32), "b": np.arange(3, dtype=np.float32)})
        x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
        y = session.run(lambda p, x: ops.silu(x @ p["w"] + p["b"]), weights, x)
        np.testing.assert_allclose(y, np.asarray(ops.silu(x @ np.ones((3, 3)) + np.arange(3))), atol=0.01)
        sent = session._parties.sent
        session_id = session._parties.session_id
        channels = session._parties._channels
        received = []
        for channel in channels:
            from cipherdm_spu import control

            reply = control.decode(channel.unary_unary(control.path("audit"))(control.encode({})))
            received.append([digest for sid, _, digest in reply["received"] if sid == session_id])
    assert all(len(s) == 3 for s in sent)  # two weights and the input, one share of each per party
    for rank in range(3):
        assert received[rank] == sent[rank]
        others = {d for other in range(3) if other != rank for d in sent[other]}
        assert not others & set(received[rank])


@pytest.mark.slow
def test_status_command(cluster, capsys):
    assert launch_main(["--config", str(cluster), "status"]) == 0
    out = capsys.readouterr().out
    assert "3/3 parties up" in out and out.count(" UP ") == 3


@pytest.mark.slow
def test_driver_refuses_a_cluster_started_with_another_config(cluster, tmp_path):
    raw = json.loads(cluster.read_text())
    raw["runtime"]["fraction_bits"] = 16
    other = tmp_path / "other.json"
    other.write_text(json.dumps(raw))
    with pytest.raises(ClusterError, match="different cluster config"):
        SecureSession("spu", cluster=other)


def test_unreachable_party_is_reported(tmp_path):
    config = write_config(tmp_path / "3pc.json", free_ports(6))
    raw = json.loads(config.read_text())
    raw["timeouts"]["connect_s"] = 1
    config.write_text(json.dumps(raw))
    with pytest.raises(ClusterError, match="party P0 unreachable at 127.0.0.1:"):
        SecureSession("spu", cluster=config)


def test_port_in_use_is_reported(tmp_path, capsys):
    ports = free_ports(6)
    config = write_config(tmp_path / "3pc.json", ports)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[3]))
        taken.listen()
        assert launch_main(["--config", str(config), "--party", "P0", "--log-dir", str(tmp_path)]) == 2
    assert "control address 127.0.0.1:%d cannot be used" % ports[3] in capsys.readouterr().err


@pytest.mark.slow
def test_a_party_killed_mid_run_fails_the_run_and_the_others_recover(tmp_path):
    config = write_config(tmp_path / "3pc.json", free_ports(6))
    procs = {p: start(config, tmp_path / "logs", party=p) for p in ("P0", "P1", "P2")}
    try:
        wait_up(config, procs.values())
        session = SecureSession("spu", cluster=config)
        x = session.share(np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32))

        def long_job(x):
            for _ in range(200):
                x = ops.silu(x @ x * 0.01)
            return x

        session.compile(long_job, x)  # compile first, so the kill lands inside the MPC run
        killer = subprocess.Popen([sys.executable, "-c", f"import os,time,signal; time.sleep(3); os.kill({procs['P2'].pid}, signal.SIGKILL)"])
        started = time.monotonic()
        with pytest.raises(ClusterError, match="party P2 .* unreachable during the run"):
            session.run(long_job, x)
        failed_after = time.monotonic() - started
        killer.wait()
        # the promised bound: at once for a dead party (its channel breaks); never past the receive timeout
        assert failed_after < RECV_S + 10
        with pytest.raises(ClusterError, match="session is over"):
            session.run(long_job, x)
        session.close()
        # P2 comes back; the survivors finish their aborted run (receive timeout) and take the next job
        procs["P2"] = start(config, tmp_path / "logs", party="P2")
        wait_up(config, procs.values(), limit_s=RECV_S + 120)
        with SecureSession("spu", cluster=config) as again:
            np.testing.assert_allclose(again.run(lambda v: v * 2.0, np.ones(3, np.float32)), 2.0, atol=1e-3)
    finally:
        stop(procs.values())


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["parties"].pop(), "exactly 3 parties"),
    (lambda r: r["parties"][1].pop("spu_address"), "missing 'spu_address'"),
    (lambda r: r["parties"][2].update(id="P0"), "duplicate party id 'P0'"),
    (lambda r: r["parties"][1].update(spu_address=r["parties"][0]["spu_address"]), "duplicate address"),
    (lambda r: r["parties"][1].update(control_address="localhost:%s" % r["parties"][0]["spu_address"].split(":")[1]),
     "duplicate address"),
    (lambda r: r["parties"][0].update(control_address="127.0.0.1"), "must be 'host:port'"),
    (lambda r: r["parties"][0].update(control_address="127.0.0.1:70000"), "outside 1..65535"),
    (lambda r: r["runtime"].update(protocol="CHEETAH"), "runtime.protocol"),
    (lambda r: r["runtime"].update(field="FM16"), "runtime.field"),
    (lambda r: r["runtime"].update(fraction_bits=0), "runtime.fraction_bits"),
    (lambda r: r["timeouts"].update(recv_s=-1), "timeouts.recv_s"),
    (lambda r: r.update(extra=1), "unknown field(s) extra"),
    (lambda r: r.update(tls={"ca_cert": "ca.pem", "parties": {}}), "parties.P0 with 'cert' and 'key'"),
    (lambda r: r.update(tls={"ca_cert": "ca.pem", "parties": {f"P{i}": {"cert": "c", "key": "k"} for i in range(3)},
                             "driver": {"cert": "c"}}), "tls key of driver must be a file path"),
])
def test_bad_configs_are_refused(tmp_path, edit, message):
    raw = json.loads(write_config(tmp_path / "c.json", [1001, 1002, 1003, 1004, 1005, 1006]).read_text())
    edit(raw)
    (tmp_path / "c.json").write_text(json.dumps(raw))
    with pytest.raises(cc.ClusterConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cc.load(tmp_path / "c.json")


def test_shipped_config_is_valid_and_launcher_refuses_bad_files(tmp_path, capsys):
    shipped = cc.load(os.path.join(os.path.dirname(__file__), "..", "configs", "3pc.json"))
    assert [p.id for p in shipped.parties] == ["P0", "P1", "P2"] and shipped.protocol == "ABY3"
    assert launch_main(["--config", str(tmp_path / "missing.json"), "status"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert launch_main(["--config", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def make_tls(directory):
    """A CA and one certificate per party (for 127.0.0.1), made with the openssl command line."""
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", str(directory / "ca.key"), "-out", str(directory / "ca.pem"))
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    files = {}
    for who in ("P0", "P1", "P2", "driver"):
        key, csr, cert = (directory / f"{who}.{suffix}" for suffix in ("key", "csr", "pem"))
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", str(key), "-out", str(csr))
        openssl("x509", "-req", "-in", str(csr), "-CA", str(directory / "ca.pem"), "-CAkey", str(directory / "ca.key"),
                "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
        files[who] = {"cert": cert.name, "key": key.name}
    driver = files.pop("driver")
    return {"ca_cert": "ca.pem", "parties": files, "driver": driver}


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command to make test certificates")
def test_cluster_with_tls_on_both_channels(tmp_path):
    config = write_config(tmp_path / "3pc.json", free_ports(6))
    raw = json.loads(config.read_text())
    raw["tls"] = make_tls(tmp_path)
    config.write_text(json.dumps(raw))
    launcher = start(config, tmp_path / "logs")
    try:
        wait_up(config, [launcher])
        with SecureSession("spu", cluster=config) as session:
            x = np.arange(4, dtype=np.float32)
            np.testing.assert_allclose(session.run(lambda v: v * v, x), x * x, atol=1e-3)
        # the driver needs its own certificate; a client without the cluster's certificates is refused
        no_driver = json.loads(config.read_text())
        del no_driver["tls"]["driver"]
        (tmp_path / "no_driver.json").write_text(json.dumps(no_driver))
        with pytest.raises(cc.ClusterConfigError, match="no tls.driver certificate"):
            SecureSession("spu", cluster=tmp_path / "no_driver.json")
        plain = json.loads(config.read_text())
        plain["tls"] = None
        (tmp_path / "plain.json").write_text(json.dumps(plain))
        with pytest.raises(ClusterError, match="unreachable|not ready"):
            SecureSession("spu", cluster=cc.from_dict({**plain, "timeouts": {"connect_s": 2, "recv_s": RECV_S}}))
    finally:
        stop([launcher])
