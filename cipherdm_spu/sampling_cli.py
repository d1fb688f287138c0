"""The command line of scripts/run_ddim.py and scripts/run_ddpm.py: validate, sample securely, report.

Outputs (in --out): samples.png (a grid), samples.npy, report.json, spu.log (SPU's own log; with
--cluster each party keeps its own), and with
--compare plaintext.png / plaintext.npy. Everything is validated before anything is shared; the result
files are written only when sampling has finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cipherdm_spu.models import ConfigError, DDIMSampler, DDPMSampler, ScheduleConfig, UNet2DModel
from cipherdm_spu.models.schedulers import SchedulerConfigError

from . import cluster_config, quality, registry
from .registry import ProtocolError, available_protocol_sets
from .sampling import SecureDiffusion, draw_noise, sample_plaintext
from .session import SecureSession, SessionError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "checkpoints" / "mnist-ddpm-silu"
MAX_BATCH = 64
DEFAULTS = {  # chosen so that a default run takes a few minutes on 2 cores (see docs/results/secure_sampling.md)
    "ddim": {"steps": 10, "labels": "1,4,7"},
    "ddpm": {"steps": 20, "labels": "2,8"},
}


class UsageError(ValueError):
    """Bad command-line input: reported with the script's usage and exit status 2."""


def build_parser(kind: str) -> argparse.ArgumentParser:
    name = "DDIM" if kind == "ddim" else "ancestral DDPM"
    p = argparse.ArgumentParser(
        prog=f"run_{kind}.py",
        description=f"Secure {name} sampling in a three-party SPU session (ABY3): the model owner's weights and "
                    "the user's noise and labels stay secret-shared; only the final image is revealed, to the user.",
    )
    d = DEFAULTS[kind]
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="local diffusers-format directory (config.json, diffusion_pytorch_model.safetensors, "
                        "scheduler_config.json; or a pipeline with unet/ and scheduler/) (default: the shipped MNIST SiLU model)")
    p.add_argument("--labels", default=None,
                   help=f"comma-separated class labels to draw, cycled to --batch (default: {d['labels']}; "
                        "only for class-conditional models)")
    p.add_argument("--batch", type=int, default=None, help="samples per run (default: the number of labels, or 1)")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"sampling steps (default: {d['steps']})")
    if kind == "ddim":
        p.add_argument("--eta", type=float, default=0.0, help="DDIM eta; > 0 adds user-supplied noise per step (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the user's noise (default: 0)")
    p.add_argument("--protocol", default="cipherdm",
                   help=f"protocol set: {' | '.join(available_protocol_sets())} (default: cipherdm)")
    p.add_argument("--override", action="append", default=[], metavar="OP=KERNEL",
                   help="per-op kernel override, e.g. --override softmax=jax or --override silu=cipherdm-paper (repeatable)")
    p.add_argument("--cluster", type=Path, default=None, metavar="CONFIG",
                   help="run on the three-party cluster of this config (started with spu-launch) "
                        "instead of three parties in this process")
    p.add_argument("--out", type=Path, default=Path("runs") / kind, help=f"output directory (default: runs/{kind})")
    p.add_argument("--compare", action="store_true",
                   help="also sample in plaintext from the same noise and report PSNR/SSIM and classifier labels")
    return p


def _parse_overrides(items) -> dict:
    overrides = {}
    for item in items:
        op, sep, kernel = item.partition("=")
        if not sep or not op or not kernel:
            raise UsageError(f"--override expects OP=KERNEL, got {item!r}")
        overrides[op.strip()] = kernel.strip()
    return overrides


def _model_dirs(path: Path) -> tuple[Path, Path]:
    """(unet directory, scheduler config) for a model directory or a diffusers pipeline directory."""
    if (path / "unet").is_dir():
        return path / "unet", path / "scheduler" / "scheduler_config.json"
    return path, path / "scheduler_config.json"


def _labels(args, num_classes) -> tuple[list | None, int]:
    if num_classes is None:
        if args.labels is not None:
            raise UsageError("--labels given, but the model is not class-conditional")
        batch = 1 if args.batch is None else args.batch
        labels = None
    else:
        text = args.labels if args.labels is not None else DEFAULTS[args.kind]["labels"]
        try:
            given = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--labels must be comma-separated integers, got {text!r}") from None
        if not given or any(not 0 <= v < num_classes for v in given):
            raise UsageError(f"--labels must be in 0..{num_classes - 1}, got {text!r}")
        batch = len(given) if args.batch is None else args.batch
        labels = [given[i % len(given)] for i in range(max(batch, 0))]
    if not 1 <= batch <= MAX_BATCH:
        raise UsageError(f"--batch must be in 1..{MAX_BATCH}, got {batch}")
    return labels, batch


def prepare(args):
    """Validate everything; returns (model, params, sampler, labels, batch, session overrides)."""
    unet_dir, scheduler_path = _model_dirs(args.model)
    try:
        model, params = UNet2DModel.from_pretrained(unet_dir)
    except ConfigError as err:
        raise UsageError(f"cannot load --model {args.model}: {err}") from None
    if not scheduler_path.is_file():
        raise UsageError(f"no scheduler config at {scheduler_path}")
    try:
        schedule = ScheduleConfig.from_file(scheduler_path)
    except SchedulerConfigError as err:
        raise UsageError(str(err)) from None
    if not 1 <= args.steps <= schedule.num_train_timesteps:
        raise UsageError(f"--steps must be in 1..{schedule.num_train_timesteps}, got {args.steps}")
    if args.kind == "ddim":
        if args.eta < 0:
            raise UsageError(f"--eta must be >= 0, got {args.eta}")
        sampler = DDIMSampler(schedule, args.steps, eta=args.eta)
    else:
        sampler = DDPMSampler(schedule, args.steps)
    labels, batch = _labels(args, model.config.num_class_embeds)
    overrides = _parse_overrides(args.override)
    try:
        registry.validate(registry.resolve(args.protocol, overrides))
    except ProtocolError as err:
        raise UsageError(str(err)) from None
    if args.cluster is not None:
        try:
            args.cluster = cluster_config.load(args.cluster)
        except cluster_config.ClusterConfigError as err:
            raise UsageError(f"--cluster: {err}") from None
    return model, params, sampler, labels, batch, overrides


def image_grid(images: np.ndarray, columns: int = 8, scale: int = 4):
    """A PIL image of (N, C, H, W) samples in [-1, 1], ``columns`` per row, upscaled for viewing."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // columns)
    cols = min(n, columns)
    pixels = ((np.clip(images, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    grid = np.zeros((rows * (h + 2), cols * (w + 2), c), np.uint8)
    for i, img in enumerate(pixels):
        r, col = divmod(i, columns)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = img
    mode = "L" if c == 1 else "RGB"
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid, mode)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def _judge(images, labels) -> dict | None:
    """Classifier verdicts for MNIST-shaped samples (None for other models)."""
    if images.shape[1:] != (1, 28, 28) or not (quality.CLASSIFIER_DIR / "model.safetensors").is_file():
        return None
    probs, _ = quality.DigitJudge.load()(images)
    verdict = {"classifier_labels": probs.argmax(1).tolist(), "classifier_confidences": probs.max(1).round(4).tolist()}
    if labels is not None:
        verdict["conditional_accuracy"] = quality.conditional_accuracy(probs, labels)
    return verdict


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    os.replace(tmp, path)


def run(args) -> dict:
    model, params, sampler, labels, batch, overrides = prepare(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cluster is None:
        session = SecureSession(args.protocol, overrides, log_file=str(args.out / "spu.log"))
    else:  # each party logs on its own host
        session = SecureSession(args.protocol, overrides, cluster=args.cluster)
    shape = (batch, model.config.in_channels, *_sample_size(model))
    x_t, step_noise = draw_noise(args.seed, sampler, shape)
    started = time.perf_counter()
    with session:
        diffusion = SecureDiffusion(session, model, params, sampler)
        bar = tqdm(total=sampler.num_steps, desc=f"secure {args.kind} ({session.protocol.name})", unit="step")

        def on_step(report):
            bar.set_postfix_str(f"{report.seconds:.1f} s/step, {report.bytes_sent / 1e6:.0f} MB sent")
            bar.update()

        images, total, steps = diffusion.sample(x_t, labels, step_noise, on_step=on_step)
        bar.close()
    wall = time.perf_counter() - started
    report = {
        "sampler": args.kind, "protocol": session.protocol.name, "overrides": overrides, "model": str(args.model),
        "parties": "embedded (one process)" if args.cluster is None else f"cluster {args.cluster.source}",
        "steps": sampler.num_steps, "timesteps": [int(t) for t in sampler.timesteps], "batch": batch,
        "seed": args.seed, "requested_labels": labels,
        "seconds": round(wall, 3), "mpc_seconds": round(total.seconds, 3),
        "bytes_sent": total.bytes_sent, "bytes_sent_per_party": total.bytes_sent_per_party,
        "send_actions": total.send_actions, "send_actions_per_party": total.send_actions_per_party,
        "per_step": [vars(s) for s in steps],
        "pphlo_ops": {k: v.bytes_sent for k, v in sorted(total.kernels.items(), key=lambda kv: -kv[1].bytes_sent)},
    }
    if args.kind == "ddim":
        report["eta"] = args.eta
    secure_verdict = _judge(images, labels)
    if secure_verdict:
        report["secure"] = secure_verdict
    plain = None
    if args.compare:
        with tqdm(total=sampler.num_steps, desc="plaintext", unit="step") as pbar:
            plain = sample_plaintext(model, params, sampler, x_t, labels, step_noise, progress=lambda i: pbar.update())
        report["psnr_vs_plaintext"] = quality.psnr(images, plain)
        report["ssim_vs_plaintext"] = quality.ssim(images, plain)
        report["max_abs_diff_vs_plaintext"] = float(np.abs(images - plain).max())
        plain_verdict = _judge(plain, labels)
        if plain_verdict:
            report["plaintext"] = plain_verdict
    _write_atomic(args.out / "samples.npy", lambda p: np.save(open(p, "wb"), images))
    _write_atomic(args.out / "samples.png", lambda p: image_grid(images).save(p, format="PNG"))
    if plain is not None:
        _write_atomic(args.out / "plaintext.npy", lambda p: np.save(open(p, "wb"), plain))
        _write_atomic(args.out / "plaintext.png", lambda p: image_grid(plain).save(p, format="PNG"))
    _write_atomic(args.out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    return report


def _sample_size(model) -> tuple[int, int]:
    size = model.config.sample_size
    if size is None:
        raise UsageError("the model config has no sample_size")
    return (size, size) if isinstance(size, int) else tuple(size)


def main(kind: str, argv=None) -> int:
    parser = build_parser(kind)
    args = parser.parse_args(argv)
    args.kind = kind
    try:
        report = run(args)
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except SessionError as err:  # a cluster party unreachable, mismatched or lost mid-run
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    summary = f"{report['batch']} samples, {report['steps']} steps, {report['seconds']:.0f} s, " \
              f"{report['bytes_sent'] / 1e9:.2f} GB sent (all parties) -> {args.out}"
    if "psnr_vs_plaintext" in report:
        summary += f"; PSNR vs plaintext {report['psnr_vs_plaintext']:.1f} dB"
    print(summary)
    return 0
