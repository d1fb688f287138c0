"""Secure sampling on a cluster: what the model owner uploads, what the parties build, what a user runs.

- The owner (`upload_model`) loads its checkpoint in plaintext, refuses NaN/inf naming the tensor,
  computes everything that depends only on its weights and the public timesteps (the time terms of
  every training timestep), and uploads the shares of the weights and time terms under a model id,
  with a public manifest: the model and scheduler configs and the owner's policy.
- Each party (`SamplingCatalog`) derives from the manifest which tensors the model consists of, and
  from a user's public job (sampler: ddim, ddpm, dpmsolver++ or unipc; steps, eta, batch, protocol set,
  guidance, image-to-image strength, ControlNet scale and guess mode) the step program: the same
  `make_denoise_step` the embedded session runs, compiled by the party itself, one executable for every
  step, with the public step coefficients made by the party. A multistep solver's options (order, solver
  type, ...) come from the owner's scheduler config; its state (the latent and the data predictions it
  remembers) is one resident secret from step to step. A model uploaded with a ControlNet
  (`models.ControlledUNet`) runs both networks in the step, both the owner's.
- The user (`sample_on_cluster`) shares its inputs (x_T, for a multistep solver stacked with zeros: nothing
  remembered yet; the one-hot labels or the text embeddings, and a control image; each step's noise) into
  the job's slots, runs the steps, and alone receives the result's shares (a multistep state's other rows
  are zeros by then).

Program value names (see `plan.Step`): ``model:NAME`` is a model tensor, ``slot:NAME`` a user's input,
anything else a value the program makes (``x/i`` the latent after step i, ``public/...`` public inputs).
"""

from __future__ import annotations

import functools
import json
import math
import uuid
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import spu
import spu.libspu as libspu
from flax.traverse_util import flatten_dict, unflatten_dict

from . import registry, spu_config
from .client import PartyClients, require_role
from .errors import ClusterError, InputError, ProtocolError
from .messages import ModelBegin, ModelInfo, ModelPut, ModelRef, SessionOpen, SessionPut, SessionRef, SessionStep
from .models import (ConfigError, ControlledUNet, ScheduleConfig, UNet2DConditionModel, UNet2DModel, sample_shape,
                     schedulers)
from .models.img2img import StrengthSampler
from .models.schedulers import SchedulerConfigError
from .plan import JobTerms, Policy, Step, StepProgram
from .profiling import RunStats, SpuLog, combine_party_runs
from .ring import bit_times, indicator
from .sampling import StepReport, is_text_conditional, needs_noise, sampler_step, secure_params
from .session import compile_function
from .share_wire import chunks_of, content_of

MANIFEST_FORMAT = "cipherdm-spu/model-1"
MODEL_KINDS = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel, "ControlledUNet": ControlledUNet}
#: the most training timesteps a served model may have (its owner uploads time terms for every one)
MAX_TRAIN_TIMESTEPS = 10000
#: tensors per upload call, and the most bytes of shares in one (each call is one message to each party)
UPLOAD_BATCH = 256
UPLOAD_BYTES = 64 << 20
JOB_FIELDS = {"sampler", "steps", "eta", "batch", "protocol_set", "overrides", "guidance_scale", "tokens", "strength",
              "controlnet_scale", "guess_mode"}


# -- the manifest and the tensors of a model ----------------------------------------------------


def _model(manifest: Mapping):
    kind = manifest.get("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    try:
        return MODEL_KINDS[kind].from_config(manifest.get("config") or {})
    except (ConfigError, TypeError) as e:
        raise ValueError(f"model config: {e}") from None


def _schedule(manifest: Mapping) -> ScheduleConfig:
    try:
        schedule = ScheduleConfig.from_dict(manifest.get("scheduler") or {})
    except (SchedulerConfigError, TypeError) as e:
        raise ValueError(f"scheduler config: {e}") from None
    if schedule.num_train_timesteps > MAX_TRAIN_TIMESTEPS:  # the owner uploads time terms for each
        raise ValueError(f"num_train_timesteps {schedule.num_train_timesteps} is above {MAX_TRAIN_TIMESTEPS}")
    return schedule


def parse_manifest(text: str) -> dict:
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:  # (nesting past Python's recursion limit: RecursionError)
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"a manifest is an object with format {MANIFEST_FORMAT!r}")
    unknown = set(manifest) - {"format", "kind", "config", "scheduler", "policy"}
    if unknown:
        raise ValueError(f"unknown manifest fields {sorted(unknown)}")
    Policy.from_dict(manifest.get("policy"))
    return manifest


def weight_names(tree) -> Dict[str, object]:
    """Model tensors of the weights the secure step uses, by name (``w/...``)."""
    return {"w/" + "/".join(path): leaf for path, leaf in flatten_dict(secure_params(tree)).items()}


def time_term_names(tree, timestep: int) -> Dict[str, object]:
    """Model tensors of one timestep's time terms, by name (``t/TIMESTEP/...``)."""
    return {f"t/{timestep}/" + "/".join(map(str, path)): leaf for path, leaf in _flat_terms(tree).items()}


def _flat_terms(tree) -> dict:
    paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key(k) for k in path): leaf for path, leaf in paths}


def _key(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


@functools.lru_cache(maxsize=8)
def _shapes(manifest_text: str):
    """(model, schedule, weight shapes, time-term shapes of one timestep), without allocating weights."""
    manifest = parse_manifest(manifest_text)
    model, schedule = _model(manifest), _schedule(manifest)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *model.example_inputs()))
    terms = jax.eval_shape(lambda p: model.apply(p, 0, method=model.time_terms), params)
    return model, schedule, params, terms


class SamplingCatalog:
    """The party's `plan.JobCatalog` for diffusion sampling with this project's UNet ports."""

    def model_tensors(self, manifest: str, most: int) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        _, schedule, params, terms = _shapes(manifest)
        specs = {name: (tuple(s.shape), str(s.dtype)) for name, s in weight_names(params).items()}
        count = len(specs) + schedule.num_train_timesteps * len(time_term_names(terms, 0))
        if count > most:  # counted before the list is built: a small manifest can name millions of time terms
            raise ValueError(f"the model has {count} tensors, more than {most}")
        for t in range(schedule.num_train_timesteps):
            specs.update({name: (tuple(s.shape), str(s.dtype)) for name, s in time_term_names(terms, t).items()})
        return specs

    def terms(self, manifest: str, job: str) -> JobTerms:
        model, schedule, _, _ = _shapes(manifest)
        spec = parse_job(job, model, schedule)
        make_sampler(spec, schedule, parse_manifest(manifest)["scheduler"])  # a bad combination fails here, uncompiled
        controlnet_scale = float(spec["controlnet_scale"]) if isinstance(model, ControlledUNet) else None
        return JobTerms(spec["protocol_set"], spec["batch"], spec["steps"], json.dumps(spec, sort_keys=True),
                        tuple(sorted(spec["overrides"])), float(spec["guidance_scale"]), controlnet_scale)

    def program(self, manifest: str, job: str, fraction_bits: int) -> StepProgram:
        return _program(manifest, self.terms(manifest, job).canonical, fraction_bits)


@functools.lru_cache(maxsize=4)
def _program(manifest: str, job: str, fraction_bits: int) -> StepProgram:
    """The step program of ``job`` (cached: compiling a UNet step takes SPU's compiler many seconds)."""
    model, schedule, params, terms = _shapes(manifest)
    spec = parse_job(job, model, schedule)
    sampler = make_sampler(spec, schedule, parse_manifest(manifest)["scheduler"])
    pset = registry.resolve(spec["protocol_set"], spec["overrides"])
    batch, text = spec["batch"], is_text_conditional(model)
    guidance = spec["guidance_scale"] if text else 1.0
    latent = (batch, *sample_shape(model.config))
    slots = {"x": ((sampler.state_size, *latent) if sampler.multistep else latent, "float32")}
    if text:
        context = (batch, spec["tokens"], model.config.cross_attention_dim)
        slots.update({f"condition/{k}": (context, "float32") for k in range(2 if guidance > 1.0 else 1)})
    if isinstance(model, ControlledUNet):  # the user's control image follows the contexts; the job sets the scale
        model = model.clone(conditioning_scale=float(spec["controlnet_scale"]), guess_mode=spec["guess_mode"])
        contexts = sum(name.startswith("condition/") for name in slots)
        slots[f"condition/{contexts}"] = (model.control_image_shape(latent[0], latent[2], latent[3]), "float32")
    elif model.config.num_class_embeds:
        slots["condition/0"] = ((batch, model.config.num_class_embeds), "float32")
    noisy = needs_noise(sampler)
    if noisy:
        slots.update({f"noise/{i}": (latent, "float32") for i in range(sampler.num_steps)})
    condition_slots = sorted(k for k in slots if k.startswith("condition/"))

    # The step's arguments, as the names of the values bound to them (flattened in the same order)
    weights = {name: _Named("model:" + name) for name in weight_names(params)}
    weight_tree = _unflatten_like(secure_params(params), weights)

    def arguments(i: int, t: int):
        x = _Named("slot:x" if i == 0 else f"x/{i}")
        if condition_slots:
            condition = tuple(_Named("slot:" + k) for k in condition_slots)
            condition = condition if text else condition[0]
        else:
            condition = None
        term_tree = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(terms), [_Named("model:" + n) for n in time_term_names(terms, t)])
        noise = _Named(f"slot:noise/{i}") if noisy else None
        return (weight_tree, x, condition, term_tree, _Named("public/coefficients"), noise)

    t0 = int(sampler.timesteps[0])
    leaves, in_tree = jax.tree_util.tree_flatten(arguments(0, t0), is_leaf=_is_named)
    known = {"model:" + n: (tuple(v.shape), str(v.dtype))
             for n, v in {**weight_names(params), **time_term_names(terms, t0)}.items()}
    known.update({"slot:" + n: spec for n, spec in slots.items()})
    coefficients = sampler.coefficient_table()  # (steps, ...): a vector per step, or a multistep solver's matrix
    known["public/coefficients"] = (tuple(coefficients.shape[1:]), "float32")
    specs = tuple((*known[leaf.name], "public" if leaf.name.startswith("public/") else "secret") for leaf in leaves)
    policy = Policy.from_dict(parse_manifest(manifest).get("policy"))
    step_fn = clamped_inputs(sampler_step(model, sampler, guidance), policy.input_bound)
    try:
        compiled = compile_function(step_fn, in_tree, specs, pset, fraction_bits)
    except InputError as e:
        raise ValueError(str(e)) from None
    steps = []
    for i, t in enumerate(sampler.timesteps):
        names, _ = jax.tree_util.tree_flatten(arguments(i, int(t)), is_leaf=_is_named)
        frees = ("slot:x" if i == 0 else f"x/{i}",) + ((f"slot:noise/{i}",) if noisy else ())
        steps.append(Step(
            inputs=tuple(n.name for n in names),
            model_tensors=tuple(time_term_names(terms, int(t))),
            public={"public/coefficients": coefficients[i]},
            output=f"x/{i + 1}", frees=frees,
        ))
    return StepProgram(
        code=compiled.code, name=compiled.name, protocol_set=spec["protocol_set"],
        runtime_options=dict(pset.runtime), batch=batch, slots=slots, resident=tuple(weights),
        steps=tuple(steps), result=f"x/{sampler.num_steps}",
        description={"sampler": spec["sampler"], "timesteps": [int(t) for t in sampler.timesteps],
                     "kernels": pset.name},
    )


def clamped_inputs(step_fn, bound: float):
    """``step_fn`` with its secret inputs (the sampler's state x, the conditions, the noise) clamped to [-bound, bound]
    before the step uses them (`Policy.input_bound`), on all of them as one vector:
    v + [v > b and v >= 0] (b - v) + [v < -b and v < 0] (-b - v).

    Under SPU a comparison is the sign of a difference, which wraps for |v| near the ring's edge (2^45 at 18 fraction
    bits: b - v for v near -2^45 reads as negative, "v > b"); the sign of v itself never wraps, so each side is gated
    on it (an independent review fed such values to a clamp without it, and got -v back). The three signs take one
    batched MSB extraction's rounds, the two gates one AND, and the two bits are converted once and multiplied in as
    integers (`ring.bit_times`)."""

    def step(weights, x, condition, terms, coefficients, noise):
        leaves, tree = jax.tree_util.tree_flatten((x, condition, noise))
        v = jnp.concatenate([leaf.ravel() for leaf in leaves])
        above, below, negative = jnp.stack([bound - v, bound + v, v]) < 0
        sides = indicator(jnp.stack([above & ~negative, below & negative]))
        v = v + bit_times(sides, jnp.stack([bound - v, -bound - v])).sum(axis=0)
        ends = np.cumsum([leaf.size for leaf in leaves])[:-1]
        clamped = [part.reshape(leaf.shape) for part, leaf in zip(jnp.split(v, ends), leaves)]
        x, condition, noise = jax.tree_util.tree_unflatten(tree, clamped)
        return step_fn(weights, x, condition, terms, coefficients, noise)

    return step


class _Named:
    """A placeholder leaf: the name of the value bound to an argument."""

    def __init__(self, name: str):
        self.name = name


def _is_named(x) -> bool:
    return isinstance(x, _Named)


def _unflatten_like(tree, named: Dict[str, _Named]):
    return unflatten_dict({path: named["w/" + "/".join(path)] for path in flatten_dict(tree)})


def _finite_number(value) -> bool:
    """A JSON number that is finite as a float: not a bool, and not an integer too large to be one (math.isfinite would
    raise OverflowError on 10**400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 2.0**1023 if isinstance(value, int) else math.isfinite(value)


def parse_job(text: str, model, schedule: ScheduleConfig) -> dict:
    """The user's job description, validated (ValueError naming the field)."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:  # (nesting past Python's recursion limit: RecursionError)
        raise ValueError(f"the job is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"a job is an object with fields {sorted(JOB_FIELDS)}")
    if set(raw) - JOB_FIELDS:
        raise ValueError(f"unknown job fields {sorted(set(raw) - JOB_FIELDS)} (a job has {sorted(JOB_FIELDS)})")
    job = {"sampler": raw.get("sampler", "ddim"), "steps": raw.get("steps"), "eta": raw.get("eta", 0.0),
           "batch": raw.get("batch"), "protocol_set": raw.get("protocol_set", "cipherdm"),
           "overrides": raw.get("overrides") or {}, "guidance_scale": raw.get("guidance_scale", 1.0),
           "tokens": raw.get("tokens", 77), "strength": raw.get("strength", 1.0),
           "controlnet_scale": raw.get("controlnet_scale", 1.0), "guess_mode": raw.get("guess_mode", False)}
    if job["sampler"] not in schedulers.SCHEDULERS:
        raise ValueError(f"sampler must be one of {', '.join(schedulers.SCHEDULERS)}, got {job['sampler']!r}")
    for key, low, high in (("steps", 1, schedule.num_train_timesteps), ("batch", 1, 1024), ("tokens", 1, 1024)):
        value = job[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{key} must be an integer in {low}..{high}, got {value!r}")
    for key, low in (("eta", 0.0), ("guidance_scale", 0.0), ("strength", 0.0)):
        value = job[key]
        if not _finite_number(value) or value < low:
            raise ValueError(f"{key} must be a finite number >= {low:g}, got {value!r}")
    if job["eta"] > 1.0:  # DDIM's sigma would scale the user's noise by up to eta (models.schedulers.DDIMSampler)
        raise ValueError(f"eta must be in [0, 1], got {job['eta']!r}")
    if not 0.0 < job["strength"] <= 1.0:  # image-to-image: the user shares its noised latent at step strength * T
        raise ValueError(f"strength must be in (0, 1], got {job['strength']!r}")
    scale = job["controlnet_scale"]
    if not _finite_number(scale):
        raise ValueError(f"controlnet_scale must be a finite number, got {scale!r}")
    if not isinstance(job["guess_mode"], bool):
        raise ValueError(f"guess_mode must be true or false, got {job['guess_mode']!r}")
    if not isinstance(model, ControlledUNet) and (scale != 1.0 or job["guess_mode"]):
        raise ValueError("controlnet_scale and guess_mode are for a model uploaded with a ControlNet")
    if not isinstance(job["overrides"], dict) or not all(isinstance(v, str) for v in job["overrides"].values()):
        raise ValueError("overrides must map ops to kernel names")
    if job["protocol_set"] not in registry.available_protocol_sets():
        raise ValueError(f"unknown protocol set {job['protocol_set']!r}; available: "
                         f"{', '.join(registry.available_protocol_sets())}")
    try:
        registry.validate(registry.resolve(job["protocol_set"], job["overrides"]))
    except ProtocolError as e:
        raise ValueError(str(e)) from None
    if not is_text_conditional(model) and job["guidance_scale"] != 1.0:
        raise ValueError("guidance_scale is for text-conditional models only")
    return job


def make_sampler(job: dict, schedule: ScheduleConfig, scheduler_config: Optional[Mapping] = None):
    """The job's sampler; a multistep solver takes its options from the owner's scheduler config. With a strength
    below 1 (image-to-image) only the last int(steps * strength) steps run (`models.img2img.StrengthSampler`)."""
    try:
        sampler = schedulers.make_sampler(job["sampler"], schedule, job["steps"], eta=float(job["eta"]),
                                          options=scheduler_config)
        return sampler if job.get("strength", 1.0) == 1.0 else StrengthSampler(sampler, job["strength"])
    except SchedulerConfigError as e:
        raise ValueError(str(e)) from None


def check_shareable(array: np.ndarray, what: str, limit: float) -> None:
    """Refuse, naming the value, NaN/inf and values beyond the fixed-point range, before anything is shared."""
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what} contains NaN or infinity; refusing to share it")
    if array.size and np.max(np.abs(array)) >= limit:
        raise InputError(f"{what} holds values beyond the fixed-point range (|x| < {limit:.3g}); refusing to share it")


# -- the model owner ----------------------------------------------------------------------------


def build_manifest(model, schedule_config: Mapping, policy: Policy) -> str:
    return json.dumps({
        "format": MANIFEST_FORMAT, "kind": type(model).__name__, "config": model.config.to_dict(),
        "scheduler": dict(schedule_config), "policy": policy.to_dict(),
    }, sort_keys=True)


def owner_tensors(model, params, num_train_timesteps: int) -> Dict[str, np.ndarray]:
    """Every tensor the owner uploads: the secure weights and the time terms of every training timestep."""
    tensors = {name: np.asarray(v, np.float32) for name, v in weight_names(params).items()}
    time_terms = jax.jit(jax.vmap(lambda t: model.apply(params, t, method=model.time_terms)))
    all_terms = time_terms(np.arange(num_train_timesteps))
    for t in range(num_train_timesteps):
        one = jax.tree_util.tree_map(lambda a: np.asarray(a[t], np.float32), all_terms)
        tensors.update(time_term_names(one, t))
    return tensors


def upload_model(clients: PartyClients, model_id: str, model, params, schedule_config: Mapping, policy: Policy,
                 progress: Optional[Callable[[int, int], None]] = None) -> ModelInfo:
    """Share the model under ``model_id`` in this owner's namespace (party i receives share i only); returns the
    sealed model's info, the same on the three parties: its owner (the name users give as the model's owner, this
    client's certificate name) and manifest digest."""
    require_role(clients, "owner")
    limit = spu_config.largest_magnitude(clients.cluster.field, clients.cluster.fraction_bits)
    for name, leaf in flatten_dict(params).items():  # refuse before anything is computed or shared
        check_shareable(np.asarray(leaf), f"weight {'/'.join(name)}", limit)
    schedule = ScheduleConfig.from_dict(dict(schedule_config))
    manifest = build_manifest(model, schedule_config, policy)
    tensors = owner_tensors(model, params, schedule.num_train_timesteps)
    for name, value in tensors.items():
        check_shareable(value, f"model tensor {name}", limit)
    clients.check_ready()
    io = _share_io(clients)
    clients.call_all("model_begin", ModelBegin(model_id, manifest))
    names, done = sorted(tensors), 0
    for batch in _upload_batches(names, tensors):
        shares = [io.make_shares(tensors[n], libspu.Visibility.VIS_SECRET) for n in batch]
        clients.call_all("model_put", lambda rank: ModelPut(model_id, batch, [s[rank].meta for s in shares]),
                         contents=lambda rank: [content_of(s[rank].share_chunks) for s in shares])
        done += len(batch)
        if progress is not None:
            progress(done, len(names))
    infos = clients.call_all("model_seal", ModelRef(model_id))
    if len({(info.digest, info.owner) for info in infos}) != 1:
        raise ClusterError(f"the parties sealed different manifests or owners for {model_id!r}")
    return infos[0]


def _share_io(clients: PartyClients) -> spu.Io:
    """SPU's Io, which cuts this client's values into shares for the cluster's runtime; SPU's log goes to its file
    (`SpuLog`), never to the terminal."""
    SpuLog.get()
    return spu.Io(3, clients.cluster.runtime_config())


def _upload_batches(names, tensors):
    """Groups of at most UPLOAD_BATCH tensors and about UPLOAD_BYTES of shares (a bigger tensor goes alone)."""
    batch, size = [], 0
    for name in names:
        nbytes = 16 * tensors[name].size  # an ABY3 share of a 64-bit ring element: two of them
        if batch and (len(batch) == UPLOAD_BATCH or size + nbytes > UPLOAD_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += nbytes
    if batch:
        yield batch


# -- a user -------------------------------------------------------------------------------------


def model_manifest(clients: PartyClients, model_id: str, *, owner: str) -> dict:
    """The public manifest of ``owner``'s model ``model_id``, checked to be the same on the three parties."""
    infos = clients.call_all("model_info", ModelRef(model_id, owner))
    if len({info.digest for info in infos}) != 1 or {info.owner for info in infos} != {owner}:
        raise ClusterError(f"the parties hold different models under {owner}'s {model_id!r}")
    return parse_manifest(infos[0].manifest)


def sample_on_cluster(clients: PartyClients, model_id: str, job: dict, x_t: np.ndarray, condition=None,
                      step_noise: Optional[np.ndarray] = None,
                      on_step: Optional[Callable[[StepReport], None]] = None, *,
                      owner: str) -> tuple[np.ndarray, RunStats, List[StepReport]]:
    """Run a sampling job as the user; returns (the result, revealed to this user only, cost, per-step cost).

    ``condition``: the one-hot labels, or the tuple of text contexts (`sampling.text_condition`).
    ``owner``: whose model ``model_id`` is (each owner's ids are its own namespace); the three parties must report that
    owner.
    """
    require_role(clients, "user")
    clients.check_ready()
    session_id = uuid.uuid4().hex[:16]
    open_request = SessionOpen(session_id, model_id, json.dumps(job, sort_keys=True), owner)
    try:
        opened = clients.until_done("session_open", open_request, "opening the session")
        if len({o["executable_sha256"] for o in opened}) != 1:
            raise ClusterError("the parties compiled different executables for the same job; refusing to run")
        owners = sorted({o["model_owner"] for o in opened})
        if len(owners) != 1:
            raise ClusterError(f"the parties hold model {model_id!r} from different owners ({', '.join(owners)}); "
                               "refusing to run")
        if owners[0] != owner:
            raise ClusterError(f"model {model_id!r} was uploaded by {owners[0]!r}, not {owner!r}; "
                               "refusing to send it inputs")
        clients.until_done("session_start", SessionRef(session_id), "starting the session")
        slots = opened[0]["slots"]
        state = tuple(slots["x"][0])  # a multistep solver's state: x_T and rows of zeros (nothing remembered yet)
        values = {"x": x_t if state == x_t.shape else
                  np.concatenate([x_t[None], np.zeros((state[0] - 1, *x_t.shape), np.float32)])}
        if condition is not None:
            parts = condition if isinstance(condition, tuple) else (condition,)
            values.update({f"condition/{k}": v for k, v in enumerate(parts)})
        if step_noise is not None:
            values.update({f"noise/{i}": v for i, v in enumerate(step_noise)})
        if set(values) != set(slots):
            raise InputError(f"the job takes inputs {sorted(slots)}, given {sorted(values)}")
        io = _share_io(clients)
        limit = spu_config.largest_magnitude(clients.cluster.field, clients.cluster.fraction_bits)
        for slot, value in values.items():
            shape, dtype = slots[slot]
            array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
            if array.shape != tuple(shape):
                raise InputError(f"input {slot}: expected shape {tuple(shape)}, got {array.shape}")
            check_shareable(array, f"input {slot}", limit)
            shares = io.make_shares(array, libspu.Visibility.VIS_SECRET)
            clients.put_shares("session_put", shares, lambda rank, s, slot=slot: SessionPut(session_id, slot, s.meta))
        total, reports = RunStats.zero(), []
        timesteps = opened[0]["timesteps"]
        for i in range(opened[0]["steps"]):
            party_runs = clients.until_done("session_step", SessionStep(session_id, i), f"step {i}")
            stats = combine_party_runs(party_runs, max(r["seconds"] for r in party_runs))
            total = total + stats
            report = StepReport(int(timesteps[i]), stats.seconds, stats.bytes_sent, stats.send_actions)
            reports.append(report)
            if on_step is not None:
                on_step(report)
        shares = clients.call_all("session_result", SessionRef(session_id))
        result = []
        for share in shares:
            s = libspu.Share()
            s.meta, s.share_chunks = share.meta, chunks_of(share.content)
            result.append(s)
        image = np.asarray(io.reconstruct(result)).reshape(state)
        image = image if state == x_t.shape else image[0]
    finally:  # every party that can be reached ends the session, whatever the others do
        for reason in clients.close_session(session_id):
            warnings.warn(f"session {session_id} was not closed there: {reason}; that party drops it, and the shares "
                          "it holds, after its session_idle_s", stacklevel=2)
    return image, total, reports
