"""DDPM (ancestral) and DDIM samplers whose step runs inside the secure computation.

Schedule tables are computed in numpy from a diffusers scheduler config (scheduler_config.json),
exactly as diffusers' DDPMScheduler / DDIMScheduler compute them. The timestep and the schedule are
public, so every step reduces to a few *public* coefficients applied to secret tensors:

    x0   = a_x * x + a_m * model_output        (clipped to +-clip_range if the config says so)
    eps  = b_x * x + b_m * model_output
    prev = p_x0 * x0 + p_eps * eps + p_x * x + sigma * noise

`step_coefficients(i)` returns these eight numbers for step i; passing them to `step` as a public
input lets one compiled executable serve every step. Noise is always an input (the user's), never
generated under MPC.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np

from cipherdm_spu.errors import SchedulerConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
COEFFICIENTS = ("a_x", "a_m", "b_x", "b_m", "p_x0", "p_eps", "p_x", "sigma")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The diffusers scheduler fields that shape sampling (others are ignored)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    variance_type: str = "fixed_small"
    thresholding: bool = False

    def __post_init__(self):
        for field, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", SPACINGS),
            ("variance_type", DDPM_VARIANCES),
        ):
            if getattr(self, field) not in allowed:
                raise SchedulerConfigError(f"{field}={getattr(self, field)!r} is not supported (supported: {', '.join(allowed)})")
        if self.thresholding:
            raise SchedulerConfigError("thresholding=True (dynamic thresholding) is not supported")
        if self.num_train_timesteps < 1:
            raise SchedulerConfigError("num_train_timesteps must be positive")

    @classmethod
    def from_dict(cls, config: dict) -> "ScheduleConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        if values.get("variance_type") is None:
            values.pop("variance_type", None)
        return cls(**values)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "ScheduleConfig":
        """Read a diffusers scheduler_config.json (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "scheduler_config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SchedulerConfigError(f"cannot read scheduler config {path}: {e}") from None


def betas(config: ScheduleConfig) -> np.ndarray:
    t = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, t, dtype=np.float32)
    if config.beta_schedule == "scaled_linear":
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, t, dtype=np.float32) ** 2
    # squaredcos_cap_v2: the cosine schedule of Nichol & Dhariwal, betas capped at 0.999
    alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)], dtype=np.float32)


def alphas_cumprod(config: ScheduleConfig) -> np.ndarray:
    return np.cumprod(1.0 - betas(config), dtype=np.float32)


def inference_timesteps(config: ScheduleConfig, num_steps: int) -> np.ndarray:
    """The timesteps visited, in diffusers' order (descending), for each spacing."""
    t = config.num_train_timesteps
    if not 1 <= num_steps <= t:
        raise SchedulerConfigError(f"the number of steps must be in 1..{t}, got {num_steps}")
    if config.timestep_spacing == "linspace":
        return np.linspace(0, t - 1, num_steps).round()[::-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = t // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + config.steps_offset
    ratio = t / num_steps
    return np.round(np.arange(t, 0, -ratio)).astype(np.int64) - 1


def _prediction_coefficients(config: ScheduleConfig, alpha_prod_t: float):
    """(a_x, a_m, b_x, b_m): x0 and eps as linear maps of (x, model_output)."""
    sa, sb = math.sqrt(alpha_prod_t), math.sqrt(1.0 - alpha_prod_t)
    if config.prediction_type == "epsilon":
        return 1.0 / sa, -sb / sa, 0.0, 1.0
    if config.prediction_type == "sample":
        return 0.0, 1.0, 1.0 / sb, -sa / sb
    return sa, -sb, sb, sa  # v_prediction


class Sampler:
    """Shared state of the samplers: config, tables, visited timesteps."""

    def __init__(self, config: ScheduleConfig, num_steps: int):
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config).astype(np.float64)
        self.timesteps = inference_timesteps(config, num_steps)
        self.num_steps = num_steps

    @property
    def clip_range(self) -> Optional[float]:
        return self.config.clip_sample_range if self.config.clip_sample else None

    def step_coefficients(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def coefficient_table(self) -> np.ndarray:
        """(num_steps, 8) float32: the public coefficients of every step, in order."""
        return np.stack([self.step_coefficients(i) for i in range(self.num_steps)]).astype(np.float32)


class DDIMSampler(Sampler):
    """DDIM (Song et al.), eta >= 0 (eta = 0: deterministic), as diffusers' DDIMScheduler.step."""

    def __init__(self, config: ScheduleConfig, num_steps: int, eta: float = 0.0):
        if eta < 0:
            raise SchedulerConfigError(f"eta must be >= 0, got {eta}")
        super().__init__(config, num_steps)
        self.eta = float(eta)
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])

    def step_coefficients(self, index: int) -> np.ndarray:
        t = int(self.timesteps[index])
        prev_t = t - self.config.num_train_timesteps // self.num_steps
        alpha_t = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        sigma = self.eta * math.sqrt(variance)
        a_x, a_m, b_x, b_m = _prediction_coefficients(self.config, alpha_t)
        direction = math.sqrt(max(1 - alpha_prev - sigma**2, 0.0))
        return np.array([a_x, a_m, b_x, b_m, math.sqrt(alpha_prev), direction, 0.0, sigma])


class DDPMSampler(Sampler):
    """Ancestral DDPM (Ho et al.), as diffusers' DDPMScheduler.step with a fixed variance."""

    def step_coefficients(self, index: int) -> np.ndarray:
        t = int(self.timesteps[index])
        prev_t = int(self.timesteps[index + 1]) if index + 1 < self.num_steps else -1
        alpha_t = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        beta_t = 1 - alpha_t / alpha_prev
        if self.config.variance_type.startswith("fixed_small"):
            variance = max((1 - alpha_prev) / (1 - alpha_t) * beta_t, 1e-20)
        else:
            variance = beta_t
        sigma = math.sqrt(variance) if t > 0 else 0.0
        a_x, a_m, b_x, b_m = _prediction_coefficients(self.config, alpha_t)
        p_x0 = math.sqrt(alpha_prev) * beta_t / (1 - alpha_t)
        p_x = math.sqrt(1 - beta_t) * (1 - alpha_prev) / (1 - alpha_t)
        return np.array([a_x, a_m, b_x, b_m, p_x0, 0.0, p_x, sigma])


def step(x, model_output, coefficients, noise=None, clip_range: Optional[float] = None):
    """One sampler step from public coefficients (see the module docstring); runs under MPC."""
    a_x, a_m, b_x, b_m, p_x0, p_eps, p_x, sigma = (coefficients[i] for i in range(len(COEFFICIENTS)))
    x0 = a_x * x + a_m * model_output
    if clip_range is not None:
        x0 = jnp.clip(x0, -clip_range, clip_range)
    eps = b_x * x + b_m * model_output
    prev = p_x0 * x0 + p_eps * eps + p_x * x
    if noise is not None:
        prev = prev + sigma * noise
    return prev
