"""Benchmark harness: every kernel per protocol set, one denoising step per set, its kernel breakdown, and
network estimates.

- `measure_kernels` runs every op of one protocol set on its own under the session: bytes per element per
  party, send actions, and the error against the float64 references of `cipherdm_spu.protocols.reference`
  (docs/results/kernels.md, scripts/benchmark_kernels.py); `measure_override` one activation of a set with
  its kernel overridden (`OVERRIDE_KERNELS`: kernels outside the sets).

- `StepCase` is a UNet step with fixed inputs: it runs under a session (weights and inputs secret, the
  owner's time terms shared, coefficients public) and in plaintext float32 for the error.
- `kernel_breakdown` finds every registered op the step calls (op, shapes, parameters, from the jaxpr)
  and runs exactly those calls on their own under the same session: the bytes, send actions and seconds of
  each kernel at the model's shapes, its seconds also split by SPU's own ops (`COMPARISON_OPS` among them).
  What the step costs beyond their sum is the linear part (convolutions, matmuls, the norms' arithmetic) and
  the sampler update.
- `FLOORS`, protocol sets measured beside the real ones, not correct networks: `linear_floor`, whose every kernel
  is the identity (what any kernel design leaves), and `cipherdm_spu.floor_kernels.kernel_floor`, whose kernels
  are only the blocks every kernel of our designs needs (what no such kernel can beat in bytes, nor, but for the
  softmax's row max by pairs, in seconds; rounds: scripts/rounds_budget.py).
- `estimate_latency`: measured seconds (three parties in one process, memory links) plus the busiest
  party's bytes over the bandwidth plus one one-way latency (RTT/2) per send action of the busiest party;
  ABY3 parties send one message per round, so send actions count rounds.
- `estimate_terms` splits a cluster run the same way, with the compute term from the parties themselves:
  the busiest party's CPU seconds (what one host of its own would spend), not the one-process wall time,
  which counts all three parties' work on this machine's cores.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import linalg, ops, registry
from .floor_kernels import kernel_floor
from .models import DDIMSampler, ScheduleConfig, UNet2DModel, sample_shape
from .profiling import RunStats
from .protocols.cipherdm import fold_exps_pays, softmax_in_form, tournament_levels
from .protocols.reference import EXTREMES, REFERENCES, encoded, softmax
from .sampling import make_denoise_step, secure_params
from .session import Public, SecureSession

ACTIVATIONS = ("silu", "mish", "gelu", "sigmoid")
SOFTMAX_ROWS = {16: 4.0, 64: 6.0, 256: 3.0, 1024: 2.0}  # row width: standard deviation of its logits
#: calls on which `cipherdm`'s softmax forms are measured side by side: the MNIST UNets' attention (2 heads of
#: 49 x 49) at batches 1 and 8, 1024-wide rows, and the SD-shaped UNet's largest calls (4 heads of 256 x 256 and of
#: 256 x 77)
SOFTMAX_FORM_SHAPES = ((98, 49), (784, 49), (8, 1024), (32, 1024), (1024, 77), (1024, 256))
NETWORKS = {"LAN": (5e9, 0.4e-3), "WAN": (400e6, 40e-3)}  # bits per second, round-trip seconds
#: SPU's comparison ops (pphlo): an MSB extraction each, the local compute that comparison-based kernels spend most on
COMPARISON_OPS = ("less", "greater", "less_equal", "greater_equal")
IDENTITY = "identity"

def _identity(x, *others, **params):
    """The first operand, at the op's result shape (an rsqrt's ``times`` is the kernel's to apply, and is dropped)."""
    return jnp.broadcast_to(x, jnp.broadcast_shapes(x.shape, *(o.shape for o in others)))


for _op in registry.OPS:
    registry.register_kernel(_op, IDENTITY, _identity)


def linear_floor(base: str = registry.BASELINE) -> registry.ProtocolSet:
    """``base`` with every nonlinear kernel replaced by the identity (a lower bound, not a model)."""
    pset = registry.resolve(base, {op: IDENTITY for op in registry.OPS})
    return dataclasses.replace(pset, name="linear-floor", description="every kernel replaced by the identity")


#: protocol sets that bound what kernels can reach, by name: measured beside the real sets, with no error of their own
FLOORS = {"linear-floor": linear_floor, "kernel-floor": kernel_floor}


def estimate_latency(stats: RunStats, network: str) -> float:
    bandwidth, rtt = NETWORKS[network]
    return stats.seconds + max(stats.bytes_sent_per_party) * 8 / bandwidth + stats.send_actions * rtt / 2


def estimate_terms(stats: RunStats, bandwidth_bps: float, one_way_s: float) -> Dict[str, float]:
    """A cluster run's time as compute + bytes + rounds: the busiest party's CPU seconds, its bytes over the
    bandwidth, and one one-way delay per send action of the busiest party."""
    if not stats.cpu_seconds_per_party:
        raise ValueError("the run has no per-party compute (an embedded session's run)")
    return {"compute": max(stats.cpu_seconds_per_party), "bytes": max(stats.bytes_sent_per_party) * 8 / bandwidth_bps,
            "rounds": stats.send_actions * one_way_s}


@dataclasses.dataclass
class StepCase:
    """One denoising step: ``secure_fn(weights, *inputs)``, run secret; ``plain_fn`` the float reference."""

    name: str
    weights: object  # the owner's parameters as the secure function takes them
    inputs: tuple  # leaves are arrays (secret) or Public
    secure_fn: Callable
    plain_fn: Callable[[], np.ndarray]


def mnist_step_case(model_dir: Path, batch: int, seed: int) -> StepCase:
    """Step 25 of DDIM-50 of a class-conditional model such as the shipped MNIST ones (class labels 0, 1, ...), on
    Gaussian x of ``seed`` in the model's sample shape (the shape the cluster samples it in)."""
    model, params = UNet2DModel.from_pretrained(model_dir)
    sampler = DDIMSampler(ScheduleConfig.from_file(model_dir), 50)
    index = 25
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *sample_shape(model.config))).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[np.arange(batch) % 10]
    terms = model.apply(params, int(sampler.timesteps[index]), method=model.time_terms)
    terms = jax.tree_util.tree_map(np.asarray, terms)
    coefficients = sampler.coefficient_table()[index]
    step = make_denoise_step(model, sampler.clip_range)
    inputs = (x, labels, terms, Public(coefficients), None)
    return StepCase(f"{model_dir.name} batch {batch}", secure_params(params), inputs, step,
                    lambda: np.asarray(step(params, x, labels, terms, coefficients, None)))


def _unwrap(tree):
    return jax.tree_util.tree_map(lambda v: v.value if isinstance(v, Public) else v, tree,
                                  is_leaf=lambda v: isinstance(v, Public))


class NonlinearCall(NamedTuple):
    """One registered-op call: its input's shape, the op's own params, and the shapes of further operands
    (an rsqrt's ``times``, a softmax's ``values``)."""

    op: str
    shape: tuple
    params: dict
    other_shapes: tuple = ()


def nonlinear_calls(fn, *args) -> List[NonlinearCall]:
    """Every registered-op call in ``fn(*args)``, nested jaxprs included; params are the op's own, not the
    kernel names (a jit-cached inner trace may hold another set's)."""
    names = {ops.primitive(op).name: op for op in registry.OPS}
    calls = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in names:
                params = {k: v for k, v in eqn.params.items() if k not in ops.KERNEL_PARAMS}
                shapes = [tuple(v.aval.shape) for v in eqn.invars]
                calls.append(NonlinearCall(names[eqn.primitive.name], shapes[0], params, tuple(shapes[1:])))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*_unwrap(args)).jaxpr)
    return calls


def kernel_breakdown(session: SecureSession, calls: List[NonlinearCall], seed: int = 0) -> Dict[str, RunStats]:
    """Each op's calls run on their own, at their shapes (every operand's), under ``session`` (its set's
    kernels): cost per op. Inputs are secret and positive (an rsqrt's domain), further operands any sign."""
    rng = np.random.default_rng(seed)
    by_op: Dict[str, List[NonlinearCall]] = {}
    for call in calls:
        by_op.setdefault(call.op, []).append(call)
    costs = {}
    for op, items in by_op.items():
        inputs = [[np.abs(rng.standard_normal(c.shape)).astype(np.float32) + 0.5]
                  + [rng.standard_normal(s).astype(np.float32) for s in c.other_shapes] for c in items]

        def run_all(operands, _op=op, _params=[c.params for c in items]):
            return [ops.replay(_op, xs, p) for xs, p in zip(operands, _params)]

        session.run(run_all, inputs)
        costs[op] = session.last_stats
    return costs


def softmax_call_cost(session: SecureSession, call: NonlinearCall, max_elements: int = 2**16, seed: int = 0) -> dict:
    """Bytes (all parties) and send actions of one softmax ``call`` under ``session``'s kernels, priced by a call of
    at most ``max_elements`` (or one row per batch element, where that is more): rows of the same length, fewer of
    them, in the form the full call takes (the kernel's ``for_call_size``, where it has one: see
    `cipherdm_spu.registry`). Where the call weighs values (attention's, rows on the last axis) it keeps its batch
    dimensions (heads), each with values of the call's width: SPU multiplies each batch element's rows and values
    apart, with send actions of its own. A softmax's bytes are a sum over its rows (each row's max, exps, sum,
    reciprocal, and its weighted sum of the values) and its send actions do not grow with the rows, so the bytes
    scale by the rows and the send actions carry over. Logits: normal, standard deviation 4; values: standard
    normal."""
    axis = call.params["axis"]
    width, elements = call.shape[axis], int(np.prod(call.shape))
    rows = elements // width
    scale = call.params.get("scale", 1.0)
    rng = np.random.default_rng(seed)
    if call.other_shapes:
        lead = tuple(call.shape[:-2])
        kept = max(1, min(call.shape[-2], max_elements // (width * max(1, int(np.prod(lead))))))
        x = rng.normal(0.0, 4.0, (*lead, kept, width)).astype(np.float32)
        values = [rng.standard_normal((*lead, width, shape[-1])).astype(np.float32) for shape in call.other_shapes]
    else:
        x = rng.normal(0.0, 4.0, (max(1, min(rows, max_elements // width)), width)).astype(np.float32)
        values = []
    measured_rows = x.size // width

    def priced(x, *values):
        kernel = registry.kernel("softmax", registry.active_impl("softmax"))
        sized = getattr(kernel, "for_call_size", None)
        params = {"axis": x.ndim - 1, "exp_impl": registry.active_impl("exp"), "scale": scale}
        return ops.softmax_kernel_call(kernel if sized is None else sized(elements), params)(x, *values)

    with linalg.rows_of_full_call(call.shape[-2] if call.other_shapes else rows):  # the full call's product form
        session.run(priced, x, *values)
    stats = session.last_stats
    return {"bytes_sent": stats.bytes_sent * rows / measured_rows, "send_actions": stats.send_actions,
            "measured_rows": measured_rows, "rows": rows}


def measure_step(session: SecureSession, case: StepCase, repeat: int = 1, breakdown: bool = True) -> dict:
    """Cost and error of one step under ``session`` (median seconds over ``repeat`` runs)."""
    weights = session.share(case.weights)
    try:
        runs = []
        for _ in range(repeat):
            out = session.run(case.secure_fn, weights, *case.inputs)
            runs.append(session.last_stats)
    finally:
        session.delete(weights)
    stats = dataclasses.replace(runs[0], seconds=statistics.median(r.seconds for r in runs))
    err = np.abs(np.asarray(out, np.float64) - case.plain_fn())
    row = {
        "seconds": stats.seconds,
        "bytes_sent": stats.bytes_sent,
        "bytes_sent_per_party": stats.bytes_sent_per_party,
        "send_actions": stats.send_actions,
        "max_abs_err": float(err.max()),
        "mean_abs_err": float(err.mean()),
        "estimated_seconds": {net: estimate_latency(stats, net) for net in NETWORKS},
        "seconds_by_spu_op": {name: k.seconds for name, k in stats.kernels.items()},
        # the same (first) run: its seconds and the SPU ops it executed (the runtime spends time on each op of a
        # program besides the op's own, so a program's op count costs seconds of its own)
        "profiled_run_seconds": runs[0].seconds,
        "spu_ops_executed": int(sum(k.calls for k in stats.kernels.values())),
    }
    if breakdown:
        with registry.use_protocol(session.protocol):
            calls = nonlinear_calls(case.secure_fn, case.weights, *case.inputs)
        costs = kernel_breakdown(session, calls)
        row["kernels"] = {op: {"calls": sum(c.op == op for c in calls),
                               "elements": int(sum(np.prod(c.shape) for c in calls if c.op == op)),
                               "shapes": [list(c.shape) for c in calls if c.op == op],
                               "bytes_sent": s.bytes_sent, "send_actions": s.send_actions, "seconds": s.seconds,
                               "seconds_by_spu_op": {name: k.seconds for name, k in s.kernels.items()}}
                          for op, s in costs.items()}
    return row


def ratios(rows: Dict[str, dict], baseline: str = registry.BASELINE) -> None:
    """Add x-fold reductions against ``baseline`` (bytes, seconds, send actions, estimated latency)."""
    base = rows.get(baseline)
    if base is None:
        return
    for row in rows.values():
        row["vs_" + baseline] = {
            "bytes": base["bytes_sent"] / row["bytes_sent"],
            "seconds": base["seconds"] / row["seconds"],
            "send_actions": base["send_actions"] / row["send_actions"],
            **{net: base["estimated_seconds"][net] / row["estimated_seconds"][net] for net in NETWORKS},
        }


# ----------------------------------------------------------------------------------------------
# kernel rows


def activation_categories(rng, n: int) -> dict:
    """The inputs an activation is measured on: a grid over [-20, 20], the bulk (a grid over [-2, 2], where
    normalised activations mostly lie), activation-like samples (normal, std 1..8, Student-t tails), extremes."""
    samples = np.concatenate(
        [rng.normal(0, s, n // 8) for s in (1, 2, 4, 8)] + [rng.standard_t(2, n // 2) * 2]
    )
    return {
        "grid": np.linspace(-20, 20, n + 1),
        "bulk": np.linspace(-2, 2, n + 1),
        "samples": samples,
        "extremes": np.concatenate([EXTREMES, -EXTREMES / 7]),
    }


def _errors(y, ref) -> dict:
    err = np.abs(np.asarray(y, np.float64) - ref)
    return {"max_abs_err": float(err.max()), "mean_abs_err": float(err.mean())}


def _cost(stats: RunStats, n_elements: int) -> dict:
    return {
        "bytes_per_element_per_party": stats.bytes_sent / 3 / n_elements,
        "bytes_sent": stats.bytes_sent,
        "send_actions": stats.send_actions,
        "seconds": stats.seconds,
        "elements": n_elements,
    }


def _rsqrt_row(session: SecureSession, fn, v) -> dict:
    y = np.asarray(session.run(fn, v), np.float64)
    rel_true = np.abs(y * np.sqrt(v.astype(np.float64)) - 1)
    rel_enc = np.abs(y * np.sqrt(encoded(v)) - 1)
    return {
        "relative_vs_true_input": {"max_rel_err": float(rel_true.max()), "mean_rel_err": float(rel_true.mean())},
        "relative_vs_encoded_input": {"max_rel_err": float(rel_enc.max()), "mean_rel_err": float(rel_enc.mean())},
        "cost": _cost(session.last_stats, v.size),
    }


def _activation_row(session: SecureSession, op: str, cats: dict) -> dict:
    """The errors of activation ``op`` on each of `activation_categories`, and its cost on the samples."""
    row = {}
    for cat, x in cats.items():
        x = x.astype(np.float32)
        y = session.run(getattr(ops, op), x)
        row[cat] = _errors(y, REFERENCES[op](x.astype(np.float64)))
        if cat == "samples":
            row["cost"] = _cost(session.last_stats, x.size)
    return row


def measure_kernels(name: str, rng, n: int, rows: int) -> dict:
    """Cost and error of every op under protocol set ``name``: activations on `activation_categories` (cost on
    the samples), exp on its softmax domain x <= 0, rsqrt by relative error over variances 1e-4..1e4, softmax
    on ``rows`` rows of each width, one extreme logit."""
    out = {}
    with SecureSession(name) as session:
        cats = activation_categories(rng, n)
        for op in ACTIVATIONS:
            out[op] = _activation_row(session, op, cats)
        x = np.concatenate([np.linspace(-20, 0, n + 1), [-1e4, -1e3, -100, -30]]).astype(np.float32)
        y = session.run(ops.exp, x)
        out["exp"] = {"domain_le_0": _errors(y, np.exp(x.astype(np.float64))), "cost": _cost(session.last_stats, x.size)}
        v = np.geomspace(1e-4, 1e4, n + 1).astype(np.float32)
        out["rsqrt"] = _rsqrt_row(session, ops.rsqrt, v)
        for width, spread in SOFTMAX_ROWS.items():
            logits = (rng.standard_normal((rows, width)) * spread).astype(np.float32)
            logits[0, 1] = 1e4
            y = session.run(lambda v: ops.softmax(v, axis=-1), logits)
            errs = _errors(y, softmax(logits))
            errs["max_row_sum_err"] = float(np.abs(np.asarray(y, np.float64).sum(-1) - 1).max())
            out[f"softmax{width}"] = {"rows": errs, "cost": _cost(session.last_stats, logits.size)}
    return out


#: kernels outside the protocol sets measured beside them, as (set, activation, kernel): the set with that
#: activation's kernel overridden (`registry.resolve`)
OVERRIDE_KERNELS = (("cipherdm", "gelu", "cipherdm-masked-square"),)


def measure_override(name: str, op: str, kernel: str, rng, n: int) -> dict:
    """Cost and error of activation ``op`` under protocol set ``name`` with its kernel overridden by ``kernel``, as
    `measure_kernels` measures the set's own."""
    with SecureSession(name, {op: kernel}) as session:
        return _activation_row(session, op, activation_categories(rng, n))


def measure_softmax_forms(rng, shapes=SOFTMAX_FORM_SHAPES, repeat: int = 3) -> list:
    """`cipherdm`'s softmax alone (no values: attention's calls, which hand the kernel their values, price the fold on
    the values' weighted sums instead) in the form its kernel takes for each call (`tournament_levels`,
    `fold_exps_pays`) and in two fixed forms (threes, and pairs as `cipherdm-low-byte` takes them; both with a separate product), on
    the same logits of each shape: error, the busiest party's bytes and send actions, its seconds (the median of
    ``repeat`` runs after a first), and each form's time on each network of NETWORKS (send actions times RTT/2 plus
    the busiest party's bytes over the bandwidth)."""
    rows = []
    with SecureSession("cipherdm") as session:
        for shape in shapes:
            logits = (rng.standard_normal(shape) * 4.0).astype(np.float32)
            logits[0, 1] = 1e4
            elements = int(np.prod(shape))
            forms = {"kernel": (tournament_levels(shape[-1], elements), fold_exps_pays(elements)),
                     "threes, apart": (((3, 0),), False), "pairs, apart": (((2, 0),), False)}
            row = {"shape": list(shape), "elements": elements}
            for form, (levels, fold) in forms.items():
                fn = lambda v, a=levels, f=fold: softmax_in_form(v, -1, "cipherdm", a, f)  # noqa: E731
                session.run(fn, logits)  # a first run, its seconds left out (a program's first run is slower)
                seconds = []
                for _ in range(repeat):
                    y = session.run(fn, logits)
                    seconds.append(session.last_stats.seconds)
                stats = session.last_stats
                busiest = max(stats.bytes_sent_per_party)
                row[form] = {**_errors(y, softmax(logits)), "levels": [list(level) for level in levels],
                             "fold_exps": fold,
                             "send_actions": stats.send_actions, "busiest_party_bytes": busiest,
                             "seconds": statistics.median(seconds),
                             "network_seconds": {net: stats.send_actions * rtt / 2 + busiest * 8 / bandwidth
                                                 for net, (bandwidth, rtt) in NETWORKS.items()}}
            rows.append(row)
    return rows
