"""The command line of scripts/run_sd.py: Stable Diffusion with the UNet under MPC, the rest on the user's side.

Outputs (in --out, created 0700; files 0600): image.png, latent.npy (the revealed final latent), report.json,
spu.log (embedded session), and with --compare plaintext.png / plaintext_latent.npy; with --reference the
diffusers pipeline's latent (reference_latent.npy). With --cluster this process is the user only: --model
needs only the user's parts (tokenizer/, text_encoder/, vae/); the UNet is the owner's upload (--model-id).
The user's image inputs (--controlnet/--control-image, --init-image/--strength) are read in `sd_images`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import quality, sd_images, stable_diffusion
from .cli_common import (UserArgumentParser, add_secure_options, check_finite, check_secure_options, cluster_model,
                         private_output_dir, run_main, secure_sample, write_array, write_json, write_private)
from .errors import UsageError
from .models import ConfigError
from .models.schedulers import SchedulerConfigError
from .stable_diffusion import StableDiffusionDirError
from .models import ControlledUNet, ScheduleConfig, UNet2DConditionModel, schedulers
from .models.img2img import noised_latent
from .sampling import noise_generator, sample_plaintext, text_condition
from .sampling_cli import image_grid

MAX_BATCH = 8


def build_parser() -> UserArgumentParser:
    p = UserArgumentParser(
        prog="run_sd.py",
        description="Stable Diffusion with the UNet secret-shared among three SPU parties (ABY3). The prompt is "
                    "encoded and the final latent decoded on this machine, in plaintext: the prompt never leaves "
                    "it, and only the final latent is revealed, to this machine.",
        secrets="--prompt, --negative-prompt and --seed",
    )
    p.add_argument("--model", type=Path, required=True,
                   help="local diffusers Stable Diffusion directory (unet/, text_encoder/, tokenizer/, vae/, scheduler/)")
    p.add_argument("--prompt", required=True, help="the text prompt (stays on this machine)")
    p.add_argument("--negative-prompt", default="", help="prompt for the unconditional branch of guidance (default: empty)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the UNet's sample size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the UNet's sample size)")
    p.add_argument("--scheduler", choices=schedulers.SCHEDULERS, default=None,
                   help="sampler: ddim | ddpm | dpmsolver++ (DPM-Solver++, multistep) | unipc (UniPC), with its options from "
                        "the directory's scheduler config (default: the sampler that config names; ddim for one we do "
                        "not sample with, e.g. PNDM)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps = UNet evaluations (default: 10)")
    p.add_argument("--guidance-scale", type=float, default=7.5,
                   help="classifier-free guidance scale; <= 1 turns guidance off (default: 7.5)")
    p.add_argument("--batch", type=int, default=1, help=f"images per run, 1..{MAX_BATCH} (default: 1)")
    sd_images.add_options(p)
    add_secure_options(p, "sd")
    p.add_argument("--plaintext", action="store_true", help="run the same port without MPC (no session at all)")
    p.add_argument("--compare", action="store_true",
                   help="also sample in plaintext from the same noise; report latent difference and image PSNR/SSIM")
    p.add_argument("--reference", action="store_true",
                   help="also run diffusers' pipeline (StableDiffusionPipeline, or with --controlnet the ControlNet one, "
                        "with --init-image the Img2Img one) from the same noise and report the port's difference")
    return p


def prepare(args):
    """Validate everything before any work; returns (model, params or None, sampler, latent shape, overrides, job,
    the user's image inputs)."""
    if args.cluster is not None and args.plaintext:
        raise UsageError("--cluster and --plaintext exclude each other")
    if args.cluster is not None and args.reference:
        raise UsageError("--reference needs the owner's UNet, which a user of a cluster does not hold")
    overrides = check_secure_options(args)
    sd_images.check_options(args)
    missing = stable_diffusion.missing_user_packages()
    if missing:
        raise UsageError(f"the prompt encoder and the VAE run on {', '.join(missing)}, not installed here: "
                         "pip install -e '.[sd]'")
    try:
        stable_diffusion.check_directory(args.model, user_only=args.cluster is not None)
        scale = stable_diffusion.vae_scale_factor(args.model)
        if args.cluster is None:
            model, params = UNet2DConditionModel.from_pretrained(args.model / "unet")
            scheduler_config = stable_diffusion.scheduler_config(args.model)
        else:
            manifest, model = cluster_model(args)
            if not isinstance(model, (UNet2DConditionModel, ControlledUNet)):
                raise UsageError(f"model {args.model_id} is a {manifest['kind']}; use run_ddim.py for it")
            params, scheduler_config = None, manifest["scheduler"]
        schedule = ScheduleConfig.from_dict(scheduler_config)
    except (StableDiffusionDirError, ConfigError, SchedulerConfigError) as err:
        raise UsageError(f"cannot load --model {args.model}: {err}") from None
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if not 1 <= args.steps <= schedule.num_train_timesteps:
        raise UsageError(f"--steps must be in 1..{schedule.num_train_timesteps}, got {args.steps}")
    if not 1 <= args.batch <= MAX_BATCH:
        raise UsageError(f"--batch must be in 1..{MAX_BATCH}, got {args.batch}")
    check_finite("--guidance-scale", args.guidance_scale, low=0.0)
    size = model.config.sample_size
    default_h, default_w = (size, size) if isinstance(size, int) else size
    multiple = scale * 2 ** (len(model.config.block_out_channels) - 1)
    dims = []
    height, width = sd_images.init_size(args, scale)
    for name, value, default in (("--height", height, default_h * scale), ("--width", width, default_w * scale)):
        value = default if value is None else value
        if value <= 0 or value % multiple:
            raise UsageError(f"{name} must be a positive multiple of {multiple} for this model, got {value}")
        dims.append(value // scale)
    name = args.scheduler or schedulers.default_scheduler(scheduler_config, "ddim")
    try:
        sampler = schedulers.make_sampler(name, schedule, args.steps, options=scheduler_config)
    except SchedulerConfigError as err:
        raise UsageError(f"--scheduler {name}: {err}") from None
    if args.reference and sampler.noisy:
        raise UsageError(f"--reference needs a sampler without per-step noise (diffusers draws its own), not {name}")
    shape = (args.batch, model.config.in_channels, *dims)
    model, params, sampler, images = sd_images.prepare(args, model, params, sampler, shape, scale)
    job = {"sampler": name, "steps": args.steps, "batch": args.batch, "protocol_set": args.protocol,
           "overrides": overrides, "guidance_scale": float(args.guidance_scale)}
    if images.init is not None:
        job["strength"] = float(args.strength)  # the parties run the last int(steps * strength) steps
    if images.control is not None:
        job.update({"controlnet_scale": model.conditioning_scale, "guess_mode": model.guess_mode})
    return model, params, sampler, shape, overrides, job, images


def run(args) -> dict:
    model, params, sampler, shape, overrides, job, user_images = prepare(args)
    args.out = private_output_dir(args.out)
    started = time.perf_counter()
    uncond, cond = stable_diffusion.encode_prompts(args.model, args.prompt, args.negative_prompt, args.batch)
    context = text_condition(uncond, cond, args.guidance_scale)  # the user's, secret-shared below
    if user_images.control is not None:
        context = context + (user_images.control,)  # the control image: the user's, secret-shared too
    rng = noise_generator(args.seed)
    latents_t = noise = rng.standard_normal(shape).astype(np.float32)
    if user_images.init is not None:  # image-to-image: encoded and noised here; only the noised latent is shared
        init_latents = sd_images.encode_image(args.model, user_images.init)
        latents_t = noised_latent(sampler, init_latents, noise)
    step_noise = rng.standard_normal((sampler.num_steps, *shape)).astype(np.float32) if sampler.noisy else None
    report = {
        "prompt_left_this_machine": False, "model": str(args.model), "sampler": job["sampler"], "steps": sampler.num_steps,
        "timesteps": [int(t) for t in sampler.timesteps], "guidance_scale": args.guidance_scale,
        "batch": args.batch, "latent_shape": list(shape), "seed": args.seed,
    }
    if user_images.control is not None:
        controlnet = str(args.controlnet) if args.controlnet else f"the owner's, with model {args.model_id}"
        report.update({"controlnet": controlnet, "control_image_left_this_machine": False,
                       "controlnet_scale": model.conditioning_scale, "guess_mode": model.guess_mode})
    if user_images.init is not None:
        report.update({"init_image_left_this_machine": False, "strength": args.strength,
                       "first_timestep": int(sampler.timesteps[0])})

    def plaintext(desc):
        with tqdm(total=sampler.num_steps, desc=desc, unit="step") as bar:
            return sample_plaintext(model, params, sampler, latents_t, step_noise=step_noise, context=context,
                                    guidance_scale=args.guidance_scale, progress=lambda i: bar.update())

    if args.plaintext:
        latents = plaintext("plaintext port")
        report["mode"] = "plaintext (no MPC)"
    else:
        job["tokens"] = int(context[0].shape[1])
        latents, total, steps, where = secure_sample(
            args, f"secure SD UNet, {job['sampler']} ({args.protocol})", sampler, latents_t, overrides, job, model, params,
            condition=context, step_noise=step_noise, guidance_scale=args.guidance_scale)
        report.update({
            "mode": "secure", "protocol": args.protocol, "overrides": overrides, "parties": where,
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
        write_array(args.out / "plaintext_latent.npy", plain)
        write_private(args.out / "plaintext.png", lambda f: image_grid(plain_images, columns=4, scale=1).save(f, format="PNG"))
    if args.reference:
        if user_images.control is not None:
            reference = sd_images.reference_controlnet_latents(
                args.model, args.controlnet, args.prompt, args.negative_prompt, latents_t, user_images.control,
                args.steps, args.guidance_scale, model.conditioning_scale, model.guess_mode)
        elif user_images.init is not None:
            reference = sd_images.reference_img2img_latents(args.model, args.prompt, args.negative_prompt, init_latents,
                                                            noise, args.steps, args.strength, args.guidance_scale)
        else:
            reference = stable_diffusion.reference_latents(args.model, args.prompt, args.negative_prompt, latents_t,
                                                           sampler.num_steps, args.guidance_scale, job["sampler"])
        report["max_abs_latent_diff_vs_diffusers"] = float(np.abs(latents - reference).max())
        write_array(args.out / "reference_latent.npy", reference)
    write_array(args.out / "latent.npy", latents)
    write_private(args.out / "image.png", lambda f: image_grid(images, columns=4, scale=1).save(f, format="PNG"))
    write_json(args.out / "report.json", report)
    return report


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def summary(report: dict) -> str:
        text = f"{report['batch']} image(s), {report['steps']} steps, {report['seconds']:.0f} s"
        if "bytes_sent" in report:
            text += f", {report['bytes_sent'] / 1e9:.2f} GB sent (all parties)"
        return text + f" -> {args.out}"

    return run_main(parser, run, args, summary)
