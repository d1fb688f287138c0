"""What a party agrees to run: the owner's policy for a model, and the step program of a session.

A party never runs code it is sent. For each session it builds the program itself, from the model
owner's public manifest and the user's public job description (`JobCatalog`, provided by the
application that the party serves), compiles it, audits the compiled IR, and checks the job against
the owner's policy. The same inputs give all three parties the same executable, so a client can
compare their digests.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np

#: names of models and sessions: short, printable, no path or separator characters
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

TensorSpec = Tuple[Tuple[int, ...], str]  # (shape, numpy dtype name)

#: the largest input bound an owner may set: a diffusion model's inputs are units to tens; beyond this the bound no
#: longer keeps x * W, and SPU's truncation failures with it, near what in-range inputs give
MAX_INPUT_BOUND = 65536.0
#: the smallest: well above the fixed point's resolution (2^-18), so that the clamp's constants keep their value
MIN_INPUT_BOUND = 2.0**-10
#: the largest public scale an owner may let a job multiply the weights' values by (`Policy.max_guidance_scale`,
#: `Policy.max_controlnet_scale`): like the input bound's, a cap on what an owner may allow, so that the values a job
#: reaches stay within about 2^10 of what unscaled jobs give
MAX_JOB_SCALE = 1000.0


@dataclasses.dataclass(frozen=True)
class Policy:
    """The model owner's terms, part of the public manifest (``"policy"``).

    users: client names allowed to sample (None: every user); protocol_sets: the protocol sets a
    session may use (None: any installed one); max_batch / max_steps: bounds on one session;
    input_bound: every secret input of a step (the user's noise, latents, conditions, and the sampler's state) is
    clamped to [-input_bound, input_bound] inside the step program, before it meets a weight. Without it a user
    could share huge values and learn from how often SPU's truncation then fails (its probability grows with
    the magnitude of x * W) the magnitudes of the first layers' weights.
    max_guidance_scale / max_controlnet_scale: bounds on the job's public scales that multiply values computed from
    the weights after that clamp (classifier-free guidance's eps_u + g (eps_c - eps_u); a ControlNet's residuals,
    by |scale|): unbounded, a job could blow those values up to where truncations fail, as huge inputs would.
    """

    users: Optional[Tuple[str, ...]] = None
    protocol_sets: Optional[Tuple[str, ...]] = None
    max_batch: int = 64
    max_steps: int = 1000
    input_bound: float = 256.0
    max_guidance_scale: float = 20.0
    max_controlnet_scale: float = 2.0

    @classmethod
    def from_dict(cls, raw) -> "Policy":
        if raw is None:
            return cls()
        if not isinstance(raw, dict) or set(raw) - set(POLICY_FIELDS):
            raise ValueError(f"policy must be an object with {', '.join(POLICY_FIELDS)}")
        values = {}
        for key in ("users", "protocol_sets"):
            if raw.get(key) is not None:
                if not isinstance(raw[key], list) or not all(isinstance(v, str) and v for v in raw[key]):
                    raise ValueError(f"policy.{key} must be a list of names or null")
                values[key] = tuple(raw[key])
        for key in ("max_batch", "max_steps"):
            if key in raw:
                if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
                    raise ValueError(f"policy.{key} must be a positive integer")
                values[key] = raw[key]
        if "input_bound" in raw:
            bound = raw["input_bound"]  # (exact comparisons: a huge integer or NaN is refused, never converted)
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not MIN_INPUT_BOUND <= bound <= MAX_INPUT_BOUND:
                raise ValueError(f"policy.input_bound must be a number in [{MIN_INPUT_BOUND:g}, {MAX_INPUT_BOUND:g}]")
            values["input_bound"] = float(bound)
        # (a guidance scale of 1 is no guidance, which every policy allows; a ControlNet scale of 0 switches it off)
        for key, low in (("max_guidance_scale", 1.0), ("max_controlnet_scale", 0.0)):
            if key in raw:
                scale = raw[key]
                if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not low <= scale <= MAX_JOB_SCALE:
                    raise ValueError(f"policy.{key} must be a number in [{low:g}, {MAX_JOB_SCALE:g}]")
                values[key] = float(scale)
        return cls(**values)

    def to_dict(self) -> dict:
        return {
            "users": None if self.users is None else list(self.users),
            "protocol_sets": None if self.protocol_sets is None else list(self.protocol_sets),
            "max_batch": self.max_batch, "max_steps": self.max_steps, "input_bound": self.input_bound,
            "max_guidance_scale": self.max_guidance_scale, "max_controlnet_scale": self.max_controlnet_scale,
        }

    def refusal(self, user: str, job: "JobTerms") -> Optional[str]:
        """Why ``user`` may not run ``job`` on this model (None: allowed)."""
        if self.users is not None and user not in self.users:
            return f"the model owner's policy does not list user {user!r}"
        if self.protocol_sets is not None and job.protocol_set not in self.protocol_sets:
            return (f"the model owner's policy allows protocol sets {', '.join(self.protocol_sets)}, "
                    f"not {job.protocol_set!r}")
        if self.protocol_sets is not None and job.overridden_ops:
            return (f"the model owner's policy allows protocol sets {', '.join(self.protocol_sets)} as they are, "
                    f"without kernels from elsewhere (overrides of {', '.join(job.overridden_ops)})")
        if job.batch > self.max_batch:
            return f"batch {job.batch} is above the policy's max_batch {self.max_batch}"
        if job.steps > self.max_steps:
            return f"{job.steps} steps are above the policy's max_steps {self.max_steps}"
        if not job.guidance_scale <= self.max_guidance_scale:  # (so that a NaN is refused too)
            return (f"guidance_scale {job.guidance_scale:g} is above the policy's max_guidance_scale "
                    f"{self.max_guidance_scale:g}")
        if job.controlnet_scale is not None and not abs(job.controlnet_scale) <= self.max_controlnet_scale:
            return (f"controlnet_scale {job.controlnet_scale:g} is beyond the policy's max_controlnet_scale "
                    f"{self.max_controlnet_scale:g} (either sign)")
        return None


#: the fields of a policy (`Policy.from_dict`)
POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(Policy))


@dataclasses.dataclass(frozen=True)
class Step:
    """One run of the executable: its inputs by name, in the executable's order, and its output.

    Names are resident values: model tensors (``model_tensors`` are loaded for this step only),
    the user's slots, public values the party makes itself (``public``), and earlier outputs.
    """

    inputs: Tuple[str, ...]
    model_tensors: Tuple[str, ...]
    public: Mapping[str, np.ndarray]
    output: str
    #: values no longer needed after this step (earlier outputs, slots used once)
    frees: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """A session's approved program: one executable, run once per step; one result, to the user."""

    code: bytes
    name: str
    protocol_set: str
    #: the protocol set's SPU runtime options (approximation knobs only; see `spu_config`)
    runtime_options: Mapping[str, object]
    batch: int
    #: the user's inputs, by slot name
    slots: Mapping[str, TensorSpec]
    #: model tensors resident for the whole session (the weights)
    resident: Tuple[str, ...]
    steps: Tuple[Step, ...]
    #: the value whose shares go to the user after the last step
    result: str
    #: public facts about the job for reports (timesteps, sampler, ...)
    description: Mapping[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class JobTerms:
    """What the owner's policy judges in a job, known before anything is compiled."""

    protocol_set: str
    batch: int
    steps: int
    #: the job in one canonical text: equal jobs compile once, and the parties compare it
    canonical: str
    #: the ops the job names in its overrides (sorted): a policy listing protocol sets refuses any
    overridden_ops: Tuple[str, ...] = ()
    #: public scales the job multiplies values computed from the weights by: classifier-free guidance's (1: no
    #: guidance), and a ControlNet's residuals' (1: unscaled; None for a model without a ControlNet)
    guidance_scale: float = 1.0
    controlnet_scale: Optional[float] = None


class JobCatalog(Protocol):
    """What the application tells a party about the programs it may run (each call may take seconds:
    the party runs them in its compiler process, never in its control service)."""

    def model_tensors(self, manifest: str, most: int) -> Mapping[str, TensorSpec]:
        """The tensors a model with this manifest consists of; ValueError for a manifest it cannot serve, or for one
        of more than ``most`` tensors (refused before they are listed)."""

    def terms(self, manifest: str, job: str) -> JobTerms:
        """Validate ``job`` on this model without compiling it; ValueError for a bad job."""

    def program(self, manifest: str, job: str, fraction_bits: int) -> StepProgram:
        """Build and compile the step program of a canonical job on this model; ValueError for a bad job."""


def names_of(values: Sequence[str]) -> str:
    return ", ".join(values[:3]) + (f" and {len(values) - 3} more" if len(values) > 3 else "")
