"""Image-to-image: denoising the user's noised image latent from step s*T instead of from pure noise.

As diffusers' StableDiffusionImg2ImgPipeline: of the K timesteps that K-step sampling visits, only the last
k = min(int(K * s), K) run, from t0 = timesteps[K - k], and sampling starts from

    x_t0 = sqrt(abar_t0) * x0 + sqrt(1 - abar_t0) * eps

with x0 the VAE latent of the user's image (times the VAE's scaling factor) and eps the user's noise. The user
computes x_t0 in plaintext (`noised_latent`) and shares only it; each step's public coefficients are those of
the full K-step sampler at the same index, so one compiled step serves, as for text-to-image.
"""

from __future__ import annotations

import math

import numpy as np

from cipherdm_spu.errors import SchedulerConfigError

from .schedulers import Sampler


class StrengthSampler:
    """The last ``min(int(K * strength), K)`` steps of a K-step DDIM or DDPM ``base`` sampler."""

    def __init__(self, base: Sampler, strength: float):
        if base.multistep:
            raise SchedulerConfigError("image-to-image runs DDIM or DDPM; multistep solvers are not supported for it")
        if not 0.0 < strength <= 1.0:
            raise SchedulerConfigError(f"strength must be in (0, 1], got {strength}")
        steps = min(int(base.num_steps * strength), base.num_steps)
        if steps < 1:
            raise SchedulerConfigError(f"strength {strength} of {base.num_steps} steps leaves no step to run "
                                       f"(int({base.num_steps} * {strength}) = 0): raise the strength or the steps")
        self.base, self.strength, self.start = base, float(strength), base.num_steps - steps
        self.config, self.alphas_cumprod = base.config, base.alphas_cumprod
        self.timesteps, self.num_steps = base.timesteps[self.start:], steps
        self.noisy, self.multistep, self.clip_range = base.noisy, False, base.clip_range

    def step_coefficients(self, index: int) -> np.ndarray:
        return self.base.step_coefficients(self.start + index)

    def coefficient_table(self) -> np.ndarray:
        return self.base.coefficient_table()[self.start:]


def noised_latent(sampler: StrengthSampler, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The user's starting point sqrt(abar_t0) * x0 + sqrt(1 - abar_t0) * noise (diffusers' add_noise), float32."""
    alpha = float(sampler.alphas_cumprod[int(sampler.timesteps[0])])
    return (math.sqrt(alpha) * np.asarray(x0, np.float64) + math.sqrt(1 - alpha) * np.asarray(noise, np.float64)
            ).astype(np.float32)
