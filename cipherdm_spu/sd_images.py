"""The user's image inputs for Stable Diffusion, prepared on the user's machine before anything is shared.

- ControlNet: the control image (an edge, pose or depth map) is read as the ControlNet expects it, (N, C, H, W)
  in [0, 1] at image resolution, and secret-shared as it is: the ControlNet's conditioning embedding, like the
  rest of the ControlNet and the UNet, runs under MPC. It is checked here (size, channels) so that a wrong one
  fails before any share exists.
- Image-to-image: the user's VAE (public weights, plaintext) encodes the init image to its latent x0 (the mean
  of the VAE's latent distribution, times its scaling factor); the user adds the noise of strength s
  (`models.img2img.noised_latent`) and shares only the noised latent.

On a cluster the ControlNet is the owner's upload (``spu-launch upload --controlnet``): the user passes only the
control image, and the strength, scale and guess mode travel in its public job.

The diffusers pipelines from the same inputs (`reference_*`) are the plaintext references for the tests and
``run_sd.py --reference``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional
from unittest import mock

import numpy as np

from .errors import ConfigError, SchedulerConfigError, UsageError
from .models import ControlledUNet, ControlNetConfig, ControlNetModel, DDIMSampler
from .models.controlnet import check_fits
from .models.img2img import StrengthSampler

#: diffusers' StableDiffusionImg2ImgPipeline default
DEFAULT_STRENGTH = 0.8


def add_options(p: argparse.ArgumentParser) -> None:
    """run_sd.py's options for the user's image inputs."""
    p.add_argument("--init-image", type=Path, default=None, metavar="PNG",
                   help="image-to-image: the image to redraw (stays on this machine: encoded by the local VAE, noised "
                        "to --strength, and only the noised latent is shared); its size is the output's")
    p.add_argument("--strength", type=float, default=None,
                   help=f"with --init-image: how much to redraw, in (0, 1]; denoising starts at step strength * T "
                        f"and runs int(steps * strength) steps (default: {DEFAULT_STRENGTH})")
    p.add_argument("--controlnet", type=Path, default=None, metavar="DIR",
                   help="a local diffusers ControlNetModel directory (config.json + safetensors) for this UNet; its "
                        "weights are shared as the model owner's, and it runs under MPC beside the UNet")
    p.add_argument("--control-image", type=Path, default=None, metavar="PNG",
                   help="with --controlnet (on a cluster: with a model uploaded with a ControlNet): the control image "
                        "(edge, pose, depth map...) at the output's size and the ControlNet's channel count, in [0, 1] "
                        "as the ControlNet expects it; secret-shared, never revealed")
    p.add_argument("--controlnet-scale", type=float, default=None,
                   help="with a ControlNet: the conditioning scale its residuals are multiplied by (default: 1.0)")
    p.add_argument("--guess-mode", action="store_true",
                   help="with a ControlNet: diffusers' guess mode (the ControlNet sees only the conditional branch, "
                        "its residuals weighted 0.1 to 1 from shallow to deep)")


def check_options(args) -> None:
    """Refuse inconsistent image options, before anything is loaded or shared."""
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength is for --init-image")
    if args.init_image is not None:
        if args.strength is None:
            args.strength = DEFAULT_STRENGTH
        if not (np.isfinite(args.strength) and 0.0 < args.strength <= 1.0):
            raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    if args.cluster is None and (args.controlnet is None) != (args.control_image is None):
        raise UsageError("--controlnet and --control-image go together")
    if args.cluster is not None and args.controlnet is not None:
        raise UsageError("on a cluster the ControlNet is the owner's, uploaded with the model "
                         "(spu-launch upload --controlnet): pass --control-image only")
    if args.control_image is None and (args.controlnet_scale is not None or args.guess_mode):
        raise UsageError("--controlnet-scale and --guess-mode are for --controlnet (with --control-image)")
    if args.controlnet_scale is not None and not np.isfinite(args.controlnet_scale):
        raise UsageError(f"--controlnet-scale must be a finite number, got {args.controlnet_scale}")


def init_size(args, scale: int) -> tuple[Optional[int], Optional[int]]:
    """(height, width) in pixels: the init image's, which --height/--width, if given, must equal."""
    if args.init_image is None:
        return args.height, args.width
    height, width = image_size(args.init_image, "--init-image")
    for name, given, have in (("--height", args.height, height), ("--width", args.width, width)):
        if given is not None and given != have:
            raise UsageError(f"{name} {given} differs from the --init-image's {have} (image-to-image keeps its size)")
    return height, width


@dataclasses.dataclass
class ImageInputs:
    """What the user holds for one run: the control image (shared) and the init image (encoded locally)."""

    control: Optional[np.ndarray] = None
    init: Optional[np.ndarray] = None


def prepare(args, model, params, sampler, shape: tuple, scale: int):
    """(model, params, sampler, ImageInputs): the UNet combined with the --controlnet (whose fit is checked) or, on
    a cluster, the owner's UNet + ControlNet with this run's scale; the sampler cut to --strength; the images read
    and checked. Every refusal is a UsageError, before any sharing."""
    if args.reference and args.init_image is not None and args.control_image is not None:
        raise UsageError("--reference has no diffusers pipeline here for --init-image with --controlnet together")
    if args.reference and (args.init_image is not None or args.control_image is not None) and not isinstance(
            sampler, DDIMSampler):
        raise UsageError("--reference with --init-image or --controlnet compares against diffusers with DDIM only")
    images = ImageInputs()
    height, width = shape[2] * scale, shape[3] * scale
    conditioning_scale = 1.0 if args.controlnet_scale is None else args.controlnet_scale
    if args.controlnet is not None:
        try:
            check_fits(model.config, ControlNetConfig.from_file(args.controlnet / "config.json"))  # before its weights
            controlnet, controlnet_params = ControlNetModel.from_pretrained(args.controlnet)
            model, params = ControlledUNet.combine(model, params, controlnet, controlnet_params, conditioning_scale,
                                                   args.guess_mode)
        except ConfigError as err:
            raise UsageError(f"cannot use --controlnet {args.controlnet}: {err}") from None
    elif isinstance(model, ControlledUNet):  # a cluster's model, uploaded with its ControlNet
        if args.control_image is None:
            raise UsageError(f"model {args.model_id} has a ControlNet: pass --control-image")
        model = model.clone(conditioning_scale=float(conditioning_scale), guess_mode=args.guess_mode)
    elif args.control_image is not None:
        raise UsageError(f"model {args.model_id} was uploaded without a ControlNet; --control-image needs one")
    if isinstance(model, ControlledUNet):
        _, channels, image_height, _ = model.control_image_shape(1, 1, 1)
        if image_height != scale:
            raise UsageError(f"the ControlNet embeds images {image_height}x smaller, the VAE {scale}x: it was not "
                             "made for this model")
        images.control = load_control_image(args.control_image, channels, height, width, shape[0])
    if args.init_image is not None:
        try:
            sampler = StrengthSampler(sampler, args.strength)
        except SchedulerConfigError as err:
            raise UsageError(f"--strength {args.strength}: {err}") from None
        images.init = load_init_image(args.init_image, shape[0])
    return model, params, sampler, images


#: PIL mode -> number of channels, for the modes a PNG decodes to
_BANDS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "LA": 2, "P": 3, "RGB": 3, "RGBA": 4}


def _open_png(path: Path, option: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as err:
        raise UsageError(f"{option} {path}: cannot read the image: {err}") from None
    return image


def image_size(path: Path, option: str) -> tuple[int, int]:
    """(height, width) of an image file, in pixels."""
    width, height = _open_png(path, option).size
    return height, width


def load_control_image(path: Path, channels: int, height: int, width: int, batch: int) -> np.ndarray:
    """The control image as the ControlNet takes it: (batch, channels, height, width) float32 in [0, 1].

    Not resized or converted: an image of another size or channel count is refused, naming both.
    """
    image = _open_png(path, "--control-image")
    have = _BANDS.get(image.mode)
    if image.mode == "P":  # a palette stands for RGB colours
        image = image.convert("RGB")
    if have != channels:
        raise UsageError(f"--control-image {path} has {have if have else 'an unknown number of'} channel(s) "
                         f"(mode {image.mode}); this ControlNet takes {channels}")
    if image.size != (width, height):
        raise UsageError(f"--control-image {path} is {image.size[1]}x{image.size[0]} (height x width); "
                         f"the image being generated is {height}x{width}")
    array = np.asarray(image, dtype=np.float32)
    scale = 65535.0 if image.mode.startswith("I") else 255.0 if image.mode != "1" else 1.0
    array = (array / scale).reshape(height, width, channels).transpose(2, 0, 1)
    return np.ascontiguousarray(np.broadcast_to(array, (batch, channels, height, width)), dtype=np.float32)


def load_init_image(path: Path, batch: int) -> np.ndarray:
    """The image to redraw as the VAE takes it: (batch, 3, H, W) float32 in [-1, 1] (any mode, as RGB)."""
    image = _open_png(path, "--init-image").convert("RGB")
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return np.ascontiguousarray(np.broadcast_to(array, (batch, *array.shape)), dtype=np.float32)


def encode_image(path: Path, images: np.ndarray) -> np.ndarray:
    """The init latent x0 = scaling_factor * mean of the VAE's latent distribution, on the user's machine."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path / "vae").eval()
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(images)).latent_dist.mean
    return (mean * vae.config.scaling_factor).numpy().astype(np.float32)


def reference_controlnet_latents(path: Path, controlnet: Path, prompt: str, negative_prompt: str, latents: np.ndarray,
                                 control: np.ndarray, steps: int, guidance_scale: float, conditioning_scale: float,
                                 guess_mode: bool) -> np.ndarray:
    """diffusers' StableDiffusionControlNetPipeline (DDIM, eta 0) from the same latents and control image."""
    import torch
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        path, controlnet=ControlNetModel.from_pretrained(controlnet), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    n, _, h, w = control.shape
    with torch.no_grad():
        out = pipe([prompt] * n, image=torch.from_numpy(control), negative_prompt=[negative_prompt] * n, height=h,
                   width=w, num_inference_steps=steps, guidance_scale=guidance_scale,
                   latents=torch.from_numpy(latents), controlnet_conditioning_scale=conditioning_scale,
                   guess_mode=guess_mode, output_type="latent")
    return out.images.numpy()


def reference_img2img_latents(path: Path, prompt: str, negative_prompt: str, init_latents: np.ndarray,
                              noise: np.ndarray, steps: int, strength: float, guidance_scale: float) -> np.ndarray:
    """diffusers' StableDiffusionImg2ImgPipeline (DDIM, eta 0) from the same init latent and the same noise.

    The pipeline draws its noise itself (one ``randn_tensor`` call, in prepare_latents); it is given the user's
    noise instead, so that both start from the same x_t0.
    """
    import torch
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    n = init_latents.shape[0]
    with mock.patch.object(img2img, "randn_tensor", lambda *a, **k: torch.from_numpy(noise)), torch.no_grad():
        out = pipe([prompt] * n, image=torch.from_numpy(init_latents), negative_prompt=[negative_prompt] * n,
                   strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent")
    return out.images.numpy()

