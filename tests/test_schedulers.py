"""Sampler parity with diffusers' DDPMScheduler / DDIMScheduler (float32, within 1e-5)."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from cipherdm_spu import Public
from cipherdm_spu.models.schedulers import DDIMSampler, DDPMSampler, ScheduleConfig, SchedulerConfigError, step

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _config(schedule, spacing, prediction, **extra):
    return dict(num_train_timesteps=1000, beta_schedule=schedule, timestep_spacing=spacing,
                prediction_type=prediction, clip_sample=True, steps_offset=1 if spacing == "leading" else 0, **extra)


@pytest.mark.parametrize("schedule, spacing, prediction", list(itertools.product(SCHEDULES, SPACINGS, PREDICTIONS)))
def test_ddim_and_ddpm_steps_match_diffusers(schedule, spacing, prediction):
    rng = np.random.default_rng(0)
    cfg = _config(schedule, spacing, prediction)
    x, out, noise = (rng.standard_normal((1, 1, 4, 4)).astype(np.float32) for _ in range(3))
    for ours, theirs, kwargs in (
        (DDIMSampler(ScheduleConfig.from_dict(cfg), 20, eta=0.5), DDIMScheduler(**cfg), {"eta": 0.5}),
        (DDPMSampler(ScheduleConfig.from_dict(cfg), 20), DDPMScheduler(**cfg), {}),
    ):
        theirs.set_timesteps(20)
        np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
        for i, t in enumerate(theirs.timesteps.tolist()):
            if kwargs:
                want = theirs.step(torch.from_numpy(out), t, torch.from_numpy(x), variance_noise=torch.from_numpy(noise), **kwargs).prev_sample
                used = noise
            else:
                want, used = _ddpm_step(theirs, out, t, x)
            got = step(x, out, ours.step_coefficients(i).astype(np.float32), used, ours.clip_range)
            np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=1e-5)


def _ddpm_step(scheduler, out, t, x, noise_seed=7):
    """diffusers' DDPM step, and the noise it drew (reproduced from the same seeded generator)."""
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(noise_seed), dtype=torch.float32)
    prev = scheduler.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=torch.Generator().manual_seed(noise_seed)).prev_sample
    return prev, noise.numpy()


def test_full_ddim_loop_matches_diffusers():
    cfg = _config("scaled_linear", "leading", "epsilon")
    ours, theirs = DDIMSampler(ScheduleConfig.from_dict(cfg), 10), DDIMScheduler(**cfg)
    theirs.set_timesteps(10)
    model = lambda x, t: np.tanh(x) * (t / 1000.0)  # noqa: E731  (a stand-in denoiser)
    x_ours = x_theirs = np.random.default_rng(1).standard_normal((2, 1, 4, 4)).astype(np.float32)
    for i, t in enumerate(theirs.timesteps.tolist()):
        x_theirs = theirs.step(torch.from_numpy(model(x_theirs, t)), t, torch.from_numpy(x_theirs)).prev_sample.numpy()
        x_ours = np.asarray(step(x_ours, model(x_ours, t), ours.step_coefficients(i).astype(np.float32), None, ours.clip_range))
    np.testing.assert_allclose(x_ours, x_theirs, atol=1e-5)


def test_unsupported_options_are_refused():
    with pytest.raises(SchedulerConfigError, match="thresholding"):
        ScheduleConfig.from_dict({"thresholding": True})
    with pytest.raises(SchedulerConfigError, match="beta_schedule"):
        ScheduleConfig.from_dict({"beta_schedule": "sigmoid"})
    with pytest.raises(SchedulerConfigError, match="steps"):
        DDIMSampler(ScheduleConfig(), 0)


def _secure_ddim_step(x, out, coefficients):
    return step(x, out, coefficients, None, 1.0)


def test_one_executable_serves_every_step_under_mpc(sessions):
    session = sessions["cipherdm"]
    sampler = DDIMSampler(ScheduleConfig(), 5)
    rng = np.random.default_rng(2)
    x = session.share(rng.standard_normal((1, 1, 4, 4)).astype(np.float32))
    plain = session.reveal(x)
    compiled = None
    for i in range(sampler.num_steps):
        out = (0.1 * i + rng.standard_normal((1, 1, 4, 4))).astype(np.float32)
        coefficients = sampler.step_coefficients(i).astype(np.float32)
        new = session.run(_secure_ddim_step, x, out, Public(coefficients), reveal=False)
        session.delete(x)
        x = new
        plain = np.asarray(step(plain, out, coefficients, None, 1.0))
        this = session.compile(_secure_ddim_step, new, out, Public(coefficients))
        assert compiled is None or this is compiled
        compiled = this
    np.testing.assert_allclose(session.reveal(x), plain, atol=1e-3)
