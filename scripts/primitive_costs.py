#!/usr/bin/env python
"""What SPU's building blocks cost under ABY3/FM64, how they add up to our SiLU, and the floor they set a softmax.

Measures, in one three-party session, bytes per element per party (all parties' bytes / 3 / n) and send actions of:
a comparison with a public constant, its bit converted to an arithmetic integer, an AND of two comparison bits
(boolean shares), a select, the integer product of that bit and a value (`_bit_times`), a secret product (reshare +
truncation), a product with a public constant (truncation only), the same with a constant whose encoding is below 4
(SPU truncates those with extra precision, at a higher cost), a secret product of integers (reshare only), and our
SiLUs. From these it writes the accounting of the `cipherdm` SiLU (relu + a "masked square": two comparisons, two
conversions, four integer products, two truncations) and what else was tried against it, and a softmax's byte floor:
the comparisons that an exact row max and a clamped exp need, their conversions and bit products, one product to
normalise, and the fewest secret products an exp polynomial needs to hold the softmax accuracy contract (searched in
float64 over clamped bases raised by squarings; `fewest_exp_products`), against vanilla SPU's softmax measured on
the same logits (docs/results/primitives.md). It also measures what one more op of a program costs a run
whatever the op does (a chain of additions, written out and as a loop's body: `op_overhead`), the reason a kernel's
op count is part of its time.

    python scripts/primitive_costs.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cipherdm_spu import SecureSession, ops, registry
from cipherdm_spu.minimax import minimax
from cipherdm_spu.protocols.reference import softmax
from cipherdm_spu.results import markdown_table
from cipherdm_spu.ring import bit_times as _bit_times
from cipherdm_spu.ring import encoding as _encoding
from cipherdm_spu.ring import indicator as _indicator

ROOT = Path(__file__).resolve().parents[1]


PRIMITIVES = {
    "compare": ("x < 6 (one MSB extraction)", lambda x: x < 6.0),
    "indicator": ("where(x > 0, 1, 0) as an integer: compare + conversion to arithmetic", lambda x: _indicator(x > 0)),
    "select_relu": ("where(x > 0, x, 0): compare + select (its own conversion and product)",
                    lambda x: jnp.where(x > 0, x, 0.0)),
    "relu": ("relu as _bit_times(indicator, x): compare + conversion + integer product",
             lambda x: _bit_times(_indicator(x > 0), x)),
    "secret_product": ("x * x (reshare + truncation)", lambda x: x * x),
    "public_product": ("x * 0.3 (truncation)", lambda x: x * 0.3),
    "tiny_public_product": ("x * 2**-28 (a constant below 4 units of 2**-18: SPU's extra-precision truncation)",
                            lambda x: x * 2.0**-28),
    "integer_product": ("int(x) * int(x) (reshare, no truncation)", lambda x: _encoding(x) * _encoding(x)),
    "batched_compare": ("x < 6 and -x < 6 as one batched comparison (two MSB extractions in one)",
                        lambda x: jnp.stack([x, -x]) < 6.0),
    "bit_and": ("(x < 6) & (-x < 6): batched_compare, then an AND of its two bits (boolean shares)",
                lambda x: jnp.logical_and(*(jnp.stack([x, -x]) < 6.0))),
    "silu": ("ops.silu under the protocol set", ops.silu),
    "silu_low_byte": ("the `cipherdm-low-byte` SiLU (clamped half-square, window compared after |x|)",
                      registry.kernel("silu", "cipherdm-low-byte")),
}


#: the softmax whose floor is counted: rows as the kernel table's 1024-wide ones (standard deviation 2, one 1e4 logit)
SOFTMAX_SHAPE, SOFTMAX_SPREAD = (20, 1024), 2.0
#: the accuracy contract's rows (tests/test_cipherdm.py, test_softmax_rows): (rows, width, standard deviation),
#: each with a 1e4 logit; max error <= SOFTMAX_MAX_ERR
CONTRACT_ROWS = ((8, 16, 4.0), (98, 49, 4.0), (8, 64, 8.0), (8, 256, 2.0), (8, 1024, 2.0), (256, 256, 2.0))
SOFTMAX_MAX_ERR = 5e-3
#: exp designs: a clamped base polynomial of this degree (its secret products: Horner monic for 2 and 3,
#: Knuth's form for 4), raised to 2**squarings by squarings
EXP_BASES = {2: 1, 3: 2, 4: 2}


def _contract_rows():
    rng = np.random.default_rng(0)
    rows = []
    for count, width, spread in CONTRACT_ROWS:
        x = rng.standard_normal((count, width)) * spread
        x[0, 0] = 1e4
        rows.append(x - x.max(axis=1, keepdims=True))  # the exact max: only the exp is approximated
    return rows


def _exp_design_error(degree: int, squarings: int, rows) -> tuple:
    """The least softmax max error (float64, exact max and reciprocal) of exp(x) ~ q(max(x, clamp) / n)**n,
    n = 2**squarings, q of ``degree`` fitted by weighted minimax on [clamp / n, 0], over a grid of clamps and
    weights (weight n e^(p (n-1) y), p in {0.5, 1}, plus a weight next to the clamp that holds the tail down)."""
    n = 2**squarings
    want = [softmax(z) for z in rows]
    best = (np.inf, None)
    for clamp in np.arange(-26.0, -3.0, 2.0):
        y = np.linspace(clamp / n, 0.0, 1001)
        for p in (0.5, 1.0):
            for tail in (0.0, 1e-2, 1e-1):
                weight = n * np.exp(p * (n - 1) * y) + tail * (y < clamp / n + 0.05)
                c, _ = minimax(y, np.exp(y), np.vander(y, degree + 1, increasing=True), weight=weight)
                err = 0.0
                for z, w in zip(rows, want):
                    e = np.polyval(c[::-1], np.maximum(z, clamp) / n) ** n
                    err = max(err, float(np.abs(e / e.sum(axis=1, keepdims=True) - w).max()))
                if err < best[0]:
                    best = (err, float(clamp))
    return best


def fewest_exp_products(max_products: int = 5) -> list:
    """Per count of secret products (1..max_products), the exp design of EXP_BASES and squarings with that count
    whose softmax errs least on CONTRACT_ROWS: [{"products", "degree", "squarings", "clamp", "max_err"}]."""
    rows = _contract_rows()
    found = []
    for products in range(1, max_products + 1):
        designs = [(d, products - k) for d, k in EXP_BASES.items() if products - k >= 0]
        errors = [(*_exp_design_error(d, s, rows), d, s) for d, s in designs]
        err, clamp, degree, squarings = min(errors)
        found.append({"products": products, "degree": degree, "squarings": squarings, "clamp": clamp, "max_err": err})
    return found


def measure_softmax(protocol_set: str) -> float:
    """Bytes per element per party of ``protocol_set``'s softmax on SOFTMAX_SHAPE logits (ours checked against the
    contract; `spu`'s exp wraps on the 1e4 logit, which its bytes do not depend on)."""
    x = (np.random.default_rng(1).standard_normal(SOFTMAX_SHAPE) * SOFTMAX_SPREAD).astype(np.float32)
    x[0, 0] = 1e4
    with SecureSession(protocol_set) as session:
        y = session.run(lambda v: ops.softmax(v, axis=-1), x)
        if protocol_set != registry.BASELINE and np.abs(y - softmax(x)).max() > SOFTMAX_MAX_ERR:
            raise RuntimeError(f"{protocol_set}'s softmax misses the accuracy contract on the floor's logits")
        return session.last_stats.bytes_sent / 3 / x.size


def softmax_floor(rows: dict, exp_designs: list, measured: dict) -> dict:
    """The byte floor of a softmax with an exact max by comparisons and a clamped polynomial exp, from the measured
    blocks. An exp of k secret products is a polynomial of degree <= 2**k in its clamped input; where every design of
    up to k products misses the contract, the exp needs k + 1 (`fewest_products`: claimed only up to 3, since two
    products make at most a quartic, the family searched; beyond, circuits outside the family exist). Its scaling
    of x (one public product in ours) is left out: a model could fold it into its weights."""
    b = {k: v["bytes_per_element_per_party"] for k, v in rows.items()}
    used_comparison = b["relu"]  # a comparison, its bit converted, one integer product with it
    parts = {
        "row max: n - 1 comparisons a row (pairs), each bit converted and in one integer product": used_comparison,
        "exp's clamp: one comparison, its conversion, one bit product": used_comparison,
        "normalisation: one secret product (the exp times its row's reciprocal)": b["secret_product"],
    }
    fixed = sum(parts.values())
    failing = [d["products"] for d in exp_designs if d["max_err"] > SOFTMAX_MAX_ERR]
    fewest = next(k for k in range(1, len(exp_designs) + 2) if k not in failing)
    proven = min(fewest, 3)  # 2 products make at most a quartic, the family searched; 3-product circuits go beyond
    holding = next((d for d in exp_designs if d["max_err"] <= SOFTMAX_MAX_ERR), None)
    return {
        "parts": parts,
        "secret_product": b["secret_product"],
        "public_product": b["public_product"],
        "exp_designs": exp_designs,
        "fewest_products": proven,
        "floor": fixed + proven * b["secret_product"],
        "cheapest_found": None if holding is None else {
            "products": holding["products"],
            "bytes": fixed + holding["products"] * b["secret_product"] + b["public_product"]},
        "measured": measured,
    }


def measure(protocol_set: str, n: int, repeat: int = 3) -> dict:
    """Each block's bytes per element per party, send actions, and wall seconds per element (the median of
    ``repeat`` runs: the three parties' compute on this machine's cores, as the benchmark measures seconds)."""
    x = np.linspace(-20, 20, n).astype(np.float32)
    rows = {}
    with SecureSession(protocol_set) as session:
        for name, (what, fn) in PRIMITIVES.items():
            seconds = []
            for _ in range(repeat):
                session.run(fn, x)
                seconds.append(session.last_stats.seconds)
            s = session.last_stats
            rows[name] = {
                "what": what,
                "bytes_per_element_per_party": s.bytes_sent / 3 / n,
                "send_actions": s.send_actions,
                "seconds_per_element": float(np.median(seconds)) / n,
            }
    return rows


#: `op_overhead`: additions chained in one program, and the elements each adds
OVERHEAD_OPS, OVERHEAD_ELEMENTS = 1000, 8


def op_overhead(ops_: int = OVERHEAD_OPS, repeat: int = 5) -> dict:
    """Milliseconds one more op adds to a run when it does next to nothing (an addition of OVERHEAD_ELEMENTS secrets):
    ``ops_`` additions written out in the program, against the same additions as ``ops_`` iterations of a loop
    whose body is one addition (the medians of ``repeat`` runs after a warm-up, less an empty program's). What
    differs is the program's text, which SPU 0.9.5 parses and verifies on every run."""
    x = np.ones(OVERHEAD_ELEMENTS, np.float32)

    def written_out(a, b):
        for _ in range(ops_):
            a, b = b, a + b
        return a

    def looped(a, b):
        return jax.lax.fori_loop(0, ops_, lambda _, ab: (ab[1], ab[0] + ab[1]), (a, b))[0]

    def empty(a, b):
        return a + b

    with SecureSession("cipherdm") as session:
        medians = {}
        for name, fn in (("empty", empty), ("written_out", written_out), ("looped", looped)):
            seconds = []
            for _ in range(repeat + 1):  # the first is a warm-up
                session.run(fn, x, x)
                seconds.append(session.last_stats.seconds)
            medians[name] = float(np.median(seconds[1:]))
    per_op = lambda name: (medians[name] - medians["empty"]) / ops_ * 1e3  # noqa: E731
    return {"ops": ops_, "elements": OVERHEAD_ELEMENTS, "repeat": repeat, "written_out_ms_per_op": per_op("written_out"),
            "looped_ms_per_iteration": per_op("looped")}


#: where a truncation by a tiny public constant is exact: ring values of about 2**m (m here), truncated by
#: TINY_SHIFT bits as the masked-square SiLU truncates its t (protocols/cipherdm.py, `_masked_square_base`)
TINY_RANGE_BITS, TINY_SHIFT = (42, 44, 46, 48), 28


def tiny_truncation_range(n: int, seed: int = 0) -> dict:
    """For each m in TINY_RANGE_BITS, the share of n ring values of magnitude 2**(m-1)..2**m (squares of encodings,
    either sign) whose truncation by a public product by 2**-TINY_SHIFT is off by more than one unit."""
    rng = np.random.default_rng(seed)
    wrong = {}
    with SecureSession("cipherdm") as session:
        for m in TINY_RANGE_BITS:
            x = (np.sqrt(rng.uniform(0.5, 1.0, n)) * 2.0 ** (m / 2 - 18)).astype(np.float32)
            sign = rng.choice(np.array([-1, 1], np.int32), n)
            e = np.trunc(x.astype(np.float64) * 2**18).astype(np.int64)  # SPU's encoding (reference.encoded)

            def truncate(v, sign):
                square = jnp.asarray(_encoding(v) * _encoding(v) * sign)
                return _encoding(jax.lax.bitcast_convert_type(square, v.dtype) * 2.0**-TINY_SHIFT)

            got = np.asarray(session.run(truncate, x, sign), np.int64)
            want = (e * e * sign) >> TINY_SHIFT
            wrong[m] = float(np.mean(np.abs(got - want) > 1))
    return wrong


def accounting(rows: dict) -> dict:
    """Split the cipherdm SiLU into measured parts: bytes per element per party and send actions, each part's
    send actions as its block takes them alone."""
    b = {k: v["bytes_per_element_per_party"] for k, v in rows.items()}
    a = {k: v["send_actions"] for k, v in rows.items()}
    truncation, tiny = (b["public_product"], a["public_product"]), (b["tiny_public_product"], a["tiny_public_product"])
    reshare = (b["integer_product"], a["integer_product"])
    conversion = (b["indicator"] - b["compare"], a["indicator"] - a["compare"])  # B2A of the bit
    bit_product = (b["relu"] - b["indicator"], a["relu"] - a["indicator"])
    parts = {
        "1 integer product (the window's E_T^2 - E^2 of the encoding E)": reshare,
        "2 comparisons (sign, window) in one batched MSB extraction": (2 * b["compare"], a["batched_compare"]),
        "2 conversions of their bits to arithmetic, batched": (2 * conversion[0], conversion[1]),
        "1 integer bit product (relu, and |x| = 2 relu - x)": bit_product,
        "1 truncation by 28 bits of E^2 + K |E| + const, to t at 12 fraction bits (a public product by 2**-28)": tiny,
        "1 integer product (t^2)": reshare,
        "1 truncation by 16 bits of lam t^2 + s |E| (a public product by 2**-16)": truncation,
        "1 integer bit product (the window's bit masks R, last)": bit_product,
    }
    return {
        "parts": parts,
        "predicted": sum(v[0] for v in parts.values()),
        "predicted_send_actions": sum(v[1] for v in parts.values()),
        "measured": b["silu"],
        "measured_send_actions": a["silu"],
        "low_byte": (b["silu_low_byte"], a["silu_low_byte"]),
        "truncation": truncation[0],
        "reshare": reshare[0],
        "conversion": conversion[0],
    }


def softmax_markdown(floor: dict) -> list:
    spu = floor["measured"]["spu"]
    lines = [
        "## The softmax's byte floor",
        "",
        f"Softmax on {SOFTMAX_SHAPE[0]} rows of {SOFTMAX_SHAPE[1]} (standard deviation {SOFTMAX_SPREAD:g}, one 1e4 logit). A "
        "softmax that takes an exact row max by comparisons (so that every exp's input is <= 0, for any logits) and a "
        "polynomial exp clamped below (no polynomial stays bounded on the whole half line) spends at least, per "
        "element and party:",
        "",
    ]
    lines += markdown_table(["part", "B/elem/party"], [[part, f"{v:.1f}"] for part, v in floor["parts"].items()]
                            + [["exp's polynomial: k secret products (below)", f"k x {floor['secret_product']:.1f}"]])
    lines += [
        "",
        "How many secret products an exp needs: for each count, the exp design (a clamped base of degree 2-4, "
        "raised by squarings) whose softmax errs least on the accuracy contract's logits "
        f"({', '.join(f'{r} x {w}' for r, w, _ in CONTRACT_ROWS)}, each with a 1e4 logit), in float64 with an "
        "exact max and reciprocal, so only the exp errs; searched over clamps and fit weights "
        f"(scripts/primitive_costs.py, `fewest_exp_products`). The contract: max error <= {SOFTMAX_MAX_ERR:g}. "
        "Two products make a polynomial of degree at most 4 in the clamped input, the family searched at that count "
        "(a search, so the best found); from three products on, circuits outside the family exist.",
        "",
    ]
    lines += markdown_table(["secret products", "best design", "softmax max err (float64)", "holds the contract"],
                            [[d["products"], f"degree {d['degree']}, to the power {2 ** d['squarings']}, clamp {d['clamp']:g}",
                              f"{d['max_err']:.2g}", "yes" if d["max_err"] <= SOFTMAX_MAX_ERR else "no"]
                             for d in floor["exp_designs"]])
    lines += ["", f"Measured softmax on the same logits: `spu` {spu:.1f} B"
              + "".join(f", `{name}` {v:.1f} B ({spu / v:.2f}x)" for name, v in floor["measured"].items() if name != "spu")
              + "."]
    k, bound, target = floor["fewest_products"], floor["floor"], spu / 4
    verdict = ("out of reach for any softmax of this form under SPU's blocks" if bound > target
               else "not ruled out by this floor")
    lines += ["", f"Floor: with at least {k} exp products, {bound:.1f} B, {spu / bound:.2f}x fewer than `spu`. 4x fewer "
              f"would need <= {target:.1f} B: {verdict}."]
    cheapest = floor["cheapest_found"]
    if cheapest:
        lines[-1] += (f" The cheapest design found that holds the contract takes {cheapest['products']} products and, "
                      f"with its public scaling product, {cheapest['bytes']:.1f} B ({spu / cheapest['bytes']:.2f}x).")
    return lines + [""]


def markdown(command: str, n: int, rows: dict, acc: dict, spu_silu: float, floor: dict, tiny_range: dict,
             overhead: dict) -> str:
    lines = [
        "# SPU building blocks, how they add up to our SiLU, and a softmax's byte floor",
        "",
        f"Command: `{command}`  ",
        f"ABY3, FM64, 18 fraction bits, three parties in one process, {n} elements; bytes per element per party",
        "(all parties' bytes / 3 / elements), send actions of the busiest party, and wall nanoseconds per element",
        "(median of 3 runs: the three parties' compute on this machine's cores).",
        "",
    ]
    lines += markdown_table(["block", "what", "B/elem/party", "send actions", "ns/elem"],
                            [[name, r["what"], f"{r['bytes_per_element_per_party']:.1f}", r["send_actions"],
                              f"{r['seconds_per_element'] * 1e9:.0f}"] for name, r in rows.items()], align="ll")
    lines += [
        "",
        "## Accounting of the `cipherdm` SiLU",
        "",
        "relu(x) + tail + [|x| < T] (lam t^2 + s a + c - tail), a = |x|, t = a^2 / 16 + t1 a + t0 held at 12 fraction",
        "bits: the \"masked square\" (protocols/cipherdm.py, scripts/fit_kernels.py).",
        "",
    ]
    lines += markdown_table(["part", "B/elem/party", "send actions"],
                            [[part, f"{v[0]:.1f}", v[1]] for part, v in acc["parts"].items()]
                            + [["**sum of parts**", f"**{acc['predicted']:.1f}**", f"**{acc['predicted_send_actions']}**"],
                               ["measured SiLU", f"{acc['measured']:.1f}", acc["measured_send_actions"]]])
    low_bytes, low_actions = acc["low_byte"]
    lines += [
        "",
        "Send actions are each block's alone; in sequence SPU may take one fewer than their sum.",
        "",
        f"Vanilla SPU SiLU (the `spu` set) in this run: {spu_silu:.1f} B, so the 4x target of issue 3 needs",
        f"<= {spu_silu / 4:.1f} B. The `cipherdm` SiLU is {acc['measured']:.1f} B ({spu_silu / acc['measured']:.2f}x) in",
        f"{acc['measured_send_actions']} send actions; the `cipherdm-low-byte` SiLU (the clamped \"half-square\" below, its",
        f"window compared only after |x| is known: no range limit) is {low_bytes:.1f} B ({spu_silu / low_bytes:.2f}x) in",
        f"{low_actions} send actions.",
        "",
        "How the parts were chosen (each measured in the rows above):",
        "",
        "- Two comparisons are needed: the sign (relu outside the window) and the window |x| < T (without it",
        "  the polynomial is wrong for large |x|). Batched, they take one MSB extraction's rounds (row",
        "  `batched_compare`); the window is then the sign of E_T^2 - E^2, which needs |x| < 11585 (the square of",
        "  the encoding must fit the ring). Each bit is converted to arithmetic once",
        f"  ({acc['conversion']:.1f} B) and multiplied into a value as an integer product (relu; the mask), a",
        f"  reshare of {acc['reshare']:.1f} B with no truncation (a select costs more: row `select_relu`).",
        "- The window's product is E_T^2 - E^2, so E^2, the square a quartic starts from, is already paid for. t =",
        "  a^2 / 16 + t1 a + t0 is then one truncation of E^2 + K |E| + const (integers: local), and lam t^2 + s a",
        "  one integer product and one more truncation: a quartic in two truncations and ONE product after the",
        "  relu. No clamp of |x| comes first: outside the window those powers wrap the ring, and the window's bit,",
        "  multiplied in last, zeroes them (beyond T the SiLU is relu(x) plus a constant tail, R(T) / 2).",
        f"- A truncation costs {acc['truncation']:.1f} B and sheds up to 16 fraction bits; shedding more takes a public",
        "  constant below 4 units of 2^-18, which SPU truncates with extra precision (row `tiny_public_product`, 4 B",
        f"  more) and gets wrong for large inputs: truncated by {TINY_SHIFT} bits, ring values of about 2^m come out off by",
        "  more than one unit in "
        + ", ".join(f"{100 * share:.3g} % (m = {m})" for m, share in tiny_range.items()) + f" of {n}.",
        "  t's truncation sheds 28 bits, so t's leading coefficient is 1/16: a finer one would be E^2 times a",
        "  larger integer, beyond that range (protocols/cipherdm.py refuses a sum that could reach 2^43). lam (on a",
        "  2^-10 grid, its integer product's) gives the quartic back its free",
        "  leading coefficient; t at 12 fraction bits moves R by < 4e-4 (the fit holds its cap with t off by one",
        "  unit either way).",
        "- The clamped \"half-square\" it replaced (now `cipherdm-low-byte`'s, with its window compared after |x|):",
        "  relu(x) + (z + gamma1) z + s a + gamma0 on a = min(|x|, T), z = (u + beta0) u, u = c a rounded to 9",
        "  fraction bits: a bit product more (the clamp, before the powers) and an integer product less, 156 B",
        "  in 18 send actions with the window batched (its last measurement as the `cipherdm` SiLU), where a",
        "  quartic in Knuth's form at 18 fraction bits needs three truncations (153.3 B).",
        "- Also tried: the relu and last products as one dot product (17.3 B for two products, but SPU 0.9.5",
        "  runs a batched dot as one matmul per element: thousands of send actions); both bits converted in one",
        "  2-bit conversion (18.7 B for two, but the two bits cannot then be separated without a product); a",
        "  quadratic R (errs 0.051 at best), a polynomial in x instead of |x| (0.019 at degree 8 on [-6, 6]), the",
        "  masked square without lam (a square of t plus constants: 0.017 weighted where the fit reaches 0.011) or",
        "  without s a (errs 0.022 at best); and both truncations as one public product by a per-element constant",
        "  (SPU then encodes the tiny one at 18 bits: zero).",
        "",
    ]
    return "\n".join(lines + softmax_markdown(floor) + overhead_markdown(overhead))


def overhead_markdown(overhead: dict) -> list:
    written, looped = overhead["written_out_ms_per_op"], overhead["looped_ms_per_iteration"]
    return [
        "",
        "## What one more op of a program costs a run",
        "",
        f"{overhead['ops']} additions of {overhead['elements']} secrets chained in one program: {written:.3f} ms per",
        f"addition when they are written out, {looped:.3f} ms per iteration when they are the iterations of a loop whose",
        "body is one addition (each iteration also runs the loop's counter and its test; medians of "
        f"{overhead['repeat']} runs after a warm-up, less an empty program's; three parties on this machine's cores).",
        "The additions are the same either way; the written-out program's text is about "
        f"{overhead['ops']} ops longer, and SPU",
        "0.9.5 parses and verifies a program's text on every run before it executes it (a profile of the written-out",
        "program, once, found most of its samples in MLIR's parser and verifier). So every op a kernel is written with",
        "costs a run time of its own, communication or not, consistent with the \"outside ops\" seconds of",
        "[benchmark.md](benchmark.md)'s step tables, which grow with a step's SPU ops.",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=100000,
                        help="elements per measurement (default 100000: the ops' fixed seconds then weigh little)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "primitives",
                        help="output path without suffix: writes .md and .json (default docs/results/primitives)")
    args = parser.parse_args(argv)
    if args.elements < 100:
        parser.error("--elements must be at least 100")
    rows = measure("cipherdm", args.elements)
    tiny_range = tiny_truncation_range(args.elements)
    spu_silu = measure("spu", args.elements)["silu"]["bytes_per_element_per_party"]
    acc = accounting(rows)
    measured = {name: measure_softmax(name) for name in ("spu", "cipherdm", "cipherdm-low-byte")}
    floor = softmax_floor(rows, fewest_exp_products(), measured)
    overhead = op_overhead()
    command = "python scripts/primitive_costs.py" + ("" if args.elements == parser.get_default("elements") else f" --elements {args.elements}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "elements": args.elements, "blocks": rows, "silu_accounting": acc,
         "spu_silu_bytes_per_element_per_party": spu_silu, "softmax_floor": floor,
         "tiny_truncation_wrong_by_magnitude_bits": tiny_range, "op_overhead": overhead}, indent=2))
    text = markdown(command, args.elements, rows, acc, spu_silu, floor, tiny_range, overhead)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
