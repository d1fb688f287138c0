#!/usr/bin/env python
"""How long compiling the shipped MNIST SiLU model's denoising step takes, with the compile cache empty and full.

For each protocol set, in a fresh cache directory: the step compiled by one session (JAX's lowering, SPU's compile,
the entry stored), then by a second session (its lowering, the entry read back), then run once for scale. The
executables must be the same bytes (the script checks it). Then, as a cluster's user waits for it, unless --quick:
two identical one-step jobs on a loopback cluster (three party processes on this machine, sharing one fresh cache),
each job's seconds from the user's first call to its result: the first job's parties compile the step, the second's
read it. Writes docs/results/compile_cache.{md,json}.

    python scripts/compile_cache_times.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "checkpoints" / "mnist-ddpm-silu"


@contextlib.contextmanager
def fresh_cache():
    """A folder whose fresh cache this process (and the processes it starts) compiles with, until the block ends."""
    from cipherdm_spu import compile_cache

    before = os.environ.get(compile_cache.ENV)
    with tempfile.TemporaryDirectory(prefix="cipherdm-compile-times-") as folder:
        os.environ[compile_cache.ENV] = str(Path(folder) / "executables")
        try:
            yield Path(folder)
        finally:
            if before is None:
                del os.environ[compile_cache.ENV]
            else:
                os.environ[compile_cache.ENV] = before


def measure(protocol_sets, model_dir: Path) -> dict:
    from cipherdm_spu import SecureSession
    from cipherdm_spu.benchmark import mnist_step_case

    case = mnist_step_case(model_dir, 1, 0)
    rows = {}
    for name in protocol_sets:
        with fresh_cache():
            seconds, codes = [], []
            for _ in ("empty", "full"):
                with SecureSession(name) as session:
                    weights = session.share(case.weights)
                    started = time.perf_counter()
                    codes.append(session.compile(case.secure_fn, weights, *case.inputs).code)
                    seconds.append(time.perf_counter() - started)
                    if len(codes) == 2:
                        session.run(case.secure_fn, weights, *case.inputs)
                        step_seconds = session.last_stats.seconds
            if codes[0] != codes[1]:
                raise RuntimeError(f"{name}: the executable read back differs from the one compiled")
        rows[name] = {"empty_cache_s": seconds[0], "full_cache_s": seconds[1], "step_run_s": step_seconds,
                      "executable_bytes": len(codes[0])}
    return rows


def measure_cluster(protocol_sets, model_dir: Path) -> dict:
    """Per protocol set, the seconds of two identical one-step DDIM jobs (batch 1) on a fresh loopback cluster whose
    parties share a fresh cache."""
    from cipherdm_spu import cluster_config
    from cipherdm_spu.cli_common import load_model_dir
    from cipherdm_spu.client import PartyClients
    from cipherdm_spu.cluster import loopback_cluster
    from cipherdm_spu.jobs import sample_on_cluster, upload_model
    from cipherdm_spu.models import DDIMSampler, ScheduleConfig, sample_shape
    from cipherdm_spu.plan import Policy
    from cipherdm_spu.sampling import draw_noise, one_hot

    model, params, scheduler = load_model_dir(model_dir)
    x_t, _ = draw_noise(0, DDIMSampler(ScheduleConfig.from_file(model_dir), 1), (1, *sample_shape(model.config)))
    rows = {}
    for name in protocol_sets:
        with fresh_cache() as folder, loopback_cluster(folder / "cluster") as (config, _):  # the parties inherit it
            cluster = cluster_config.load(config)
            with PartyClients(cluster, "owner") as owner:
                upload_model(owner, "mnist", model, params, scheduler, Policy())
            job = {"sampler": "ddim", "steps": 1, "batch": 1, "protocol_set": name}
            seconds, step_seconds = [], []
            for _ in range(2):
                started = time.perf_counter()
                with PartyClients(cluster, "user") as user:
                    _, _, reports = sample_on_cluster(user, "mnist", job, x_t, one_hot([0], 10), owner="owner")
                seconds.append(time.perf_counter() - started)
                step_seconds.append(reports[0].seconds)
        rows[name] = {"first_job_s": seconds[0], "second_job_s": seconds[1], "step_run_s": step_seconds}
    return rows


def render(result: dict, command: str) -> str:
    from cipherdm_spu.results import markdown_table

    rows = [[f"`{name}`", f"{r['empty_cache_s']:.1f}", f"{r['full_cache_s']:.1f}",
             f"{r['empty_cache_s'] / r['full_cache_s']:.1f}x", f"{r['step_run_s']:.1f}",
             f"{r['executable_bytes'] / 1e6:.2f}"] for name, r in result["rows"].items()]
    return "\n".join([
        "# Compiling a denoising step: the compile cache empty and full", "",
        f"Command: `{command}`", "",
        f"Machine: {result['cpus']} CPUs, {result['machine']}. The shipped MNIST SiLU model's step (UNet and DDIM "
        "update, batch 1), compiled by a session in a fresh cache directory (JAX's lowering, SPU's compile, the entry "
        "stored), then by a second session (its lowering, the entry read back: the same executable bytes, checked), "
        "then run once by it (three parties in one process) for scale. Seconds of one run each.", "",
        *markdown_table(["set", "compile, empty cache s", "compile, full cache s", "empty / full", "one step's run s",
                         "executable MB"], rows, align="lrrrrr"),
        "",
        "What remains with a full cache is JAX's lowering of the program and its canonical HLO text "
        "(`cipherdm_spu/compile_cache.py`), which every compile does to find its entry.",
        "",
        *_render_cluster(result.get("cluster")),
    ])


def _render_cluster(cluster) -> list:
    from cipherdm_spu.results import markdown_table

    if not cluster:
        return []
    rows = [[f"`{name}`", f"{r['first_job_s']:.1f}", f"{r['second_job_s']:.1f}",
             f"{r['first_job_s'] - r['second_job_s']:.1f}", " / ".join(f"{s:.1f}" for s in r["step_run_s"])]
            for name, r in cluster.items()]
    return [
        "## A cluster's jobs, as its user waits for them", "",
        "Two identical jobs (DDIM, one step, batch 1) on a loopback cluster: three party processes on this machine, "
        "mutual TLS, sharing one fresh cache (parties on hosts of their own each keep their own). A job's seconds run "
        "from the user's first call to its result: opening the session (each party compiles, audits and agrees on the "
        "step), sharing the input, the step, the result. In the first job one party compiles and the others wait for "
        "its entry; in the second all three read it.", "",
        *markdown_table(["set", "first job s", "second job s", "saved s", "step run s (first / second)"], rows,
                        align="lrrrr"),
        "",
    ]


def main(argv=None) -> int:
    from cipherdm_spu.registry import available_protocol_sets
    from cipherdm_spu.results import write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["spu", "cipherdm"], choices=available_protocol_sets(),
                        help="protocol sets (default: spu cipherdm)")
    parser.add_argument("--model", type=Path, default=MODEL, help=f"a UNet2DModel directory (default: {MODEL})")
    parser.add_argument("--quick", action="store_true", help="skip the cluster's jobs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "compile_cache",
                        help="output path without extension (default: docs/results/compile_cache)")
    args = parser.parse_args(argv)
    result = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "rows": measure(args.sets, args.model)}
    if not args.quick:
        result["cluster"] = measure_cluster(args.sets, args.model)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    command = f"python scripts/compile_cache_times.py {argv_text}".strip()
    result["command"] = command
    write_report(args.out, result, render(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
