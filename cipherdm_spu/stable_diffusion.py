"""Stable Diffusion, split between the user's machine and the three parties.

The parts whose weights are public (CLIP text encoder, VAE) run on the user's side in plaintext with
transformers/diffusers (torch, CPU): the prompt is encoded locally and only its embedding is
secret-shared; the final latent is revealed to the user alone, who decodes it locally. The UNet (the
model owner's) runs under MPC through `SecureDiffusion`, with classifier-free guidance inside.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from .errors import StableDiffusionDirError

#: what a diffusers Stable Diffusion directory must hold for this split
PARTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
#: the parts a user of a cluster needs on its own machine
USER_PARTS = ("text_encoder", "tokenizer", "vae")
#: the packages the user's plaintext parts run on (setup.cfg's `sd` extra)
USER_PACKAGES = ("torch", "transformers", "diffusers")


def missing_user_packages() -> list:
    """Those of USER_PACKAGES not installed: a command line refuses to start without them, before it loads a model."""
    return [name for name in USER_PACKAGES if importlib.util.find_spec(name) is None]


def check_directory(path: Path, user_only: bool = False) -> None:
    """Refuse a directory without the parts needed: all of them, or (``user_only``, a cluster's user) the
    user's own: the prompt encoder and the VAE (the UNet is the model owner's, held by the parties)."""
    if not path.is_dir():
        raise StableDiffusionDirError(f"model directory {path} does not exist")
    needed = USER_PARTS if user_only else PARTS
    missing = [part for part in needed if not (path / part).is_dir()]
    if missing:
        raise StableDiffusionDirError(
            f"{path} is not a diffusers Stable Diffusion directory: missing {', '.join(p + '/' for p in missing)}"
        )


def vae_scale_factor(path: Path) -> int:
    """Pixels per latent cell: 2 ** (number of VAE blocks - 1), from vae/config.json."""
    try:
        config = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StableDiffusionDirError(f"cannot read {path / 'vae' / 'config.json'}: {e}") from None
    return 2 ** (len(config.get("block_out_channels", [1])) - 1)


def encode_prompts(path: Path, prompt: str, negative_prompt: str = "", batch: int = 1):
    """(unconditional, conditional) CLIP embeddings, each (batch, tokens, dim), on the user's machine."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(path / "text_encoder").eval()

    def embed(text: str) -> np.ndarray:
        ids = tokenizer([text] * batch, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder(ids)[0].numpy().astype(np.float32)

    return embed(negative_prompt), embed(prompt)


def scheduler_config(path: Path) -> dict:
    """The directory's scheduler/scheduler_config.json (any diffusers scheduler; the sampler reads what it needs)."""
    file = path / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StableDiffusionDirError(f"cannot read scheduler config {file}: {e}") from None


def decode_latents(path: Path, latents: np.ndarray) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] from the final latents, with the VAE, on the user's machine."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path / "vae").eval()
    with torch.no_grad():
        images = vae.decode(torch.tensor(np.asarray(latents)) / vae.config.scaling_factor).sample  # a copy: revealed arrays are read-only
    return images.clamp(-1, 1).numpy()


def reference_latents(path: Path, prompt: str, negative_prompt: str, latents: np.ndarray, steps: int,
                      guidance_scale: float, sampler: str = "ddim") -> np.ndarray:
    """diffusers' own StableDiffusionPipeline from the same initial latents, with the scheduler class of
    ``sampler`` (ddim: eta 0; dpmsolver++, unipc) built from the directory's config: the reference."""
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    classes = {"ddim": "DDIMScheduler", "dpmsolver++": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, classes[sampler]).from_pretrained(path / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    n, _, h, w = latents.shape
    scale = pipe.vae_scale_factor
    with torch.no_grad():
        out = pipe([prompt] * n, negative_prompt=[negative_prompt] * n, height=h * scale, width=w * scale,
                   num_inference_steps=steps, guidance_scale=guidance_scale, latents=torch.from_numpy(latents),
                   output_type="latent")
    return out.images.numpy()
