"""A real three-process cluster on loopback, started as the README says: certificates, spu-launch, upload."""

import contextlib
import signal
import socket
import subprocess
import time

from cipherdm_spu import cluster_config as cc
from cipherdm_spu.child_python import module_command
from cipherdm_spu.client import PartyClients
from cipherdm_spu.cluster import main as launch_main

RECV_S = 12.0  # the parties' SPU receive timeout in these tests: how long survivors wait for a dead peer
CONNECT_S = 10.0  # how long a party waits for its peers to link (recv_s must cover it, with slack)


def free_ports(n):
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
            norm_num_groups=4, attention_head_dim=8, num_class_embeds=10)
#: the job every cluster test runs (the parties compile it once and keep it)
TINY_JOB = {"sampler": "ddim", "steps": 2, "batch": 2, "protocol_set": "cipherdm"}


def tiny_unet():
    """(model, params, scheduler config) of a tiny class-conditional UNet with random weights."""
    import dataclasses

    import jax

    from cipherdm_spu.models import ScheduleConfig, UNet2DModel

    model = UNet2DModel.from_config(TINY)
    scheduler = {"_class_name": "DDPMScheduler", **dataclasses.asdict(ScheduleConfig())}
    return model, model.init_params(jax.random.PRNGKey(0)), scheduler


def tiny_inputs(labels=(3, 8)):
    """The user's inputs for TINY_JOB: x_T and one-hot labels."""
    from cipherdm_spu.models import DDIMSampler, ScheduleConfig
    from cipherdm_spu.sampling import draw_noise, one_hot

    sampler = DDIMSampler(ScheduleConfig(), TINY_JOB["steps"])
    x_t, _ = draw_noise(0, sampler, (len(labels), 1, 8, 8))
    return sampler, x_t, one_hot(list(labels), 10)


def tls_section(clients=("owner", "user")):
    return {
        "party_ca": "tls/party-ca.pem", "client_ca": "tls/client-ca.pem",
        "parties": {f"P{i}": {"cert": f"tls/P{i}.pem", "key": f"tls/P{i}.key"} for i in range(3)},
        "clients": {c: {"cert": f"tls/{c}.pem", "key": f"tls/{c}.key"} for c in clients},
    }


def write_config(path, ports=None, clients=("owner", "user", "user-bob", "user-carol"), **timeouts):
    ports = ports or free_ports(6)
    raw = {
        "parties": [
            {"id": f"P{i}", "spu_address": f"127.0.0.1:{ports[i]}", "control_address": f"127.0.0.1:{ports[3 + i]}"}
            for i in range(3)
        ],
        "runtime": {"protocol": "ABY3", "field": "FM64", "fraction_bits": 18},
        "timeouts": {"connect_s": CONNECT_S, "recv_s": RECV_S, **timeouts},
        "tls": tls_section(clients),
    }
    return cc.write_config(path, raw)


def make_certs(config, clients="owner,user,user-bob,user-carol"):
    assert launch_main(["--config", str(config), "certs", "--clients", clients]) == 0


def start(config, log_dir, party=None, env=None):
    """A launcher process (with ``env``, else this process's environment); its output goes to
    log_dir/launcher[-PARTY].out (read it with `output`)."""
    cmd = [*module_command("cipherdm_spu.cluster"), "--config", str(config), "--log-dir", str(log_dir)]
    if party:
        cmd += ["--party", party]
    log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = open(log_dir / f"launcher{'-' + party if party else ''}.out", "a")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    proc.output_path = out.name
    return proc


def output(proc) -> str:
    with open(proc.output_path) as f:
        return f.read()


def wait_up(config, procs, parties=("P0", "P1", "P2"), limit_s=120, identity="user"):
    cluster = cc.load(config)
    deadline = time.monotonic() + limit_s
    with PartyClients(cluster, identity) as clients:
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a launcher exited early:\n{output(p)}")
            replies = dict(zip((p.id for p in cluster.parties), clients.hello(timeout=1.0)))
            if all(not isinstance(replies[p], str) and not replies[p].busy for p in parties):
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


@contextlib.contextmanager
def running_cluster(directory, **timeouts):
    """Certificates, then the three parties started together by one `spu-launch`; yields the config path."""
    config = write_config(directory / "3pc.json", **timeouts)
    make_certs(config)
    launcher = start(config, directory / "logs")
    try:
        wait_up(config, [launcher])
        yield config, launcher
    finally:
        stop([launcher])
