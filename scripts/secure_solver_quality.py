#!/usr/bin/env python
"""Secure samples at one sampler setting, judged beside plaintext from the same noise
-> docs/results/solvers_secure.md.

One embedded session (protocol set `cipherdm` by default) shares the shipped MNIST model once and draws batches
of samples (labels cycling 0..9, x_T from --seed) until --samples are drawn or --minutes have passed; each batch
is also sampled in plaintext from the same noise. Every batch is saved under --runs as it finishes, so a run cut
short still reports what it drew, and the same command run again draws only the batches not yet saved (a batch's
noise depends only on --seed and its first index). A --runs folder holding another setting is refused. Batches
are whole: --samples is rounded up to a multiple of --batch. The report gives conditional accuracy and FID (as scripts/evaluate_mnist.py
measures them) of the secure and the plaintext samples, and bytes, send actions and seconds per sample.

    python scripts/secure_solver_quality.py --scheduler dpmsolver++ --steps 5 --minutes 40
    python scripts/secure_solver_quality.py --scheduler dpmsolver++ --steps 5 --minutes 40   # goes on where it stopped
    python scripts/secure_solver_quality.py --report-only       # the report from the batches saved so far
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from cipherdm_spu import SecureSession, quality
from cipherdm_spu.mnist import load_digits
from cipherdm_spu.models import ScheduleConfig, UNet2DModel
from cipherdm_spu.models.schedulers import SCHEDULERS, make_sampler
from cipherdm_spu.results import markdown_table
from cipherdm_spu.sampling import SecureDiffusion, draw_noise, sample_plaintext
from cipherdm_spu.sampling_cli import image_grid

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "checkpoints" / "mnist-ddpm-silu")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="dpmsolver++")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--protocol", default="cipherdm")
    p.add_argument("--batch", type=int, default=8, help="samples per secure run (default: 8)")
    p.add_argument("--samples", type=int, default=200, help="stop after this many samples (default: 200)")
    p.add_argument("--minutes", type=float, default=40.0, help="start no batch after this many minutes (default: 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "solvers_secure", help="where batches are saved")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--report-only", action="store_true", help="only write the report from the saved batches")
    args = p.parse_args(argv)
    if not args.report_only:
        sample(args, "python scripts/secure_solver_quality.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    report(args)
    return 0


def sample(args, command: str) -> None:
    model, params = UNet2DModel.from_pretrained(args.model)
    config = json.loads((args.model / "scheduler_config.json").read_text())
    sampler = make_sampler(args.scheduler, ScheduleConfig.from_dict(config), args.steps, options=config)
    setting = {"model": args.model.name, "scheduler": args.scheduler, "steps": args.steps, "protocol": args.protocol,
               "batch": args.batch, "seed": args.seed, "timesteps": [int(t) for t in sampler.timesteps]}
    starts = batches_to_draw(args.runs, setting, command, args.samples)
    if not starts:
        print(f"all {args.samples} samples are saved under {args.runs}", file=sys.stderr)
        return
    started = time.time()
    with SecureSession(args.protocol, log_file=str(args.runs / "spu.log")) as session:
        diffusion = SecureDiffusion(session, model, params, sampler)
        for start in starts:
            if (time.time() - started) / 60 > args.minutes:
                break
            labels = np.arange(start, start + args.batch) % 10
            x_t, noise = draw_noise(args.seed * 100_003 + start, sampler, (args.batch, 1, 28, 28))
            t0 = time.perf_counter()
            secure, stats, _ = diffusion.sample(x_t, labels, noise)
            seconds = time.perf_counter() - t0
            plain = sample_plaintext(model, params, sampler, x_t, labels, noise)
            partial = args.runs / f"partial-{start:05d}.npz"  # renamed once complete: a killed run leaves no batch
            np.savez(partial, secure=secure, plain=plain, labels=labels,
                     seconds=seconds, bytes_sent=stats.bytes_sent, send_actions=stats.send_actions)
            os.replace(partial, _batch_file(args.runs, start))
            print(f"batch {start}: {seconds:.0f} s, {stats.bytes_sent / 1e9:.2f} GB", file=sys.stderr, flush=True)
        diffusion.close()


def batches_to_draw(runs: Path, setting: dict, command: str, samples: int) -> list[int]:
    """First indices of the batches of ``setting`` still to draw for ``samples`` samples; when there are any, the
    setting and ``command`` are recorded in ``runs``/setting.json. A folder holding another setting is refused."""
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / "setting.json"
    commands = []
    if path.is_file():
        saved = json.loads(path.read_text())
        commands = saved.pop("commands", [])
        if saved != setting:
            changed = sorted(k for k in setting.keys() | saved.keys() if saved.get(k) != setting.get(k))
            raise SystemExit(f"{runs} holds another setting (differs in {', '.join(changed)}); "
                             "give another --runs folder or remove that one")
    starts = [start for start in range(0, samples, setting["batch"]) if not _batch_file(runs, start).is_file()]
    if starts:
        path.write_text(json.dumps({**setting, "commands": [*commands, command.strip()]}, indent=2) + "\n")
    return starts


def _batch_file(runs: Path, start: int) -> Path:
    return runs / f"batch-{start:05d}.npz"


def report(args) -> None:
    setting = json.loads((args.runs / "setting.json").read_text())
    batches = [np.load(f) for f in sorted(args.runs.glob("batch-*.npz"))]
    secure = np.concatenate([b["secure"] for b in batches])
    plain = np.concatenate([b["plain"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    n = len(labels)
    judge = quality.DigitJudge.load()
    _, heldout_features = judge(load_digits("heldout")[0])
    rows, results = [], {}
    for name, images in (("secure", secure), ("plaintext, same noise", plain)):
        probs, features = judge(images)
        results[name] = {"conditional_accuracy": quality.conditional_accuracy(probs, labels),
                         "fid": quality.fid(features, heldout_features)}
        rows.append([name, n, f"{100 * results[name]['conditional_accuracy']:.1f} %", f"{results[name]['fid']:.2f}"])
    seconds = sum(float(b["seconds"]) for b in batches)
    sent = sum(int(b["bytes_sent"]) for b in batches)
    actions = sum(int(b["send_actions"]) for b in batches)
    results.update({"samples": n, "seconds_per_sample": seconds / n, "bytes_per_sample": sent / n,
                    "send_actions_per_sample": actions / n, "send_actions_per_batch": actions / len(batches),
                    "max_abs_diff_vs_plaintext": float(np.abs(secure - plain).max()),
                    "psnr_vs_plaintext": quality.psnr(secure, plain), **setting})
    (args.out / "solvers_secure.json").write_text(json.dumps(results, indent=2) + "\n")
    image_grid(secure[:40], columns=10, scale=3).save(args.out / "solvers_secure.png")
    lines = [
        f"# Secure samples at {setting['scheduler']} {setting['steps']} steps ({setting['protocol']})", "",
        f"Commands (each run goes on where the last stopped): {', '.join(f'`{c}`' for c in setting['commands'])}, then "
        "`python scripts/secure_solver_quality.py --report-only`. Model "
        f"{setting['model']}, timesteps {setting['timesteps']}, batches of {setting['batch']} in one embedded three-party "
        "session (ABY3, FM64, 18 fraction bits) on this machine's 2 shared CPU cores; labels cycle 0..9; each batch also "
        "sampled in plaintext (float32) from the same noise. Metrics as [mnist_quality.md](mnist_quality.md) (FID on "
        f"{n} samples is biased upwards: compare the two rows with each other, and with [solvers.md](solvers.md) only "
        "roughly).", "",
    ]
    lines += markdown_table(["samples", "count", "conditional accuracy", "FID"], rows, align="lrr")
    fastest = min(float(b["seconds"]) / len(b["labels"]) for b in batches)
    results["seconds_per_sample_fastest_batch"] = fastest
    lines += ["", f"Per sample (secure): {seconds / n:.0f} s (the fastest batch, the one least slowed by other work on "
              f"the machine: {fastest:.0f} s), {sent / n / 1e9:.2f} GB sent (all parties), "
              f"{actions / len(batches):.0f} send actions per batch of {setting['batch']} (the busiest party's; one "
              f"batch's rounds serve all its samples); PSNR vs plaintext {results['psnr_vs_plaintext']:.1f} dB, largest "
              f"pixel difference {results['max_abs_diff_vs_plaintext']:.3f}.", "",
              "![secure samples](solvers_secure.png)"]
    spu_step = _spu_step_bytes(setting["model"])
    if spu_step is not None:
        ratio = 50 * spu_step / (sent / n)
        results["bytes_vs_spu_ddim50"] = ratio
        lines[-1:-1] = [f"Against vanilla `spu` kernels with DDIM-50: its one step of {setting['model']} at batch 1 sends "
                        f"{spu_step / 1e6:.0f} MB ([benchmark.md](benchmark.md)), {50 * spu_step / 1e9:.1f} GB for 50 "
                        f"steps; a sample here sends {ratio:.1f}x fewer bytes "
                        f"({setting['steps']} evaluations instead of 50, and the {setting['protocol']} kernels).", ""]
        (args.out / "solvers_secure.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "solvers_secure.md").write_text("\n".join(lines) + "\n")


def _spu_step_bytes(model: str):
    """Bytes of one vanilla-`spu` step of ``model`` at batch 1 in docs/results/benchmark.json, if it is there."""
    path = REPO / "docs" / "results" / "benchmark.json"
    if not path.is_file():
        return None
    for case in json.loads(path.read_text()).get("step", []):
        if case.get("case") == f"{model} batch 1" and "spu" in case.get("rows", {}):
            return case["rows"]["spu"]["bytes_sent"]
    return None


if __name__ == "__main__":
    sys.exit(main())
