#!/usr/bin/env python
"""Where a secure step's send actions (rounds) go, and the floor that SPU's building blocks set for them.

Reads the step rows of a benchmark run (docs/results/benchmark.json, written by
`python scripts/benchmark.py --rows step ...`): per protocol set, the step's send actions and, per nonlinear
op, its calls and their send actions when run alone at the model's shapes; the linear floor (every kernel
the identity). Measures here, under ABY3/FM64: SPU's building blocks (a comparison, the conversion of its
bit, an integer product, a secret product) and the norms' own arithmetic (one GroupNorm, its rsqrt the
identity: `ops.rsqrt` takes the variance's division by the count and the affine weight, so they are the
kernel's). From them, an optimistic floor per kernel call:

  rsqrt    one comparison round for the octave + its conversion + two secret products (normalise, rescale);
           the polynomial between them counted as free
  silu     one comparison round (sign and window batched) + its conversion + one bit product (relu) + one
           secret product (a curve needs at least one truncated product)
  softmax  the row max by the cheapest tournament, in groups of any width k up to the row's (a level: 1
           comparison round for all of a group's pairs, 1 conversion, ceil(log2 k) bit-product rounds; one
           group of the whole row takes one level, at n(n-1)/2 comparisons a row: floors ignore bytes; ANDing a
           candidate's bits first, as `cipherdm` may, saves bytes, never rounds: after r AND rounds its
           ceil((k-1)/2^r) bits and difference take at least ceil(log2 k) - r product rounds) + the
           exp's clamp (comparison, conversion, bit product) + the reciprocal's floor (as rsqrt's; the exps
           ride in its products, as `cipherdm`'s kernel lets them where that pays); exp's polynomial counted as free;
           attention's product with the values stays in the linear floor (the identity kernel's matmul)

and the step's floor: the linear floor plus every call at its kernel's floor. A target below that floor
cannot be met by any kernel design built from these blocks, without restructuring the model's arithmetic.

    python scripts/rounds_budget.py                   # -> docs/results/rounds.{md,json}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from cipherdm_spu import SecureSession
from cipherdm_spu.benchmark import FLOORS, NETWORKS, linear_floor
from cipherdm_spu.models.normalization import group_norm
from cipherdm_spu.registry import BASELINE
from cipherdm_spu.results import markdown_table, write_report
from cipherdm_spu.ring import encoding as _encoding
from cipherdm_spu.ring import indicator as _indicator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
TARGET_RATIO = 2.5  # issue 26: send actions against vanilla SPU
WAN_ONE_WAY_S = NETWORKS["WAN"][1] / 2  # what one send action costs in the WAN estimate
BLOCKS = {
    "compare": lambda x: x < 0.5,
    "indicator": lambda x: _indicator(x > 0.5),
    "integer_product": lambda x: _encoding(x) * _encoding(x),
    "secret_product": lambda x: x * x,
}


def measure_blocks(n: int = 2000) -> dict:
    """Send actions of SPU's building blocks, and of one GroupNorm's arithmetic (rsqrt the identity)."""
    x = np.linspace(-3, 3, n).astype(np.float32)
    with SecureSession(BASELINE) as session:
        actions = {}
        for name, fn in BLOCKS.items():
            session.run(fn, x)
            actions[name] = session.last_stats.send_actions
    actions["conversion"] = actions.pop("indicator") - actions["compare"]
    features = np.random.default_rng(0).normal(size=(1, 14, 14, 64)).astype(np.float32)
    affine = np.ones(64, np.float32)
    with SecureSession(linear_floor()) as session:
        session.run(lambda v, s, b: group_norm(v, 8, s, b), features, affine, affine)
        actions["group_norm_arithmetic"] = session.last_stats.send_actions
    return actions


def kernel_floors(b: dict) -> dict:
    """Optimistic send actions per call of each kernel, from the building blocks (see the module docstring)."""
    decide = b["compare"] + b["conversion"]
    rescale = decide + 2 * b["secret_product"]

    def levels(width: int, k: int) -> int:
        return next(n for n in range(width) if k**n >= width)

    def softmax(width: int) -> int:
        tournament = min(levels(width, k) * (decide + math.ceil(math.log2(k)) * b["integer_product"])
                         for k in range(2, max(width, 2) + 1))
        return tournament + decide + b["integer_product"] + rescale

    activation = decide + b["integer_product"] + b["secret_product"]
    return {"rsqrt": lambda shape: rescale, "silu": lambda shape: activation, "mish": lambda shape: activation,
            "gelu": lambda shape: activation, "sigmoid": lambda shape: activation,
            "softmax": lambda shape: softmax(shape[-1])}


def budget(step: dict, blocks: dict) -> dict:
    """The step's send actions by part, per protocol set, and its floor (every call at its kernel's floor,
    by the call's shape: a softmax's tournament depends on its row width)."""
    floors = kernel_floors(blocks)
    rows = step["rows"]
    linear = rows["linear-floor"]["send_actions"]
    out = {"linear_floor": linear, "sets": {}}
    for name, row in rows.items():
        if name in FLOORS:  # the kernel floor's softmax takes pairs (fewest comparisons, not fewest rounds)
            continue
        parts = {op: {"calls": k["calls"], "send_actions": k["send_actions"],
                      "per_call": k["send_actions"] / k["calls"]} for op, k in row["kernels"].items()}
        out["sets"][name] = {"send_actions": row["send_actions"], "kernels": parts,
                             "wan_seconds": row["estimated_seconds"]["WAN"]}
    kernels = rows[BASELINE]["kernels"]
    out["kernel_floor"] = {op: sum(floors[op](shape) for shape in k["shapes"]) / k["calls"] for op, k in kernels.items()}
    out["step_floor"] = linear + round(sum(kernels[op]["calls"] * out["kernel_floor"][op] for op in kernels))
    return out


def render(result: dict, command: str) -> str:
    b = result["blocks"]
    lines = [
        "# Where a step's rounds go, and the floor SPU's building blocks set",
        "",
        f"Command: `{command}` (reads the step rows of {result['source']}; measures the building blocks here).",
        "ABY3, FM64, 18 fraction bits; send actions of the busiest party (the round proxy: on a WAN each costs one",
        "one-way latency). How the floor is counted: scripts/rounds_budget.py.",
        "",
        "Building blocks (send actions): comparison (one MSB extraction, any number batched) "
        f"{b['compare']}, conversion of its bits to arithmetic {b['conversion']}, integer product {b['integer_product']}, "
        f"secret product (reshare and truncation) {b['secret_product']}; one GroupNorm's own arithmetic (the mean, the "
        f"squares and their sum's scaling, the output product; its rsqrt, which takes the variance's division and the "
        f"affine weight, the identity) {b['group_norm_arithmetic']}.",
        "",
    ]
    for case in result["cases"]:
        ops = sorted(case["kernel_floor"])
        lines += [f"## {case['case']}", ""]
        lines += markdown_table(
            ["protocol set", "send actions", "WAN estimate s"] + [f"{op}: calls x per call" for op in ops],
            [[name, s["send_actions"], f"{s['wan_seconds']:.1f}"]
             + [f"{s['kernels'][op]['calls']} x {s['kernels'][op]['per_call']:.1f}" if op in s["kernels"] else "-" for op in ops]
             for name, s in case["sets"].items()]
            + [["floor", case["step_floor"], "-"] + [f"{case['kernel_floor'][op]:.1f}" for op in ops]], align="l")
        base, ours = case["sets"][BASELINE], case["sets"].get("cipherdm")
        norms = case["sets"][BASELINE]["kernels"].get("rsqrt", {}).get("calls", 0)
        lines += ["", f"Linear floor (every kernel the identity): {case['linear_floor']} send actions, of which the "
                      f"{norms} norms' own arithmetic is about {norms * b['group_norm_arithmetic']}. Step floor (linear floor "
                      f"+ every call at its kernel's floor): {case['step_floor']}, {base['send_actions'] / case['step_floor']:.2f}x "
                      f"fewer than `{BASELINE}`; {TARGET_RATIO}x fewer than `{BASELINE}` would be "
                      f"{base['send_actions'] / TARGET_RATIO:.0f}."]
        if "softmax" in case["kernel_floor"]:
            lines += ["A softmax call's measured send actions include its product with attention's values (handed to the "
                      "kernel: `ops.softmax`'s ``values``), a matmul that the floor leaves in the linear floor."]
        if ours:
            at_floor = ours["wan_seconds"] - (ours["send_actions"] - case["step_floor"]) * WAN_ONE_WAY_S
            lines += [f"`cipherdm`: {ours['send_actions']} send actions ({base['send_actions'] / ours['send_actions']:.2f}x "
                      f"fewer than `{BASELINE}`), WAN estimate {base['wan_seconds'] / ours['wan_seconds']:.2f}x faster; with "
                      f"every kernel at its floor and nothing else changed it would be {base['wan_seconds'] / at_floor:.2f}x."]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", type=Path, default=RESULTS / "benchmark.json",
                        help="a benchmark.json with step rows (default: docs/results/benchmark.json)")
    parser.add_argument("--out", type=Path, default=RESULTS / "rounds",
                        help="output path without suffix: writes .md and .json (default: docs/results/rounds)")
    args = parser.parse_args(argv)
    if not args.benchmark.is_file():
        parser.error(f"{args.benchmark} not found: run `python scripts/benchmark.py --rows step` first")
    steps = json.loads(args.benchmark.read_text()).get("step")
    if not steps:
        parser.error(f"{args.benchmark} has no step rows")
    blocks = measure_blocks()
    cases = []
    for step in steps:
        if "linear-floor" not in step["rows"] or BASELINE not in step["rows"]:
            continue
        if any("shapes" not in k for k in step["rows"][BASELINE]["kernels"].values()):
            parser.error(f"{args.benchmark} predates per-call shapes in its kernel breakdown: run the benchmark again")
        cases.append({"case": step["case"], **budget(step, blocks)})
    try:
        source = args.benchmark.resolve().relative_to(ROOT)
    except ValueError:
        source = args.benchmark
    result = {"source": str(source), "blocks": blocks, "cases": cases}
    command = "python scripts/rounds_budget.py"
    write_report(args.out, result, render(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
