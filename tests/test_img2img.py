"""models.img2img: the last int(K * strength) steps of a K-step sampler, and the user's noised start, as diffusers'
StableDiffusionImg2ImgPipeline computes them."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from cipherdm_spu.errors import SchedulerConfigError
from cipherdm_spu.models import DDIMSampler, DDPMSampler, ScheduleConfig
from cipherdm_spu.models.img2img import StrengthSampler, noised_latent
from cipherdm_spu.models.schedulers import make_sampler

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                   set_alpha_to_one=False, steps_offset=1)


@pytest.mark.parametrize("base", [DDIMSampler(ScheduleConfig(), 10), DDPMSampler(ScheduleConfig(), 10)], ids=["ddim", "ddpm"])
def test_strength_runs_the_last_steps_of_the_full_schedule(base):
    cut = StrengthSampler(base, 0.35)  # int(10 * 0.35) = 3 steps
    assert cut.num_steps == 3 and list(cut.timesteps) == list(base.timesteps[7:]) and cut.noisy == base.noisy
    np.testing.assert_array_equal(cut.coefficient_table(), base.coefficient_table()[7:])
    assert StrengthSampler(base, 1.0).num_steps == 10


def test_timesteps_and_noised_start_match_diffusers():
    config = ScheduleConfig(**SD_SCHEDULE)
    cut = StrengthSampler(DDIMSampler(config, 20), 0.5)
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(20)
    want_timesteps = scheduler.timesteps[20 - int(20 * 0.5):]  # diffusers' get_timesteps
    assert list(cut.timesteps) == want_timesteps.tolist()
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 1, 4, 8, 8)).astype(np.float32)
    want = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), want_timesteps[:1]).numpy()
    np.testing.assert_allclose(noised_latent(cut, x0, noise), want, atol=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda: StrengthSampler(DDIMSampler(ScheduleConfig(), 10), 0.0), r"strength must be in \(0, 1\]"),
    (lambda: StrengthSampler(DDIMSampler(ScheduleConfig(), 10), 1.5), r"strength must be in \(0, 1\]"),
    (lambda: StrengthSampler(DDIMSampler(ScheduleConfig(), 10), 0.05), "leaves no step to run"),
    (lambda: StrengthSampler(make_sampler("unipc", ScheduleConfig(), 10), 0.5), "multistep solvers are not supported"),
])
def test_what_cannot_run_is_refused(make, message):
    with pytest.raises(SchedulerConfigError, match=message):
        make()
