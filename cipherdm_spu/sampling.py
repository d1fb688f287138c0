"""Diffusion sampling under MPC: who shares what, one compiled step for all steps, and the plaintext twin.

Roles (all played by this process in an embedded session; see `cipherdm_spu.cluster` for real ones):
- the model owner secret-shares the UNet weights once (`SecureDiffusion.__init__`); they stay resident
  for every step and sample. Per step the owner computes, in plaintext, the part of the network that
  depends only on the public timestep and its own weights (time MLP, class table, the ResNets' time
  projections) and shares the result;
- the user secret-shares the initial noise, the requested labels (one-hot) and, for DDPM or DDIM with
  eta > 0, every step's noise, all up front;
- the timestep and the schedule are public: the step coefficients enter as public inputs, so one SPU
  executable serves every step. x_t stays secret between steps; only the final image is revealed,
  to the user.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from typing import Callable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cipherdm_spu.models import ControlledUNet, UNet2DConditionModel, schedulers
from cipherdm_spu.models.guidance import guided_prediction

from .profiling import RunStats
from .session import Public, SecureSession

# parameters of the time path: used by the owner in plaintext, never shared
TIME_PATH_PARAMS = ("time_embedding", "class_embedding", "time_emb_proj")


def secure_params(params):
    """The weights the secure computation needs: everything but the time path."""

    def strip(tree):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in tree.items() if k not in TIME_PATH_PARAMS}

    return strip(params)


def needs_noise(sampler: schedulers.Sampler) -> bool:
    """Whether the sampler adds fresh noise per step (DDPM, DDIM with eta > 0, SDE-DPM-Solver++)."""
    return sampler.noisy


def noise_generator(seed: Optional[int]) -> np.random.Generator:
    """The user's noise source: from ``seed`` to reproduce a run, else from 128 bits of the operating system's
    randomness (the noise is the user's secret; a seed everyone can guess would make it public)."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)


def draw_noise(seed: Optional[int], sampler: schedulers.Sampler, shape) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The user's noise: x_T and (if the sampler needs it) one noise array per step, from one seed (`noise_generator`:
    None draws fresh noise)."""
    rng = noise_generator(seed)
    x_t = rng.standard_normal(shape).astype(np.float32)
    steps = rng.standard_normal((sampler.num_steps, *shape)).astype(np.float32) if needs_noise(sampler) else None
    return x_t, steps


def one_hot(labels, num_classes: Optional[int]) -> Optional[np.ndarray]:
    if num_classes is None:
        return None
    return np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]


def is_text_conditional(model) -> bool:
    return isinstance(model, (UNet2DConditionModel, ControlledUNet))


def predict_noise(model, params, x, condition, guidance_scale: float = 1.0, timestep=None, time_terms=None):
    """The UNet's prediction for either model kind.

    ``condition`` is the one-hot labels (or None) for a `UNet2DModel`; for a `UNet2DConditionModel` it
    is ``(uncond_context, cond_context)`` with classifier-free guidance (scale > 1, one 2N batch), or
    ``(cond_context,)`` without it. For a `ControlledUNet` the user's control image follows the contexts.
    """
    if not is_text_conditional(model):
        return model.apply(params, x, timestep, class_labels=condition, time_terms=time_terms)
    control = {}
    if isinstance(model, ControlledUNet):
        condition, control = condition[:-1], {"controlnet_cond": condition[-1]}
    if len(condition) == 2:
        return guided_prediction(model, params, x, *condition, guidance_scale, timestep=timestep, time_terms=time_terms,
                                 **control)
    return model.apply(params, x, timestep, condition[0], time_terms=time_terms, **control)


def make_denoise_step(model, clip_range: Optional[float], guidance_scale: float = 1.0, multistep: bool = False):
    """The function compiled once and run every step: UNet on precomputed time terms, then the update.

    ``multistep``: ``x`` is a multistep solver's state (`schedulers.multistep`); the UNet sees ``x[0]`` and the
    earlier outputs the solver remembers stay in the state, secret, from step to step.
    """

    def denoise_step(weights, x, condition, terms, coefficients, noise):
        if multistep:
            eps = predict_noise(model, weights, x[0], condition, guidance_scale, time_terms=terms)
            return schedulers.multistep(x, eps, coefficients, noise)
        eps = predict_noise(model, weights, x, condition, guidance_scale, time_terms=terms)
        return schedulers.step(x, eps, coefficients, noise, clip_range)

    return denoise_step


def sampler_step(model, sampler: schedulers.Sampler, guidance_scale: float = 1.0):
    """`make_denoise_step` for ``sampler``."""
    return make_denoise_step(model, sampler.clip_range, guidance_scale, multistep=sampler.multistep)


def text_condition(uncond_context, cond_context, guidance_scale: float):
    """The user's condition input for a text-conditional model: both contexts only when guidance is on."""
    cond = np.asarray(cond_context, np.float32)
    if guidance_scale > 1.0:
        return (np.asarray(uncond_context, np.float32), cond)
    return (cond,)


@dataclasses.dataclass
class StepReport:
    timestep: int
    seconds: float
    bytes_sent: int
    send_actions: int


class SecureDiffusion:
    """Sampling inside a `SecureSession` with a `UNet2DModel` (class-conditional or not) or a
    `UNet2DConditionModel` (text contexts from the user, classifier-free guidance inside MPC)."""

    def __init__(self, session: SecureSession, model, params, sampler: schedulers.Sampler, guidance_scale: float = 1.0):
        self.session, self.model, self.sampler = session, model, sampler
        self.num_classes = None if is_text_conditional(model) else model.config.num_class_embeds
        self._owner_params = params
        self._time_terms = jax.jit(lambda p, t: model.apply(p, t, method=model.time_terms))
        self._weights = session.share(secure_params(params))  # the owner's, once
        # one function object: one cached executable (the guidance scale is a public constant in it)
        self._step = sampler_step(model, sampler, guidance_scale)

    def time_terms(self, timestep: int):
        """The owner's plaintext time terms for one public timestep."""
        return jax.tree_util.tree_map(np.asarray, self._time_terms(self._owner_params, int(timestep)))

    def sample(self, x_t: np.ndarray, labels=None, step_noise: Optional[np.ndarray] = None,
               on_step: Optional[Callable[[StepReport], None]] = None,
               context=None) -> tuple[np.ndarray, RunStats, List[StepReport]]:
        """Run every step under MPC; returns (final sample revealed to the user, total cost, per-step cost).

        ``labels`` for a class-conditional UNet2DModel; ``context`` (from `text_condition`) for a
        UNet2DConditionModel. Both are the user's and are secret-shared.
        """
        session = self.session
        if needs_noise(self.sampler) and step_noise is None:
            raise ValueError("this sampler adds noise each step: pass step_noise (one array per step)")
        if is_text_conditional(self.model) and context is None:
            raise ValueError("a text-conditional UNet needs context= (the encoded prompt)")
        condition = context if context is not None else one_hot(labels, self.num_classes)
        x = session.share(schedulers.initial_state(self.sampler, x_t))  # the user's
        user_labels = session.share(condition) if condition is not None else None
        noise = session.share(list(step_noise)) if needs_noise(self.sampler) else None
        coefficients = self.sampler.coefficient_table()
        total, reports, terms = RunStats.zero(), [], None
        try:
            for i, t in enumerate(self.sampler.timesteps):
                terms = session.share(self.time_terms(t))  # the owner's, per step
                new_x = session.run(self._step, self._weights, x, user_labels, terms, Public(coefficients[i]),
                                    noise[i] if noise is not None else None, reveal=False)
                session.delete([x, terms])
                x, terms = new_x, None
                stats = session.last_stats
                total = total + stats
                report = StepReport(int(t), stats.seconds, stats.bytes_sent, stats.send_actions)
                reports.append(report)
                if on_step is not None:
                    on_step(report)
            # the only reveal: the final image, to the user (a multistep state's other rows are zeros by then)
            image = schedulers.final_sample(self.sampler, session.reveal(x))
        finally:
            session.delete([x, terms, user_labels, noise])  # also on failure: nothing stays resident
        return image, total, reports

    def close(self) -> None:
        """Drop the shared weights from the parties."""
        self.session.delete(self._weights)


@functools.partial(jax.jit, static_argnames=("model", "guidance_scale", "multistep", "clip"))
def _plain_step(params, x, condition, t, coefficients, noise, *, model, guidance_scale, multistep, clip):
    """One plaintext step, compiled once per model and sampler kind (not once per call of `sample_plaintext`)."""
    if multistep:
        eps = predict_noise(model, params, x[0], condition, guidance_scale, timestep=t)
        return schedulers.multistep(x, eps, coefficients, noise)
    eps = predict_noise(model, params, x, condition, guidance_scale, timestep=t)
    return schedulers.step(x, eps, coefficients, noise, clip)


def sample_plaintext(model, params, sampler: schedulers.Sampler, x_t, labels=None, step_noise=None, progress=None,
                     context=None, guidance_scale: float = 1.0):
    """The same sampling loop in plain JAX (float32), from the same noise: the reference for PSNR/SSIM."""
    if context is not None:
        condition = tuple(jnp.asarray(c) for c in context)
    else:
        condition = None if labels is None else jnp.asarray(labels)

    coefficients = sampler.coefficient_table()
    x = jnp.asarray(schedulers.initial_state(sampler, np.asarray(x_t)))
    for i, t in enumerate(sampler.timesteps):
        x = _plain_step(params, x, condition, int(t), coefficients[i], None if step_noise is None else step_noise[i],
                        model=model, guidance_scale=guidance_scale, multistep=sampler.multistep, clip=sampler.clip_range)
        if progress is not None:
            progress(i)
    return schedulers.final_sample(sampler, x)
