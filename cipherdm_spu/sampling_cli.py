"""The command line of scripts/run_ddim.py (any sampler: --scheduler ddim|ddpm|dpmsolver++|unipc; by default the
cheapest that holds DDIM-50's quality on the shipped models) and scripts/run_ddpm.py: validate, sample securely, report.

Outputs (in --out, created 0700; files 0600): samples.png (a grid), samples.npy, report.json, spu.log
(SPU's own log; embedded runs only: each cluster party keeps its own), and with --compare plaintext.png /
plaintext.npy. Everything is validated before anything is shared; the result files are written only when
sampling has finished. With --cluster this process is the user only (see `cli_common`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import quality
from .cli_common import (UserArgumentParser, add_secure_options, check_finite, check_secure_options, cluster_model,
                         model_dirs, private_output_dir, run_main, secure_sample, write_array, write_json,
                         write_private)
from .errors import UsageError
from .models import ConfigError, ScheduleConfig, UNet2DModel, sample_shape, schedulers
from .models.schedulers import SchedulerConfigError
from .sampling import draw_noise, sample_plaintext

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "checkpoints" / "mnist-ddpm-silu"
MAX_BATCH = 64
DEFAULTS = {  # chosen so that a default run takes a few minutes on 2 cores (see docs/results/secure_sampling.md)
    "ddim": {"labels": "1,4,7"},
    "ddpm": {"labels": "2,8"},
}
#: default steps per sampler: DDIM and DDPM as before; the multistep solvers at the fewest UNet evaluations that
#: hold DDIM-50's plaintext quality on both shipped MNIST models (docs/results/solvers.md)
DEFAULT_STEPS = {"ddim": 10, "ddpm": 20, "dpmsolver++": 6, "unipc": 5}
#: run_ddim.py's sampler for a checkpoint whose scheduler config names none we sample with (the shipped MNIST
#: models' DDPMScheduler, which names how they were trained): the cheapest that holds DDIM-50's quality
MAIN_SAMPLER = "unipc"


def build_parser(kind: str) -> UserArgumentParser:
    name = "diffusion (DDIM, DPM-Solver++, UniPC or DDPM)" if kind == "ddim" else "ancestral DDPM"
    p = UserArgumentParser(
        prog=f"run_{kind}.py",
        description=f"Secure {name} sampling in a three-party SPU session (ABY3): the model owner's weights and "
                    "the user's noise and labels stay secret-shared; only the final image is revealed, to the user.",
        secrets="--labels and --seed",
    )
    d = DEFAULTS[kind]
    p.add_argument("--model", type=Path, default=None,
                   help="local diffusers-format directory (config.json, diffusion_pytorch_model.safetensors, "
                        "scheduler_config.json; or a pipeline with unet/ and scheduler/) (default: the shipped MNIST SiLU "
                        "model); not with --cluster, where the parties hold the model --model-id names")
    p.add_argument("--labels", default=None,
                   help=f"comma-separated class labels to draw, cycled to --batch (default: {d['labels']}; "
                        "only for class-conditional models)")
    p.add_argument("--batch", type=int, default=None, help="samples per run (default: the number of labels, or 1)")
    if kind == "ddim":
        p.add_argument("--scheduler", choices=schedulers.SCHEDULERS, default=None,
                       help="sampler: ddim | ddpm | dpmsolver++ (DPM-Solver++, multistep) | unipc (UniPC); its options "
                            "(solver order, ...) come from the model's scheduler config (default: the sampler that config "
                            f"names; for a DDPMScheduler config, as the shipped models have, {MAIN_SAMPLER}, the cheapest "
                            "that holds DDIM-50's quality: docs/results/solvers.md)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps = UNet evaluations (default: " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items() if kind == "ddim" or k == "ddpm") + ")")
    if kind == "ddim":
        p.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]; > 0 adds user-supplied noise per step (default: 0)")
    add_secure_options(p, kind)
    p.add_argument("--compare", action="store_true",
                   help="also sample in plaintext from the same noise and report PSNR/SSIM and classifier labels "
                        "(embedded runs: it needs the owner's weights)")
    return p


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
        if not given:
            raise UsageError("--labels is empty: give comma-separated class labels, such as 3,5")
        if any(not 0 <= v < num_classes for v in given):
            raise UsageError(f"--labels must be in 0..{num_classes - 1}, got {text!r}")
        batch = len(given) if args.batch is None else args.batch
        labels = [given[i % len(given)] for i in range(max(batch, 0))]
    if not 1 <= batch <= MAX_BATCH:
        raise UsageError(f"--batch must be in 1..{MAX_BATCH}, got {batch}")
    return labels, batch


def prepare(args):
    """Validate everything; returns (model, params or None on a cluster, sampler, labels, batch, overrides, job)."""
    if args.cluster is not None and args.model is not None:
        raise UsageError(f"--model is a local model's folder; on a cluster the parties hold the model, which --model-id "
                         f"names, so --model {args.model} would not be sampled")
    overrides = check_secure_options(args)
    if args.cluster is None:
        if args.model is None:
            args.model = DEFAULT_MODEL
        unet_dir, scheduler_path = model_dirs(args.model)
        try:
            model, params = UNet2DModel.from_pretrained(unet_dir)
        except ConfigError as err:
            raise UsageError(f"cannot load --model {args.model}: {err}") from None
        if not scheduler_path.is_file():
            raise UsageError(f"no scheduler config at {scheduler_path}")
        try:
            scheduler_config = json.loads(scheduler_path.read_text())
            schedule = ScheduleConfig.from_dict(scheduler_config)
        except (SchedulerConfigError, json.JSONDecodeError) as err:
            raise UsageError(f"scheduler config {scheduler_path}: {err}") from None
    else:  # the user holds no weights: the public manifest says what the model is
        manifest, model = cluster_model(args)
        if not isinstance(model, UNet2DModel):
            raise UsageError(f"model {args.model_id} is a {manifest['kind']}; use run_sd.py for it")
        scheduler_config = manifest["scheduler"]
        params, schedule = None, ScheduleConfig.from_dict(scheduler_config)
    name = choose_scheduler(args, scheduler_config)
    steps = DEFAULT_STEPS[name] if args.steps is None else args.steps
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise UsageError(f"--steps must be in 1..{schedule.num_train_timesteps}, got {steps}")
    eta = getattr(args, "eta", 0.0)
    check_finite("--eta", eta, low=0.0, high=1.0)
    if eta and name != "ddim":
        raise UsageError(f"--eta is a DDIM option (--scheduler {name})")
    try:
        sampler = schedulers.make_sampler(name, schedule, steps, eta=eta, options=scheduler_config)
    except SchedulerConfigError as err:
        raise UsageError(f"--scheduler {name}: {err}") from None
    try:
        sample_shape(model.config)
    except ConfigError as err:
        named = f"--model {args.model}" if args.cluster is None else f"--model-id {args.model_id}"
        raise UsageError(f"cannot sample {named}: {err}") from None
    labels, batch = _labels(args, model.config.num_class_embeds)
    job = {"sampler": name, "steps": steps, "eta": eta, "batch": batch, "protocol_set": args.protocol,
           "overrides": overrides}
    return model, params, sampler, labels, batch, overrides, job


def choose_scheduler(args, scheduler_config: dict) -> str:
    """--scheduler, or the sampler the model's scheduler config names (run_ddpm.py: always ddpm)."""
    if args.kind == "ddpm":
        return "ddpm"
    if args.scheduler is not None:
        return args.scheduler
    named = schedulers.default_scheduler(scheduler_config, MAIN_SAMPLER)
    return MAIN_SAMPLER if named == "ddpm" else named


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


def run(args) -> dict:
    model, params, sampler, labels, batch, overrides, job = prepare(args)
    args.out = private_output_dir(args.out)
    shape = (batch, *sample_shape(model.config))
    x_t, step_noise = draw_noise(args.seed, sampler, shape)
    started = time.perf_counter()
    images, total, steps, where = secure_sample(
        args, f"secure {job['sampler']} ({args.protocol})", sampler, x_t, overrides, job, model, params, labels, step_noise)
    wall = time.perf_counter() - started
    report = {
        "sampler": job["sampler"], "protocol": args.protocol, "overrides": overrides,
        "model": args.model_id if args.cluster is not None else str(args.model), "parties": where,
        "steps": sampler.num_steps, "timesteps": [int(t) for t in sampler.timesteps], "batch": batch,
        "seed": args.seed, "requested_labels": labels,
        "seconds": round(wall, 3), "mpc_seconds": round(total.seconds, 3),
        "bytes_sent": total.bytes_sent, "bytes_sent_per_party": total.bytes_sent_per_party,
        "send_actions": total.send_actions, "send_actions_per_party": total.send_actions_per_party,
        "per_step": [vars(s) for s in steps],
        "pphlo_ops": {k: v.bytes_sent for k, v in sorted(total.kernels.items(), key=lambda kv: -kv[1].bytes_sent)},
    }
    if job["sampler"] == "ddim":
        report["eta"] = args.eta
    secure_verdict = _judge(images, labels)
    if secure_verdict:
        report["secure"] = secure_verdict
    plain = None
    if args.compare:
        from tqdm import tqdm

        with tqdm(total=sampler.num_steps, desc="plaintext", unit="step") as pbar:
            plain = sample_plaintext(model, params, sampler, x_t, labels, step_noise, progress=lambda i: pbar.update())
        report["psnr_vs_plaintext"] = quality.psnr(images, plain)
        report["ssim_vs_plaintext"] = quality.ssim(images, plain)
        report["max_abs_diff_vs_plaintext"] = float(np.abs(images - plain).max())
        plain_verdict = _judge(plain, labels)
        if plain_verdict:
            report["plaintext"] = plain_verdict
    write_array(args.out / "samples.npy", images)
    write_private(args.out / "samples.png", lambda f: image_grid(images).save(f, format="PNG"))
    if plain is not None:
        write_array(args.out / "plaintext.npy", plain)
        write_private(args.out / "plaintext.png", lambda f: image_grid(plain).save(f, format="PNG"))
    write_json(args.out / "report.json", report)
    return report


def main(kind: str, argv=None) -> int:
    parser = build_parser(kind)
    args = parser.parse_args(argv)
    args.kind = kind

    def summary(report: dict) -> str:
        text = (f"{report['batch']} samples, {report['sampler']} {report['steps']} steps, {report['seconds']:.0f} s, "
                f"{report['bytes_sent'] / 1e9:.2f} GB sent (all parties) -> {args.out}")
        if "secure" in report:  # MNIST-shaped samples: what the classifier reads in them (the files say more)
            text += f"; the classifier reads {','.join(map(str, report['secure']['classifier_labels']))}"
        if "psnr_vs_plaintext" in report:
            text += f"; PSNR vs plaintext {report['psnr_vs_plaintext']:.1f} dB"
        return text

    return run_main(parser, run, args, summary)
