"""Measure every op's kernel under every protocol set, in one run of the three-party session.

For each (kernel, protocol set): bytes sent per element per party, send actions (the round proxy),
wall seconds, and max / mean absolute error against a float64 reference on
  (a) a dense grid on [-20, 20], (b) activation-like samples (normal, std 1..8, and Student-t tails),
  (c) extreme values (|x| up to 1e4), (d) the bulk, a dense grid on [-2, 2].
exp is measured on its softmax domain (x <= 0), rsqrt by relative error over variances 1e-4..1e4,
softmax on rows of 16, 64, 256, 1024 logits with realistic spreads (one extreme logit per batch), and
`cipherdm`'s two softmax forms side by side at attention-like shapes; the measurements are
`cipherdm_spu.benchmark.measure_kernels` and `measure_softmax_forms`, the references
`cipherdm_spu.protocols.reference`.

    python scripts/benchmark_kernels.py                 # full run -> docs/results/kernels.{md,json}
    python scripts/benchmark_kernels.py --quick --out /tmp/k
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cipherdm_spu.benchmark import (ACTIVATIONS, OVERRIDE_KERNELS, SOFTMAX_FORM_SHAPES, SOFTMAX_ROWS, measure_kernels,
                                    measure_override, measure_softmax_forms)
from cipherdm_spu.registry import BASELINE, available_protocol_sets, resolve
from cipherdm_spu.results import markdown_table

ROOT = Path(__file__).resolve().parent.parent


def _form(f: dict) -> str:
    """The tournament's levels (k: groups of k; k&r: groups of k whose candidates AND their bits for r rounds)
    and the fold."""
    levels = "-".join(str(k) if r == 0 else f"{k}&{r}" for k, r in f["levels"])
    return f"{levels}, {'folded' if f['fold_exps'] else 'apart'}"


def render_softmax_forms(rows: list) -> list:
    """The "Softmax forms" section: `measure_softmax_forms`' rows."""
    forms = ("kernel", "threes, apart", "pairs, apart")
    lines = ["## Softmax forms", "",
             "`cipherdm`'s softmax alone (no values; attention hands the kernel its values, and then the fold below is "
             "priced on their weighted sums, d numbers a row) in the form its kernel takes for the call (the "
             "tournament's levels: k for groups of k whose pair bits are converted, k&r for groups of k whose "
             "candidates first AND their bits for r rounds; and whether the exps ride in the reciprocal's first "
             "round or meet it in a product apart: whichever takes the least time on the benchmark's WAN by the "
             "building blocks' bytes, rounds and seconds, "
             "protocols/cipherdm.py `tournament_levels` and `fold_exps_pays`), and in two fixed forms: threes "
             "(`cipherdm` before the choice) and pairs (`cipherdm-low-byte`), each with a product apart. Same "
             "logits (standard deviation 4, one 1e4 logit); bytes are the busiest party's per element; network "
             "ms are send actions times RTT/2 plus those bytes over the bandwidth (LAN 5 Gbps / 0.4 ms RTT, "
             "WAN 400 Mbps / 40 ms RTT) plus the form's measured seconds (the median of 3 runs after a first: the "
             "three parties' compute on this machine's cores).", ""]
    return lines + markdown_table(
        ["shape", "elements", "kernel's form", "kernel: B/elem, send actions, max err",
         "threes: B/elem, send actions, max err", "pairs: B/elem, send actions, max err",
         "WAN ms: kernel / threes / pairs", "LAN ms: kernel / threes / pairs"],
        [[" x ".join(map(str, r["shape"])), r["elements"], _form(r["kernel"])]
         + [f"{r[f]['busiest_party_bytes'] / r['elements']:.0f}, {r[f]['send_actions']}, {r[f]['max_abs_err']:.2g}"
            for f in forms]
         + [" / ".join(f"{1e3 * (r[f]['network_seconds'][net] + r[f]['seconds']):.{digits}f}" for f in forms)
            for net, digits in (("WAN", 0), ("LAN", 1))]
         for r in rows], align="l")


def render_markdown(results: dict, command: str) -> str:
    sets = list(results["sets"])
    base = results["sets"][BASELINE]

    def cost_cells(c: dict, b: dict) -> list:
        return [f"{c['bytes_per_element_per_party']:.1f}", f"{b['bytes_sent'] / c['bytes_sent']:.2f}x",
                c["send_actions"], f"{b['send_actions'] / c['send_actions']:.2f}x"]

    cost_header = ["kernel", "set", "B/elem/party", "bytes ratio", "send actions", "actions ratio"]
    lines = [
        "# Kernel benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {results['machine']}; SPU ABY3, FM64, 18 fraction bits, three parties in one process.  ",
        "Cost: bytes sent per element per party (all parties / 3 / elements), send actions of the busiest party",
        f"(the round proxy), wall seconds of the run. Ratios are `{BASELINE}` / set, measured in the same run (>1: cheaper).",
        "Errors: absolute, against the float64 references of cipherdm_spu/protocols/reference.py, on a grid over",
        "[-20, 20], activation-like samples and extreme values (|x| up to 1e4), and on the bulk (a grid over [-2, 2],",
        "where normalised activations mostly lie; our fits are weighted towards it, see scripts/fit_kernels.py);",
        "exp on x <= 0; rsqrt relative, over variances 1e-4..1e4.",
        "",
    ]
    def cost(r, op):
        return [*cost_cells(r["cost"], base[op]["cost"]), f"{r['cost']['seconds']:.3f}"]

    lines += markdown_table(
        cost_header + ["seconds", "max err (grid)", "max err (samples)", "max err (extremes)", "max err (bulk)"],
        [[op, label, *cost(r, op), f"{r['grid']['max_abs_err']:.2g}", f"{r['samples']['max_abs_err']:.2g}",
          f"{r['extremes']['max_abs_err']:.3g}", f"{r['bulk']['max_abs_err']:.2g}"]
         for op in ACTIVATIONS for label, r in [(s, results["sets"][s][op]) for s in sets]
         + [(resolve(o["set"], {op: o["kernel"]}).name, o["row"])  # the label the step rows use
            for o in results.get("overrides", []) if o["op"] == op]],
        align="ll")
    if results.get("overrides"):
        lines += ["", "Rows `set[op=kernel]`: a kernel outside the sets (`cipherdm_spu.benchmark.OVERRIDE_KERNELS`), "
                  "what `SecureSession(set, overrides={op: kernel})` runs, a user's trade-off (its design and contract: "
                  "the kernel's docstring in protocols/)."]
    lines.append("")
    lines += markdown_table(
        cost_header + ["seconds", "max err", "mean err", "max row-sum err"],
        [[op, s, *cost(r, op), f"{e['max_abs_err']:.2g}", f"{e['mean_abs_err']:.2g}",
          f"{e.get('max_row_sum_err', float('nan')):.2g}"]
         for op in ["exp"] + [f"softmax{w}" for w in SOFTMAX_ROWS] for s in sets
         for r in [results["sets"][s][op]] for e in [r.get("domain_le_0") or r["rows"]]], align="ll")
    lines.append("")
    lines += markdown_table(
        cost_header + ["seconds", "max rel err (true input)", "max rel err (encoded input)"],
        [["rsqrt", label, *cost(r, "rsqrt"), f"{r['relative_vs_true_input']['max_rel_err']:.2g}",
          f"{r['relative_vs_encoded_input']['max_rel_err']:.2g}"]
         for label in sets for r in [results["sets"][label]["rsqrt"]]], align="ll")
    if results.get("softmax_forms"):
        lines += ["", *render_softmax_forms(results["softmax_forms"])]
    lines += [
        "",
        "Notes: SPU's Io encodes inputs by flooring to 2^-18, so a variance of 1e-4 arrives with up to 2 % error",
        "before any kernel runs; `relative_vs_encoded_input` is the kernel's own error. The norms",
        "(models/normalization.py) pre-scale deviations so that their variances do not suffer this.",
        "`cipherdm`'s kernels are built for send actions (rounds), which a WAN waits for: rsqrt finds its input's",
        "half-octave by one batched comparison and evaluates piecewise quadratics with no Newton step (more bytes, but the",
        "norms run it once per group); SiLU and Mish take their sign and window bits from one comparison (the",
        "window from the sign of E_T^2 - E^2 of the encoding E: correct for |x| < 11585), and SiLU's quartic takes",
        "its square from that product, the window's bit multiplied in last (the masked square: docs/results/primitives.md);",
        "softmax takes its row maximum by a tournament (see \"Softmax forms\") and its denominator's reciprocal by",
        "quarter-octave quadratics. The set `cipherdm-low-byte` trades those rounds back for bytes: rsqrt's octave read off",
        "the encoding's bits and a Newton step, SiLU clamped with its window compared after |x| (as many bytes, no range",
        "limit), softmax's max by a pairwise tournament.",
        "`cipherdm`'s SiLU and Mish fits are weighted towards the bulk, held to 9.5e-3 on the whole line (SiLU's with",
        "the rounding of its truncated variable included, see scripts/fit_kernels.py): an unweighted fit errs",
        "most at x = 0, where a bias adds up over every layer and step. End to end this is what counts: with",
        "the earlier (Knuth-form) SiLU, the unweighted fit's bias near 0 put DDIM-10 samples of the shipped SiLU",
        "model, drawn in float32 with our kernels, at 28-35 dB PSNR from exact sampling (3 seeds x 10 digits) and the",
        "weighted one at 46-49 dB (Mish model: 29 -> 38-41 dB). Secure runs: docs/results/secure_sampling.md.",
        "`cipherdm`'s GeLU and sigmoid aim instead below SPU's own Pade-based kernels (the `spu-pade` and",
        "`cipherdm-paper` rows): a degree-13 polynomial on |x| <= 5 (sigmoid: degrees 9 and 7 on two pieces up to",
        "12.5) evaluated as E(v^2) + v O(v^2) by two scaled Horner chains side by side (half the rounds of one chain in v);",
        "their fits err < 2e-6 in float64, and what is left is the input's",
        "2^-18 encoding (up to 3.8e-6 times the slope) and the output's last truncation.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    available = available_protocol_sets()
    parser.add_argument("--sets", nargs="+", default=available, choices=available,
                        help=f"protocol sets to measure (default: all; {BASELINE} is always included: it is the baseline)")
    parser.add_argument("--elements", type=int, default=20000, help="elements per activation run (default 20000)")
    parser.add_argument("--rows", type=int, default=32, help="softmax rows per width (default 32)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="output directory (default docs/results)")
    args = parser.parse_args(argv)
    if args.elements < 100 or args.rows < 1:
        parser.error("--elements must be >= 100 and --rows >= 1")
    if args.quick:
        args.elements, args.rows = 800, 4
    sets = [BASELINE] + [s for s in args.sets if s != BASELINE]
    rng = np.random.default_rng(args.seed)
    results = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "elements": args.elements,
        "softmax_rows": args.rows,
        "sets": {},
    }
    for name in tqdm(sets, desc="protocol sets"):
        results["sets"][name] = measure_kernels(name, rng, args.elements, args.rows)
    if "cipherdm" in sets:
        results["softmax_forms"] = measure_softmax_forms(rng, SOFTMAX_FORM_SHAPES[:1] if args.quick else SOFTMAX_FORM_SHAPES)
    results["overrides"] = [{"set": name, "op": op, "kernel": kernel,
                             "row": measure_override(name, op, kernel, rng, args.elements)}
                            for name, op, kernel in OVERRIDE_KERNELS if name in sets]
    command = "python scripts/benchmark_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["command"] = command.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(results, indent=1))
    (args.out / "kernels.md").write_text(render_markdown(results, command.strip()))
    print(f"wrote {args.out / 'kernels.md'} and kernels.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
