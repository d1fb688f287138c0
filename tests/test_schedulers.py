"""Sampler parity with diffusers' DDPMScheduler / DDIMScheduler / DPMSolverMultistepScheduler /
UniPCMultistepScheduler (float32, within 1e-5)."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from cipherdm_spu import Public
from cipherdm_spu.models.schedulers import (DDIMSampler, DDPMSampler, ScheduleConfig, SchedulerConfigError, make_sampler,
                                            multistep, step)

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
    for eta in (-0.1, 1.5):  # beyond 1 the step's noise outgrows sqrt(1 - alpha_prev)
        with pytest.raises(SchedulerConfigError, match=r"eta must be in \[0, 1\]"):
            DDIMSampler(ScheduleConfig(), 10, eta=eta)


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


def test_the_update_is_two_truncations_and_one_batched_clip_under_mpc(sessions):
    """step as two weighted sums and a clip from one batched comparison: the same x_{t-1} as the update written
    product by product, with clip_sample's values past the bound, at it and inside, in a handful of send actions."""
    session = sessions["cipherdm"]
    sampler = DDPMSampler(ScheduleConfig(), 10)
    c = sampler.step_coefficients(3).astype(np.float32)
    x = np.linspace(-3, 3, 16, dtype=np.float32).reshape(1, 1, 4, 4)
    out, noise = x[..., ::-1] * 0.7, np.full_like(x, 0.5)
    a_x, a_m, b_x, b_m, p_x0, p_eps, p_x, sigma = c.astype(np.float64)
    x0 = np.clip(a_x * x + a_m * out, -1.0, 1.0)
    assert (np.abs(a_x * x + a_m * out) > 1).any() and (np.abs(x0) < 1).any()
    want = p_x0 * x0 + p_eps * (b_x * x + b_m * out) + p_x * x + sigma * noise
    np.testing.assert_allclose(step(x, out, c, noise, 1.0), want, atol=1e-5)
    got = session.run(lambda *a: step(*a, clip_range=1.0), x, out, Public(c), noise)
    np.testing.assert_allclose(got, want, atol=2e-4)
    # two truncations (2 send actions each) and the clip's comparison, conversion and bit product
    assert session.last_stats.send_actions <= 18  # 16 measured; the product by product form took 35


def test_a_multistep_update_is_one_dot_under_mpc(sessions):
    """multistep with d folded into the matrix: the plaintext update with d formed first, in one truncation round."""
    rng = np.random.default_rng(4)
    shapes = ((3, 1, 1, 4, 4), (1, 1, 4, 4), (1, 1, 4, 4))
    state, out, noise = (rng.standard_normal(shape).astype(np.float32) for shape in shapes)
    c = (rng.standard_normal(2 + 3 * 5) * 0.5).astype(np.float32)
    d = c[0] * state[0].astype(np.float64) + c[1] * out
    want = np.tensordot(c[2:].reshape(3, 5).astype(np.float64), np.concatenate([state, d[None], noise[None]]), axes=1)
    np.testing.assert_allclose(multistep(state, out, c, noise), want, atol=1e-5)
    session = sessions["cipherdm"]
    np.testing.assert_allclose(session.run(multistep, state, out, Public(c), noise), want, atol=1e-3)
    assert session.last_stats.send_actions <= 3  # one truncation (2 measured); d formed first took 4


# -- DPM-Solver++ and UniPC -------------------------------------------------------------------------

SOLVER_AXES = list(itertools.product((1, 2, 3), (0, 1), (True, False), (False, True), PREDICTIONS, ("zero", "sigma_min"), (0, 1)))


def _solver_config(kind, order, variant, lower_order_final, karras, prediction, final, extra):
    """A diffusers config for one combination; schedule, spacing and step count cycle with it. (Not DPM-Solver's
    Karras sigmas on the cosine schedule: there diffusers truncates fractional timesteps, which a one-ulp
    difference in its float32 tables moves by one.)"""
    index = order + variant + 2 * extra + int(karras)
    schedule = SCHEDULES[index % 3]
    if karras and kind == "dpmsolver++" and schedule == "squaredcos_cap_v2":
        schedule = "scaled_linear"
    cfg = dict(num_train_timesteps=1000, beta_schedule=schedule, timestep_spacing=SPACINGS[(index + order) % 3],
               steps_offset=1, prediction_type=prediction, solver_order=order, lower_order_final=lower_order_final,
               use_karras_sigmas=karras, final_sigmas_type=final)
    if kind == "dpmsolver++":
        cfg.update(algorithm_type=("dpmsolver++", "sde-dpmsolver++")[extra], solver_type=("midpoint", "heun")[variant])
    else:
        cfg.update(disable_corrector=[1] if extra else [], solver_type=("bh1", "bh2")[variant])
    return cfg, (8, 16)[index % 2]


def _their_state(kind, scheduler, sample, size):
    """diffusers' scheduler state before a step, in our state layout (None: zeros)."""
    remembered = list(reversed(scheduler.model_outputs))
    if kind == "unipc":
        remembered = [scheduler.last_sample] + remembered
    rows = [sample] + remembered[:size - 1]
    return np.stack([np.zeros(sample.shape, np.float32) if r is None else np.asarray(r, np.float32) for r in rows])


@pytest.mark.parametrize("kind", ("dpmsolver++", "unipc"))
@pytest.mark.parametrize("axes", SOLVER_AXES, ids=lambda a: "-".join(map(str, a)))
def test_multistep_solvers_match_diffusers_every_step(kind, axes):
    """Each step of a full run from diffusers' own state: the sample within 1e-5, and the state we carry equals
    what diffusers remembers. Combinations diffusers itself cannot compute (NaN/inf) are refused."""
    cfg, n = _solver_config(kind, *axes)
    theirs = (DPMSolverMultistepScheduler if kind == "dpmsolver++" else UniPCMultistepScheduler)(**cfg)
    theirs.set_timesteps(n)
    theirs.set_begin_index(0)
    theirs.sigmas = theirs.sigmas.double()  # diffusers in float64: the reference, free of its own float32 cancellations
    rng = np.random.default_rng(n)
    model = lambda x, t: (np.tanh(x) * (t / 1000.0) + 0.3 * np.sin(3 * x)).astype(np.float32)  # noqa: E731
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    try:
        ours = make_sampler(kind, ScheduleConfig.from_dict(cfg), n, options=cfg)
    except SchedulerConfigError:
        ours = None
    np.testing.assert_array_equal(ours.timesteps if ours else theirs.timesteps.numpy(), theirs.timesteps.numpy())
    for i, t in enumerate(theirs.timesteps.tolist()):
        out, noise = model(x, t), rng.standard_normal(x.shape).astype(np.float32)
        state = _their_state(kind, theirs, x, ours.state_size) if ours else None
        kwargs = {"variance_noise": torch.from_numpy(noise)} if cfg.get("algorithm_type", "").startswith("sde") else {}
        try:
            want = theirs.step(torch.from_numpy(out).double(), t, torch.from_numpy(x).double(), **kwargs).prev_sample.numpy()
        except RuntimeError:  # torch.linalg.solve on a singular matrix
            want = np.full_like(x, np.nan)
        if ours is None:
            if not np.all(np.isfinite(want)):
                return  # refused, as diffusers fails too
            continue
        assert np.all(np.isfinite(want)), "diffusers computes this combination; we refused it"
        got = np.asarray(multistep(state, out, ours.step_coefficients(i).astype(np.float32), noise if ours.noisy else None))
        scale = 1e-5 * max(1.0, np.abs(state).max())  # float32 carries ~7 digits; the stand-in model can grow x
        np.testing.assert_allclose(got[0], want, atol=scale, rtol=1e-5)
        if i < n - 1:
            np.testing.assert_allclose(got[1:], _their_state(kind, theirs, want, ours.state_size)[1:], atol=scale, rtol=1e-5)
        else:
            assert not got[1:].any()  # the last step reveals the sample only
        x = want.astype(np.float32)
    assert ours is not None, "refused, but diffusers computed every step"


@pytest.mark.parametrize("field, value", [
    ("use_exponential_sigmas", True), ("use_lu_lambdas", True), ("use_flow_sigmas", True), ("rescale_betas_zero_snr", True),
    ("trained_betas", [0.1] * 1000), ("algorithm_type", "sde-dpmsolver"), ("solver_order", 4), ("predict_x0", False),
    ("final_sigmas_type", "nonesuch"),
])
def test_unsupported_solver_options_are_refused_by_name(field, value):
    kind = "unipc" if field == "predict_x0" else "dpmsolver++"
    with pytest.raises(SchedulerConfigError, match=field):
        make_sampler(kind, ScheduleConfig(), 10, options={field: value})
