"""The command line of scripts/run_sd.py: Stable Diffusion with the UNet under MPC, the rest on the user's side.

Outputs (in --out): image.png, latent.npy (the revealed final latent), report.json, spu.log (embedded
session), and with --compare plaintext.png / plaintext_latent.npy; with --reference the diffusers
pipeline's latent (reference_latent.npy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cipherdm_spu.models import ConfigError, DDIMSampler, ScheduleConfig, UNet2DConditionModel
from cipherdm_spu.models.schedulers import SchedulerConfigError

from . import cluster_config, quality, registry, stable_diffusion
from .registry import ProtocolError, available_protocol_sets
from .sampling import SecureDiffusion, sample_plaintext, text_condition
from .sampling_cli import UsageError, _parse_overrides, _write_atomic, image_grid
from .session import SecureSession, SessionError

MAX_BATCH = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_sd.py",
        description="Stable Diffusion with the UNet secret-shared among three SPU parties (ABY3). The prompt is "
                    "encoded and the final latent decoded on this machine, in plaintext: the prompt never leaves "
                    "it, and only the final latent is revealed, to this machine.",
    )
    p.add_argument("--model", type=Path, required=True,
                   help="local diffusers Stable Diffusion directory (unet/, text_encoder/, tokenizer/, vae/, scheduler/)")
    p.add_argument("--prompt", required=True, help="the text prompt (stays on this machine)")
    p.add_argument("--negative-prompt", default="", help="prompt for the unconditional branch of guidance (default: empty)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the UNet's sample size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the UNet's sample size)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (default: 10)")
    p.add_argument("--guidance-scale", type=float, default=7.5,
                   help="classifier-free guidance scale; <= 1 turns guidance off (default: 7.5)")
    p.add_argument("--batch", type=int, default=1, help=f"images per run, 1..{MAX_BATCH} (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latent noise (default: 0)")
    p.add_argument("--protocol", default="cipherdm",
                   help=f"protocol set: {' | '.join(available_protocol_sets())} (default: cipherdm)")
    p.add_argument("--override", action="append", default=[], metavar="OP=KERNEL",
                   help="per-op kernel override, e.g. --override softmax=jax (repeatable)")
    p.add_argument("--cluster", type=Path, default=None, metavar="CONFIG",
                   help="run the UNet on the three-party cluster of this config (spu-launch) instead of in this process")
    p.add_argument("--plaintext", action="store_true", help="run the same port without MPC (no session at all)")
    p.add_argument("--compare", action="store_true",
                   help="also sample in plaintext from the same noise; report latent difference and image PSNR/SSIM")
    p.add_argument("--reference", action="store_true",
                   help="also run diffusers' StableDiffusionPipeline from the same noise and report the port's difference")
    p.add_argument("--out", type=Path, default=Path("runs") / "sd", help="output directory (default: runs/sd)")
    return p


def prepare(args):
    """Validate everything before any work; returns (model, params, sampler, latent shape, overrides)."""
    try:
        stable_diffusion.check_directory(args.model)
        scale = stable_diffusion.vae_scale_factor(args.model)
        model, params = UNet2DConditionModel.from_pretrained(args.model / "unet")
        schedule = ScheduleConfig.from_file(args.model / "scheduler" / "scheduler_config.json")
    except (stable_diffusion.StableDiffusionDirError, ConfigError, SchedulerConfigError) as err:
        raise UsageError(f"cannot load --model {args.model}: {err}") from None
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if not 1 <= args.steps <= schedule.num_train_timesteps:
        raise UsageError(f"--steps must be in 1..{schedule.num_train_timesteps}, got {args.steps}")
    if not 1 <= args.batch <= MAX_BATCH:
        raise UsageError(f"--batch must be in 1..{MAX_BATCH}, got {args.batch}")
    if args.guidance_scale < 0:
        raise UsageError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    size = model.config.sample_size
    default_h, default_w = (size, size) if isinstance(size, int) else size
    multiple = scale * 2 ** (len(model.config.block_out_channels) - 1)
    dims = []
    for name, value, default in (("--height", args.height, default_h * scale), ("--width", args.width, default_w * scale)):
        value = default if value is None else value
        if value <= 0 or value % multiple:
            raise UsageError(f"{name} must be a positive multiple of {multiple} for this model, got {value}")
        dims.append(value // scale)
    overrides = _parse_overrides(args.override)
    try:
        registry.validate(registry.resolve(args.protocol, overrides))
    except ProtocolError as err:
        raise UsageError(str(err)) from None
    if args.cluster is not None:
        if args.plaintext:
            raise UsageError("--cluster and --plaintext exclude each other")
        try:
            args.cluster = cluster_config.load(args.cluster)
        except cluster_config.ClusterConfigError as err:
            raise UsageError(f"--cluster: {err}") from None
    sampler = DDIMSampler(schedule, args.steps)
    shape = (args.batch, model.config.in_channels, *dims)
    return model, params, sampler, shape, overrides


def run(args) -> dict:
    model, params, sampler, shape, overrides = prepare(args)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    uncond, cond = stable_diffusion.encode_prompts(args.model, args.prompt, args.negative_prompt, args.batch)
    context = text_condition(uncond, cond, args.guidance_scale)  # the user's, secret-shared below
    latents_t = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    report = {
        "prompt_left_this_machine": False, "model": str(args.model), "steps": sampler.num_steps,
        "timesteps": [int(t) for t in sampler.timesteps], "guidance_scale": args.guidance_scale,
        "batch": args.batch, "latent_shape": list(shape), "seed": args.seed,
    }

    def plaintext(desc):
        with tqdm(total=sampler.num_steps, desc=desc, unit="step") as bar:
            return sample_plaintext(model, params, sampler, latents_t, context=context,
                                    guidance_scale=args.guidance_scale, progress=lambda i: bar.update())

    if args.plaintext:
        latents = plaintext("plaintext port")
        report["mode"] = "plaintext (no MPC)"
    else:
        if args.cluster is None:
            session = SecureSession(args.protocol, overrides, log_file=str(args.out / "spu.log"))
        else:
            session = SecureSession(args.protocol, overrides, cluster=args.cluster)
        with session:
            diffusion = SecureDiffusion(session, model, params, sampler, guidance_scale=args.guidance_scale)
            bar = tqdm(total=sampler.num_steps, desc=f"secure SD UNet ({session.protocol.name})", unit="step")

            def on_step(step):
                bar.set_postfix_str(f"{step.seconds:.1f} s/step, {step.bytes_sent / 1e6:.0f} MB sent")
                bar.update()

            latents, total, steps = diffusion.sample(latents_t, step_noise=None, on_step=on_step, context=context)
            bar.close()
            diffusion.close()
        report.update({
            "mode": "secure", "protocol": session.protocol.name, "overrides": overrides,
            "parties": "embedded (one process)" if args.cluster is None else f"cluster {args.cluster.source}",
            "mpc_seconds": round(total.seconds, 3), "bytes_sent": total.bytes_sent,
            "bytes_sent_per_party": total.bytes_sent_per_party, "send_actions": total.send_actions,
            "per_step": [vars(s) for s in steps],
        })
    images = stable_diffusion.decode_latents(args.model, latents)
    report["seconds"] = round(time.perf_counter() - started, 3)
    if args.compare and not args.plaintext:
        plain = plaintext("plaintext port")
        plain_images = stable_diffusion.decode_latents(args.model, plain)
        report["max_abs_latent_diff_vs_plaintext"] = float(np.abs(latents - plain).max())
        report["psnr_vs_plaintext"] = quality.psnr(images, plain_images)
        report["ssim_vs_plaintext"] = quality.ssim(images, plain_images)
        _write_atomic(args.out / "plaintext_latent.npy", lambda p: np.save(open(p, "wb"), plain))
        _write_atomic(args.out / "plaintext.png", lambda p: image_grid(plain_images, columns=4, scale=1).save(p, format="PNG"))
    if args.reference:
        reference = stable_diffusion.reference_latents(args.model, args.prompt, args.negative_prompt, latents_t,
                                                       sampler.num_steps, args.guidance_scale)
        report["max_abs_latent_diff_vs_diffusers"] = float(np.abs(latents - reference).max())
        _write_atomic(args.out / "reference_latent.npy", lambda p: np.save(open(p, "wb"), reference))
    _write_atomic(args.out / "latent.npy", lambda p: np.save(open(p, "wb"), latents))
    _write_atomic(args.out / "image.png", lambda p: image_grid(images, columns=4, scale=1).save(p, format="PNG"))
    _write_atomic(args.out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    return report


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except SessionError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    summary = f"{report['batch']} image(s), {report['steps']} steps, {report['seconds']:.0f} s"
    if "bytes_sent" in report:
        summary += f", {report['bytes_sent'] / 1e9:.2f} GB sent (all parties)"
    print(summary + f" -> {args.out}")
    return 0
