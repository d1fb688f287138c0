"""DDPM (ancestral), DDIM, DPM-Solver++ and UniPC samplers whose step runs inside the secure computation.

Schedule tables are computed in numpy from a diffusers scheduler config (scheduler_config.json),
exactly as diffusers' DDPMScheduler / DDIMScheduler compute them. The timestep and the schedule are
public, so every step reduces to a few *public* coefficients applied to secret tensors:

    x0   = a_x * x + a_m * model_output        (clipped to +-clip_range if the config says so)
    eps  = b_x * x + b_m * model_output
    prev = p_x0 * x0 + p_eps * eps + p_x * x + sigma * noise

`step_coefficients(i)` returns these eight numbers for step i; passing them to `step` as a public
input lets one compiled executable serve every step. Noise is always an input (the user's), never
generated under MPC.

The multistep solvers (`DPMSolverSampler`, `UniPCSampler`) reuse earlier model outputs, so their step
carries a *state*: a stack of 1 + K tensors, ``state[0]`` the latent the UNet sees next and the others
what the solver remembers (earlier data predictions; UniPC also its last corrected sample). Their update
is linear in the state, the converted model output and the user's noise, so a step is again public
numbers applied to secret tensors (`multistep`):

    d     = a_x * state[0] + a_m * model_output          (the data prediction x0)
    state = M @ [state[0], ..., state[K], d, noise]       (M: (1 + K) x (K + 2 [+ 1]), public)

The last step's M zeroes every row but the first, so the revealed state holds the sample and zeros:
nothing the solver remembered is revealed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np

from cipherdm_spu import ring
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
    """prod_{s<=t} (1 - beta_s), float32, accumulated in float64 as torch's CPU cumprod does (diffusers' tables)."""
    return np.cumprod((1.0 - betas(config)).astype(np.float64)).astype(np.float32)


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

    #: whether each step adds the user's fresh noise
    noisy = False
    #: whether the step carries a state of 1 + K tensors (`multistep`) rather than the latent alone (`step`)
    multistep = False

    @property
    def clip_range(self) -> Optional[float]:
        return self.config.clip_sample_range if self.config.clip_sample else None

    def step_coefficients(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def coefficient_table(self) -> np.ndarray:
        """(num_steps, 8) float32: the public coefficients of every step, in order."""
        return np.stack([self.step_coefficients(i) for i in range(self.num_steps)]).astype(np.float32)


class DDIMSampler(Sampler):
    """DDIM (Song et al.), 0 <= eta <= 1 (0: deterministic; 1: DDPM's posterior variance), as diffusers'
    DDIMScheduler.step. Beyond 1 the step's noise sigma can outgrow sqrt(1 - alpha_prev), where diffusers takes the
    root of a negative number; and on a cluster a public sigma that large would scale the user's noise past the
    fixed-point range before the state is clamped (`plan.Policy.input_bound`)."""

    def __init__(self, config: ScheduleConfig, num_steps: int, eta: float = 0.0):
        if not 0.0 <= eta <= 1.0:
            raise SchedulerConfigError(f"eta must be in [0, 1], got {eta}")
        super().__init__(config, num_steps)
        self.eta = float(eta)
        self.noisy = self.eta > 0
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

    noisy = True

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
    """One sampler step from public coefficients (see the module docstring); runs under MPC.

    eps enters prev only through p_eps, so prev = p_x0 * x0 + (p_eps * b_x + p_x) * x + (p_eps * b_m) * model_output
    + sigma * noise, and each of x0 and prev is one `_weighted_sum`: two truncation rounds where the products one
    by one (eps's before p_eps's) take seven, eight with noise. The clip is `_clip`."""
    a_x, a_m, b_x, b_m, p_x0, p_eps, p_x, sigma = (coefficients[i] for i in range(len(COEFFICIENTS)))
    x0 = _weighted_sum([a_x, a_m], [x, model_output])
    if clip_range is not None:
        x0 = _clip(x0, clip_range)
    weights, values = [p_x0, p_eps * b_x + p_x, p_eps * b_m], [x0, x, model_output]
    if noise is not None:
        weights, values = weights + [sigma], values + [noise]
    return _weighted_sum(weights, values)


def _clip(x, bound: float):
    """x clipped to [-bound, bound] as x + [x > bound] (bound - x) + [x < -bound] (-bound - x): both bits from one
    batched comparison, converted once, and their products with the differences one stacked integer product
    (`ring.bit_times`), where a clip's max then min take two comparisons and two selects in sequence."""
    bits = ring.indicator(jnp.stack([x - bound, -bound - x]) > 0)
    return x + jnp.sum(ring.bit_times(bits, jnp.stack([bound - x, -bound - x])), axis=0)


def _weighted_sum(weights, values):
    """sum_i weights[i] * values[i] for public scalars weights[i], as ONE dot of the weights with the stacked
    values: under MPC one truncation for all the products, where a product each is a truncation each."""
    return jnp.tensordot(jnp.stack(weights), jnp.stack(values), axes=1)


# -- multistep solvers: DPM-Solver++ and UniPC -----------------------------------------------------

#: the samplers by the name the command lines take, and the diffusers scheduler classes they follow
SCHEDULERS = ("ddim", "ddpm", "dpmsolver++", "unipc")
SCHEDULER_CLASSES = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
                     "DPMSolverMultistepScheduler": "dpmsolver++", "UniPCMultistepScheduler": "unipc"}
#: diffusers options of the multistep schedulers we do not implement, with the value that means "off"
UNSUPPORTED_SOLVER_OPTIONS = {
    "trained_betas": None, "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
    "use_flow_sigmas": False, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False, "solver_p": None,
    "shift_terminal": None, "sigma_min": None, "sigma_max": None,
}


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """The fields of diffusers' DPMSolverMultistepScheduler (``kind`` "dpmsolver++") or
    UniPCMultistepScheduler ("unipc") that shape sampling, with diffusers' defaults.

    ``solver_type`` None means the kind's default (midpoint; bh2). As diffusers does, a DPM-Solver
    config's solver type read by UniPC becomes bh2 and a UniPC one read by DPM-Solver midpoint, so one
    checkpoint's scheduler config serves every sampler.
    """

    kind: str = "dpmsolver++"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: Optional[str] = None
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    predict_x0: bool = True
    disable_corrector: tuple = ()

    def __post_init__(self):
        if self.kind not in ("dpmsolver++", "unipc"):
            raise SchedulerConfigError(f"multistep solver {self.kind!r} is not supported (supported: dpmsolver++, unipc)")
        own, other = (("midpoint", "heun"), ("bh1", "bh2", "logrho")) if self.kind == "dpmsolver++" else \
            (("bh1", "bh2"), ("midpoint", "heun", "logrho"))
        if self.solver_type is None or self.solver_type in other:
            object.__setattr__(self, "solver_type", own[-1] if self.kind == "unipc" else own[0])
        checks = [("solver_type", own), ("final_sigmas_type", ("zero", "sigma_min"))]
        if self.kind == "dpmsolver++":
            checks.append(("algorithm_type", ("dpmsolver++", "sde-dpmsolver++")))
        for field, allowed in checks:
            if getattr(self, field) not in allowed:
                raise SchedulerConfigError(f"{field}={getattr(self, field)!r} is not supported for {self.kind} "
                                           f"(supported: {', '.join(allowed)})")
        if not self.predict_x0:  # UniPC on noise predictions: its float32 parity fails where 1/sigma_t amplifies rounding
            raise SchedulerConfigError("predict_x0=False is not supported (UniPC on data predictions only)")
        if self.solver_order not in (1, 2, 3):
            raise SchedulerConfigError(f"solver_order={self.solver_order!r} is not supported (supported: 1, 2, 3)")
        object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector))

    @classmethod
    def from_dict(cls, config: dict, kind: str) -> "SolverOptions":
        """The options of ``kind`` in a diffusers scheduler config (another scheduler's config gives defaults)."""
        for name, off in UNSUPPORTED_SOLVER_OPTIONS.items():
            if config.get(name) is not None and config[name] != off:
                raise SchedulerConfigError(f"{name}={config[name]!r} is not supported by the {kind} sampler")
        fields = {"solver_order", "solver_type", "lower_order_final", "use_karras_sigmas", "final_sigmas_type"}
        fields |= {"algorithm_type", "euler_at_final", "lambda_min_clipped"} if kind == "dpmsolver++" else \
            {"predict_x0", "disable_corrector"}
        values = {k: v for k, v in config.items() if k in fields and v is not None}
        return cls(kind=kind, **values)


def _alpha_sigma(sigma):
    """VP parametrisation from sigma = sigma_t / alpha_t: alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t."""
    alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def _log_snr(sigma):
    """lambda = log(alpha_t / sigma_t) (half-log-SNR, DPM-Solver's time variable); +inf at sigma = 0."""
    alpha, sig = _alpha_sigma(np.float64(sigma))
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sig)


def _sigma_to_timestep(sigma: float, log_sigmas: np.ndarray) -> float:
    """The (fractional) training timestep whose sigma is ``sigma``: log sigma interpolated linearly between
    the training timesteps around it (as diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(max(sigma, 1e-10))
    low = int(np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2))
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
    return (1 - w) * low + w * (low + 1)


def solver_schedule(config: ScheduleConfig, options: SolverOptions, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas): the visited training timesteps (int64, descending) and the N + 1 sigmas of the
    multistep schedulers' ``set_timesteps`` (float32; the last one 0 or the smallest training sigma)."""
    t_train = config.num_train_timesteps
    if not 1 <= num_steps <= t_train:
        raise SchedulerConfigError(f"the number of steps must be in 1..{t_train}, got {num_steps}")
    acp = alphas_cumprod(config)
    train_sigmas = ((1 - acp) / acp) ** 0.5  # float32, increasing with t
    last = t_train
    if options.kind == "dpmsolver++":  # timesteps whose log-SNR is below lambda_min_clipped are never visited
        lambdas = np.log(np.sqrt(acp)) - np.log(np.sqrt(1 - acp))
        last = t_train - int(np.searchsorted(lambdas[::-1], options.lambda_min_clipped))
    # the spacings of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (arXiv 2305.08891), Table 2
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        ratio = last // (num_steps + 1)
        timesteps = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    else:
        timesteps = np.arange(last, 0, -t_train / num_steps).round().astype(np.int64) - 1
    final = float(train_sigmas[0]) if options.final_sigmas_type == "sigma_min" else 0.0
    if options.use_karras_sigmas:
        # Karras et al. (arXiv 2206.00364) eq. 5: sigma_i = (max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho, rho = 7
        lo, hi, rho = float(train_sigmas[0]), float(train_sigmas[-1]), 7.0
        ramp = np.linspace(0, 1, num_steps)
        sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        log_sigmas = np.log(train_sigmas)
        t = np.array([_sigma_to_timestep(s, log_sigmas) for s in sigmas])
        if options.kind == "unipc" or config.beta_schedule != "squaredcos_cap_v2":
            t = t.round()
        timesteps = t.astype(np.int64)
        if options.kind == "unipc" and options.final_sigmas_type == "sigma_min":
            final = float(sigmas[-1])
    else:
        sigmas = np.interp(timesteps, np.arange(t_train), train_sigmas)
    return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)


class MultistepSampler(Sampler):
    """A sampler whose step is `multistep`: the per-step public vector is [a_x, a_m, M.ravel()].

    Subclasses give ``state_size`` (1 + K) and ``_update(i, basis)``: the new state's rows as
    combinations of the basis vectors (state rows, d, noise), so the diffusers formulas below read
    as written and yield the coefficients.
    """

    multistep = True
    state_size = 1

    def __init__(self, config: ScheduleConfig, num_steps: int, options: SolverOptions):
        self.config, self.options, self.num_steps = config, options, num_steps
        self.alphas_cumprod = alphas_cumprod(config).astype(np.float64)
        self.timesteps, self.sigmas = solver_schedule(config, options, num_steps)
        self._table = np.stack([self._coefficients(i) for i in range(num_steps)])
        if not np.all(np.isfinite(self._table)):
            raise SchedulerConfigError(f"{self.describe()} is undefined with {num_steps} steps "
                                       "(diffusers' own step gives NaN/inf here)")

    @property
    def clip_range(self) -> Optional[float]:
        return None  # diffusers' multistep solvers clip only by dynamic thresholding, which we refuse

    def describe(self) -> str:
        o = self.options
        return f"{o.kind} (order {o.solver_order}, {o.solver_type}, lower_order_final={o.lower_order_final}, " \
               f"final_sigmas_type={o.final_sigmas_type!r})"

    def _schedule_at(self, j: int):
        """(alpha_t, sigma_t, lambda) at sigma index j (from the float32 sigma, as diffusers)."""
        s = np.float64(self.sigmas[j])
        alpha, sig = _alpha_sigma(s)
        return alpha, sig, _log_snr(s)

    def _conversion(self, j: int):
        """(a_x, a_m): the data prediction x0 as a linear map of (x, model_output) at sigma index j,
        from x = alpha_t x0 + sigma_t eps and v = alpha_t eps - sigma_t x0."""
        alpha, sig, _ = self._schedule_at(j)
        return {"epsilon": (1 / alpha, -sig / alpha), "sample": (0.0, 1.0),
                "v_prediction": (alpha, -sig)}[self.config.prediction_type]

    def _coefficients(self, i: int) -> np.ndarray:
        n = self.state_size
        columns = n + 1 + int(self.noisy)
        basis = np.eye(columns)
        # an undefined step (a zero log-SNR step, a singular system) gives NaN/inf here, as diffusers' own step
        # does: the table check in __init__ refuses it by name, so numpy's warnings would only repeat that
        with np.errstate(divide="ignore", invalid="ignore"):
            rows = self._update(i, [basis[k] for k in range(n)], basis[n], basis[n + 1] if self.noisy else None)
            if i == self.num_steps - 1:
                rows = [rows[0]] + [np.zeros(columns)] * (n - 1)  # reveal the sample only
            a_x, a_m = self._conversion(i)
            return np.concatenate([[a_x, a_m], np.stack(rows).ravel()])

    def step_coefficients(self, index: int) -> np.ndarray:
        return self._table[index]

    def _update(self, i, state, d, noise):
        raise NotImplementedError


class DPMSolverSampler(MultistepSampler):
    """Multistep DPM-Solver++ (Lu et al., arXiv 2211.01095) and its SDE variant, orders 1-3, as diffusers'
    DPMSolverMultistepScheduler. State: [x, D_{i-1}, ..., D_{i-order+1}], the earlier data predictions."""

    def __init__(self, config: ScheduleConfig, num_steps: int, options: SolverOptions = SolverOptions()):
        self.state_size = options.solver_order
        self.noisy = options.algorithm_type == "sde-dpmsolver++"
        super().__init__(config, num_steps, options)

    def _order(self, i: int) -> int:
        """Lower orders while there is not enough history, and at the end for stability (as diffusers)."""
        o, n = self.options, self.num_steps
        first = i == n - 1 and (o.euler_at_final or (o.lower_order_final and n < 15) or o.final_sigmas_type == "zero")
        second = i == n - 2 and o.lower_order_final and n < 15
        if o.solver_order == 1 or i < 1 or first:
            return 1
        if o.solver_order == 2 or i < 2 or second:
            return 2
        return 3

    def _update(self, i, state, d, noise):
        x, history = state[0], state[1:]
        m = [d] + history  # m[0] the current data prediction, m[k] the one k steps back
        alpha_t, sigma_t, lam_t = self._schedule_at(i + 1)
        _, sigma_s, lam_s = self._schedule_at(i)
        h = lam_t - lam_s
        sde = self.options.algorithm_type == "sde-dpmsolver++"
        order = self._order(i)
        # first order (= DDIM): x_t = (sigma_t/sigma_s) x - alpha_t (e^-h - 1) D0 (arXiv 2211.01095 eq. 9);
        # SDE variant (its Sec. 5): x_t = (sigma_t/sigma_s) e^-h x + alpha_t (1 - e^-2h) D0 + sigma_t sqrt(1 - e^-2h) z
        if sde:
            decay, g = sigma_t / sigma_s * np.exp(-h), -np.expm1(-2.0 * h)  # g = 1 - e^{-2h}
            out = decay * x + alpha_t * g * m[0] + sigma_t * np.sqrt(g) * noise
        else:
            phi = np.expm1(-h)  # e^{-h} - 1
            out = sigma_t / sigma_s * x - alpha_t * phi * m[0]
        if order == 1:
            return [out] + m[:len(history)]
        _, _, lam_s1 = self._schedule_at(i - 1)
        r0 = (lam_s - lam_s1) / h
        d1_0 = (m[0] - m[1]) / r0
        if order == 2:  # DPM-Solver++(2M) (arXiv 2211.01095 Alg. 2): D1 = (m0 - m1) / r0, r0 = h_{i-1} / h
            d1 = d1_0
            if sde:
                scale = 0.5 * g if self.options.solver_type == "midpoint" else g / (-2.0 * h) + 1.0
            else:
                scale = -0.5 * phi if self.options.solver_type == "midpoint" else phi / h + 1.0
            return [out + alpha_t * scale * d1] + m[:len(history)]
        _, _, lam_s2 = self._schedule_at(i - 2)
        r1 = (lam_s1 - lam_s2) / h
        d1_1 = (m[1] - m[2]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        # third order multistep (derivations: arXiv 2206.00927 Sec. 3.3 / App. B, in data-prediction form)
        if sde:
            out = out + alpha_t * (g / (-2.0 * h) + 1.0) * d1 + alpha_t * ((g - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * d2
        else:
            out = out + alpha_t * (phi / h + 1.0) * d1 - alpha_t * ((phi + h) / h**2 - 0.5) * d2
        return [out] + m[:len(history)]


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a^-1 b, or NaN where a is singular or not finite (an undefined step, refused by the sampler)."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.full(len(b), np.nan)


class UniPCSampler(MultistepSampler):
    """UniPC (Zhao et al., arXiv 2302.04867): the UniP predictor and UniC corrector with B(h) = h (bh1) or
    e^h - 1 (bh2), orders 1-3, as diffusers' UniPCMultistepScheduler. State: [x, the last corrected sample,
    m_{i-1}, ..., m_{i-order}] (earlier converted model outputs). The UNet runs on the predicted x; the
    corrector then refines it with that very output (no extra evaluation)."""

    def __init__(self, config: ScheduleConfig, num_steps: int, options: SolverOptions = SolverOptions(kind="unipc")):
        self.state_size = 2 + options.solver_order
        self._orders = []
        super().__init__(config, num_steps, options)

    def _bh_update(self, t: int, s0: int, earlier, base, m0, outputs, order: int, model_t=None):
        """UniP (``model_t`` None) or UniC (with ``model_t``, the output at the new point) of ``order`` from
        sigma index s0 to t; ``earlier[k]`` is the sigma index of ``outputs[k]`` (k steps before s0).

        x_t = (sigma_t/sigma_s0) x - alpha_t h phi_1(h) m0 - alpha_t B(h) sum_k rho_k D_k  (data prediction),
        with D_k = (m_k - m0) / r_k, r_k = (lambda_k - lambda_s0) / h, and rho solving R rho = b,
        R_ij = r_j^(i-1), b_i = (h phi_{i+1}(h)) i! / B(h) (arXiv 2302.04867 Alg. 2-3).
        """
        alpha_t, sigma_t, lam_t = self._schedule_at(t)
        _, sigma_s, lam_s = self._schedule_at(s0)
        h = lam_t - lam_s
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self._schedule_at(earlier[k - 1])[2] - lam_s) / h
            rks.append(rk)
            d1s.append((outputs[k - 1] - m0) / rk)
        rks = np.array(rks + [1.0])
        hh = -h
        h_phi_1 = np.expm1(hh)
        b_h = hh if self.options.solver_type == "bh1" else np.expm1(hh)
        h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1, []
        for k in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        r_matrix = np.stack([rks ** (k - 1) for k in range(1, order + 1)])
        b = np.array(b)
        if model_t is None:
            rhos = np.array([0.5]) if order == 2 else (_solve(r_matrix[:-1, :-1], b[:-1]) if order > 2 else [])
            residual = sum((r * dk for r, dk in zip(rhos, d1s)), np.zeros_like(m0))
        else:
            rhos = np.array([0.5]) if order == 1 else _solve(r_matrix, b)
            residual = sum((r * dk for r, dk in zip(rhos[:-1], d1s)), np.zeros_like(m0)) + rhos[-1] * (model_t - m0)
        return sigma_t / sigma_s * base - alpha_t * h_phi_1 * m0 - alpha_t * b_h * residual

    def _update(self, i, state, d, noise):
        o = self.options
        x, last, history = state[0], state[1], state[2:]  # history[k]: output of step i-1-k
        corrected = x
        if i > 0 and i - 1 not in o.disable_corrector:
            corrected = self._bh_update(i, i - 1, [i - 1 - k for k in range(1, o.solver_order)], last, history[0],
                                        history[1:], self._orders[i - 1], model_t=d)
        order = min(o.solver_order, self.num_steps - i) if o.lower_order_final else o.solver_order
        order = min(order, min(i, o.solver_order) + 1)  # warm-up: only i earlier outputs exist
        self._orders.append(order)
        x_next = self._bh_update(i + 1, i, [i - k for k in range(1, o.solver_order)], corrected, d, history, order)
        return [x_next, corrected] + ([d] + history)[:len(history)]


def make_sampler(kind: str, config: ScheduleConfig, num_steps: int, eta: float = 0.0, options: Optional[dict] = None):
    """The sampler called ``kind`` (one of SCHEDULERS) on ``config``; ``options``: the scheduler config dict
    the multistep solvers read their own fields from (solver_order, solver_type, ...)."""
    if kind not in SCHEDULERS:
        raise SchedulerConfigError(f"scheduler {kind!r} is not supported (supported: {', '.join(SCHEDULERS)})")
    if eta and kind != "ddim":
        raise SchedulerConfigError("eta is a DDIM option")
    if kind == "ddim":
        return DDIMSampler(config, num_steps, eta=eta)
    if kind == "ddpm":
        return DDPMSampler(config, num_steps)
    solver = SolverOptions.from_dict(dict(options or {}), kind)
    return DPMSolverSampler(config, num_steps, solver) if kind == "dpmsolver++" else UniPCSampler(config, num_steps, solver)


def default_scheduler(config: dict, fallback: str) -> str:
    """The sampler a checkpoint's scheduler config names (its ``_class_name``), or ``fallback`` when it names
    one we do not sample with (e.g. PNDM) or none."""
    return SCHEDULER_CLASSES.get(config.get("_class_name"), fallback)


def initial_state(sampler: Sampler, x_t: np.ndarray) -> np.ndarray:
    """What the user shares as the first step's input: x_T, stacked with zeros (nothing remembered yet)
    for a multistep sampler."""
    if not sampler.multistep:
        return x_t
    return np.concatenate([x_t[None], np.zeros((sampler.state_size - 1, *x_t.shape), x_t.dtype)])


def final_sample(sampler: Sampler, state: np.ndarray) -> np.ndarray:
    return np.asarray(state)[0] if sampler.multistep else np.asarray(state)


def multistep(state, model_output, coefficients, noise=None):
    """One multistep solver step from public coefficients (see the module docstring); runs under MPC.

    d enters the state only through M's column n, so M @ [state, d, noise] = M' @ [state, model_output, noise] with
    a_x * M[:, n] added to state[0]'s column and a_m * M[:, n] as model_output's: one dot, one truncation round, where
    forming d first takes two."""
    n = state.shape[0]
    basis = jnp.concatenate([state, model_output[None]] + ([noise[None]] if noise is not None else []))
    matrix = coefficients[2:].reshape(n, basis.shape[0])
    to_d = matrix[:, n:n + 1]
    folded = jnp.concatenate([matrix[:, :1] + coefficients[0] * to_d, matrix[:, 1:n], coefficients[1] * to_d,
                              matrix[:, n + 1:]], axis=1)
    return jnp.tensordot(folded, basis, axes=1)
