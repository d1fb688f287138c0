#!/usr/bin/env python
"""Benchmark against vanilla SPU, side by side in one run: docs/results/benchmark.{md,json} and charts.

Rows (select with --rows):
  kernels  every registered kernel per protocol set (the measurements of scripts/benchmark_kernels.py)
  step     one denoising step (UNet + DDIM update) of the shipped MNIST SiLU and Mish models (batch 1 and 8)
           and of a small Stable-Diffusion-shaped UNet2DConditionModel (random weights, 4x16x16 latent,
           2 levels, cross-attention over 77 tokens), per protocol set, plus two floors (not correct networks):
           linear-floor (every kernel the identity) and kernel-floor (every kernel only the SPU blocks our
           designs need, cipherdm_spu/floor_kernels.py), with a per-kernel breakdown and the error against plaintext
  sample   a full DDIM sample of the MNIST SiLU model per protocol set, with quality beside the cost
Protocol sets: every available one (configs/protocols: spu, SPU's defaults; spu-pade, CipherDM code's baseline;
cipherdm-paper; cipherdm, ours for rounds; cipherdm-low-byte, ours for bytes).
Latency on LAN (5 Gbps, 0.4 ms RTT) and WAN (400 Mbps, 40 ms RTT) is estimated from the measured bytes
and send actions (see cipherdm_spu/benchmark.py). Ratios are against `spu` in the same run.

--network none|relay|lan|wan (one or more): the MNIST SiLU step (batch 1) also runs on a three-process
cluster on this machine (spu-launch, TLS links), its links direct (none) or through the emulator
(cipherdm_spu/netem.py: relay adds nothing, lan 5 Gbps / 0.2 ms one-way, wan 400 Mbps / 20 ms one-way):
measured seconds beside the estimates, each party's CPU seconds; writes benchmark_network.{md,json,png}
(not benchmark.md). --cifar adds the CIFAR-10-scale step row (embedded).
--override SET:OP=KERNEL adds, in each step case that calls OP, a row of SET with OP's kernel replaced (a kernel
outside the sets, e.g. cipherdm:gelu=cipherdm-masked-square); --only-sd measures the SD-shaped case alone.

    python scripts/benchmark.py                         # everything
    python scripts/benchmark.py --rows step --batches 1 --repeat 3
    python scripts/benchmark.py --quick --out /tmp/bench   # CI smoke test
    python scripts/benchmark.py --rows step --network wan --sets spu cipherdm   # measured on emulated WAN links
    python scripts/benchmark.py --rows step --only-sd --sets spu cipherdm \\
        --override cipherdm:gelu=cipherdm-masked-square   # the SD-shaped step with the masked-square GeLU
    python scripts/benchmark.py --rows step --batches 1 --repeat 3 --sets spu cipherdm \
        --override cipherdm:softmax=cipherdm-lan --out docs/results/lan-softmax   # the softmax priced on the LAN
    python scripts/benchmark.py --rows step --batches 1 --repeat 3 --sets spu cipherdm \
        --override cipherdm:rsqrt=cipherdm-centred --out docs/results/centred-norms   # the norms centred in one truncation
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from cipherdm_spu import Public, SecureSession, cluster_config, quality, registry
from cipherdm_spu.benchmark import (COMPARISON_OPS, FLOORS, NETWORKS, StepCase, estimate_latency, estimate_terms,
                                    measure_kernels, measure_step, mnist_step_case, nonlinear_calls, ratios)
from cipherdm_spu.cli_common import load_model_dir
from cipherdm_spu.client import PartyClients
from cipherdm_spu.cluster import loopback_cluster
from cipherdm_spu.errors import ProtocolError
from cipherdm_spu.jobs import sample_on_cluster, upload_model
from cipherdm_spu.models import (DDIMSampler, ScheduleConfig, UNet2DConditionModel, UNet2DModel, sample_shape,
                                 schedulers)
from cipherdm_spu.netem import PRESETS, link_for
from cipherdm_spu.plan import Policy
from cipherdm_spu.registry import BASELINE, available_protocol_sets
from cipherdm_spu.results import markdown_table
from cipherdm_spu.sampling import (SecureDiffusion, draw_noise, make_denoise_step, one_hot, sample_plaintext,
                                   secure_params)

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
SD_SHAPED = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                 cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8)
#: google/ddpm-cifar10-32's UNet2DModel config, as diffusers documents it (35,746,307 parameters; nothing downloaded)
CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=[128, 256, 256, 256],
               down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], act_fn="silu",
               attention_head_dim=None, center_input_sample=False, downsample_padding=0, flip_sin_to_cos=False,
               freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional")


def cifar_case(seed: int) -> StepCase:
    """One DDIM step of the CIFAR-10-scale UNet (random weights, batch 1, 3x32x32)."""
    model = UNet2DModel.from_config(CIFAR10)
    params = model.init_params(jax.random.PRNGKey(seed))
    sampler = DDIMSampler(ScheduleConfig(), 50)
    x = np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)
    terms = jax.tree_util.tree_map(np.asarray, model.apply(params, int(sampler.timesteps[25]), method=model.time_terms))
    coefficients = sampler.coefficient_table()[25]
    step = make_denoise_step(model, sampler.clip_range)
    return StepCase("CIFAR-10-scale UNet (ddpm-cifar10-32 config, random weights) batch 1", secure_params(params),
                    (x, None, terms, Public(coefficients), None), step,
                    lambda: np.asarray(step(params, x, None, terms, coefficients, None)))


def sd_case(seed: int, tokens: int = 77) -> StepCase:
    model = UNet2DConditionModel.from_config(SD_SHAPED)
    params = model.init_params(jax.random.PRNGKey(seed))
    sampler = DDIMSampler(ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         clip_sample=False, steps_offset=1), 50)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    context = rng.standard_normal((1, tokens, 64)).astype(np.float32)
    terms = jax.tree_util.tree_map(np.asarray, model.apply(params, int(sampler.timesteps[25]), method=model.time_terms))
    coefficients = sampler.coefficient_table()[25]

    def step(weights, x, context, terms, coefficients):
        eps = model.apply(weights, x, encoder_hidden_states=context, time_terms=terms)
        return schedulers.step(x, eps, coefficients)

    return StepCase(f"SD-shaped UNet ({tokens} tokens)", secure_params(params), (x, context, terms, Public(coefficients)),
                    step, lambda: np.asarray(step(params, x, context, terms, coefficients)))


def run_steps(args) -> list:
    cases = []
    for model_dir in args.models:
        for b in args.batches:
            cases.append(lambda model_dir=model_dir, b=b: mnist_step_case(model_dir, b, args.seed))
    if args.network:  # the step the cluster runs, for its estimate from one process
        cases = [lambda: mnist_step_case(args.models[0], 1, args.seed)]
    if not args.quick and not args.only_cifar and not args.network:
        cases.append(lambda: sd_case(args.seed))
    if args.only_sd:
        cases = cases[-1:]
    if args.cifar or args.only_cifar:
        cases.append(lambda: cifar_case(args.seed))
    if args.only_cifar:
        cases = cases[-1:]
    results = []
    for make in cases:
        case = make()
        called = ({call.op for call in nonlinear_calls(case.secure_fn, case.weights, *case.inputs)}
                  if args.override else set())
        overridden = {pset.name: pset for pset in (registry.resolve(name, {op: kernel})
                                                   for name, op, kernel in args.override if op in called)}
        for name, op, kernel in args.override:
            if op not in called:
                print(f"{case.name}: calls no {op}, so no row for {name}:{op}={kernel}", file=sys.stderr)
        rows = {}
        for name in tqdm(list(args.sets) + list(overridden) + list(FLOORS), desc=case.name):
            protocol = FLOORS[name]() if name in FLOORS else overridden.get(name, name)
            with SecureSession(protocol) as session:
                rows[name] = measure_step(session, case, repeat=args.repeat, breakdown=name != "linear-floor")
        ratios(rows)
        results.append({"case": case.name, "rows": rows})
    return results


def run_samples(args) -> list:
    model_dir = args.sample_model
    model, params = UNet2DModel.from_pretrained(model_dir)
    sampler = DDIMSampler(ScheduleConfig.from_file(model_dir), args.sample_steps)
    labels = [i % 10 for i in range(args.sample_batch)]
    x_t, _ = draw_noise(args.seed, sampler, (len(labels), 1, 28, 28))
    plain = sample_plaintext(model, params, sampler, x_t, labels)
    judge = quality.DigitJudge.load()
    plain_probs, _ = judge(plain)
    rows = {}
    for name in tqdm(args.sets, desc=f"DDIM-{args.sample_steps} sample"):
        with SecureSession(name) as session:
            diffusion = SecureDiffusion(session, model, params, sampler)
            started = time.perf_counter()
            images, total, _ = diffusion.sample(x_t, labels)
            wall = time.perf_counter() - started
            diffusion.close()
        probs, _ = judge(images)
        rows[name] = {
            "seconds": wall, "bytes_sent": total.bytes_sent, "bytes_sent_per_party": total.bytes_sent_per_party,
            "send_actions": total.send_actions,
            "estimated_seconds": {net: estimate_latency(dataclasses.replace(total, seconds=wall), net) for net in NETWORKS},
            "psnr_vs_plaintext": quality.psnr(images, plain), "ssim_vs_plaintext": quality.ssim(images, plain),
            "conditional_accuracy": quality.conditional_accuracy(probs, labels),
            "plaintext_conditional_accuracy": quality.conditional_accuracy(plain_probs, labels),
        }
    ratios(rows)
    return [{"case": f"{model_dir.name} DDIM-{args.sample_steps}, batch {len(labels)}", "rows": rows}]


def run_network(args, steps: list) -> list:
    """The MNIST step (batch 1) on a cluster of three processes per network: measured against two estimates,
    from the one-process step row (``steps[0]``) and from the busiest party's CPU seconds."""
    model_dir = args.models[0]
    model, params, scheduler = load_model_dir(model_dir)
    sampler = DDIMSampler(ScheduleConfig.from_file(model_dir), args.cluster_steps)
    x_t, _ = draw_noise(args.seed, sampler, (1, *sample_shape(model.config)))
    plain = sample_plaintext(model, params, sampler, x_t, [0])
    embedded = steps[0]["rows"]
    blocks = []
    for network in args.network:
        link = None if network == "none" else link_for(network)
        bandwidth, delay = (float("inf"), 0.0) if link is None else (link.bandwidth_bps, link.delay_s)
        rows = {}
        with tempfile.TemporaryDirectory(prefix="cipherdm-bench-") as folder, \
                loopback_cluster(Path(folder), link) as (config, emulator):
            cluster = cluster_config.load(config)
            with PartyClients(cluster, "owner") as owner:
                upload_model(owner, "mnist", model, params, scheduler, Policy())
            for name in tqdm(args.sets, desc=f"cluster, network {network}"):
                job = {"sampler": "ddim", "steps": args.cluster_steps, "batch": 1, "protocol_set": name}
                relay_cpu = emulator.cpu_seconds() if emulator else 0.0
                with PartyClients(cluster, "user") as user:
                    image, total, reports = sample_on_cluster(user, "mnist", job, x_t, one_hot([0], 10), owner="owner")
                n = len(reports)
                relay_cpu = (emulator.cpu_seconds() - relay_cpu) / n if emulator else 0.0
                per_step = dataclasses.replace(
                    total, seconds=total.seconds / n, bytes_sent=total.bytes_sent // n,
                    bytes_sent_per_party=[b // n for b in total.bytes_sent_per_party], send_actions=total.send_actions // n,
                    cpu_seconds_per_party=[c / n for c in total.cpu_seconds_per_party],
                    busy_seconds_per_party=[b / n for b in total.busy_seconds_per_party])
                terms = estimate_terms(per_step, bandwidth, delay)
                wire = terms["bytes"] + terms["rounds"]
                one_process = embedded[name]["seconds"] + wire
                busiest = terms["compute"] + wire
                # here the three parties (and the relays) share this machine's cores: compute takes at least
                # their CPU seconds over the cores
                shared = max(terms["compute"], (sum(per_step.cpu_seconds_per_party) + relay_cpu) / os.cpu_count()) + wire
                rows[name] = {
                    "seconds": per_step.seconds, "step_seconds": [r.seconds for r in reports],
                    "bytes_sent": per_step.bytes_sent, "bytes_sent_per_party": per_step.bytes_sent_per_party,
                    "send_actions": per_step.send_actions, "cpu_seconds_per_party": per_step.cpu_seconds_per_party,
                    "busy_seconds_per_party": per_step.busy_seconds_per_party, "terms": terms,
                    "embedded_seconds": embedded[name]["seconds"],
                    "estimate_one_process": one_process, "error_one_process": one_process / per_step.seconds - 1,
                    "estimate_busiest_party": busiest, "error_busiest_party": busiest / per_step.seconds - 1,
                    "relay_cpu_seconds": relay_cpu,
                    "estimate_shared_cores": shared, "error_shared_cores": shared / per_step.seconds - 1,
                    "max_abs_err": float(np.abs(np.asarray(image, np.float64) - plain).max()),
                }
        blocks.append({"network": network, "link": "direct loopback" if link is None else link.describe(),
                       "rows": rows})
    return blocks


def render_network(results: dict, command: str, out: Path) -> str:
    lines = ["# Step time on three processes over emulated links", "", f"Command: `{command}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {results['cpus']} CPUs, load average "
             f"{results['load_before']} before the run. The MNIST SiLU step (batch 1, {results['cluster_steps']} DDIM "
             "steps, per-step means) on a cluster of three processes (spu-launch, mutual TLS on every link); the links "
             "direct (none) or through cipherdm_spu/netem.py's relays. *est. 1-process* adds the bytes and rounds terms "
             "to the one-process step row's seconds; *est. busiest party* adds them to the busiest party's CPU "
             "seconds (compute: what a host of its own would spend); *est. shared cores* takes as compute the most of "
             "that and all parties' and relays' CPU seconds over this machine's cores (what sharing them costs here); "
             "error = estimate / measured - 1.", ""]
    for block in results["network"]:
        rows = []
        for name, r in block["rows"].items():
            t = r["terms"]
            rows.append([name, f"{r['seconds']:.2f}", f"{r['estimate_one_process']:.2f}",
                         f"{100 * r['error_one_process']:+.0f} %", f"{r['estimate_busiest_party']:.2f}",
                         f"{100 * r['error_busiest_party']:+.0f} %", f"{r['estimate_shared_cores']:.2f}",
                         f"{100 * r['error_shared_cores']:+.0f} %", f"{t['compute']:.2f}", f"{t['bytes']:.2f}",
                         f"{t['rounds']:.2f}", " / ".join(f"{c:.1f}" for c in r["cpu_seconds_per_party"]),
                         f"{r['relay_cpu_seconds']:.1f}",
                         f"{r['bytes_sent'] / 1e6:.1f}", r["send_actions"], f"{r['max_abs_err']:.3g}"])
        lines += [f"## Network: {block['network']} ({block['link']})", ""] + markdown_table(
            ["protocol set", "measured s", "est. 1-process s", "error", "est. busiest party s", "error",
             f"est. {results['cpus']} shared cores s", "error", "compute s", "bytes s", "rounds s", "CPU s P0 / P1 / P2",
             "relay CPU s", "MB sent (all)", "send actions", "max abs err vs plaintext"],
            rows, align="lrrrrrrrrrrrrrrr")
        if BASELINE in block["rows"]:
            base = block["rows"][BASELINE]["seconds"]
            lines += ["", "Measured step time vs spu: " + ", ".join(
                f"{name} {base / r['seconds']:.2f}x" for name, r in block["rows"].items() if name != BASELINE)]
        lines.append("")
    one_process = render(results, command, out).split("\n", 4)[4]  # the step rows as benchmark.md has them, less its charts
    lines += ["# The same steps in one process", ""] + [line for line in one_process.split("\n") if not line.startswith("Charts:")]
    lines += ["Chart: benchmark_network.png (per network and protocol set: the estimate's compute, bytes and rounds "
              "terms stacked, the measured step time as a black line)."]
    return "\n".join(lines) + "\n"


def network_chart(results: dict, out: Path) -> None:
    """Step time split into compute, bytes on the wire and round latency, with the measured time, per set and network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = results["network"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(3.2 * len(blocks), 4), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        names = list(block["rows"])
        bottom = np.zeros(len(names))
        for term, colour in (("compute", "tab:blue"), ("bytes", "tab:orange"), ("rounds", "tab:green")):
            values = np.array([block["rows"][n]["terms"][term] for n in names])
            ax.bar(names, values, bottom=bottom, color=colour, label=f"{term} (est.)")
            bottom += values
        ax.scatter(names, [block["rows"][n]["seconds"] for n in names], color="black", marker="_", s=600, zorder=3,
                   label="measured")
        ax.set_title(f"{block['network']}: {block['link']}", fontsize=8)
        ax.set_ylabel("seconds per step")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "benchmark_network.png", dpi=110)
    plt.close(fig)


def run_kernels(args) -> dict:
    rng = np.random.default_rng(args.seed)
    n, rows = (2000, 8) if args.quick else (20000, 64)
    return {name: measure_kernels(name, rng, n, rows) for name in tqdm(args.sets, desc="kernels")}


def render_kernel_seconds(block: dict) -> list:
    """The kernels' own seconds in the step (each op's calls run alone), the comparisons' part of them (SPU's
    comparison ops, one MSB extraction per element each), and each set's total against `spu`'s."""
    sets = [(n, r["kernels"]) for n, r in block["rows"].items() if "kernels" in r]
    if not sets or any("seconds_by_spu_op" not in k for _, kernels in sets for k in kernels.values()):
        return []
    ops = sorted({op for _, k in sets for op in k})
    spu_total = sum(k["seconds"] for k in dict(sets)[BASELINE].values()) if BASELINE in dict(sets) else None
    rows = []
    for name, kernels in sets:
        total = sum(k["seconds"] for k in kernels.values())
        comparisons = sum(s for k in kernels.values() for op, s in k["seconds_by_spu_op"].items() if op in COMPARISON_OPS)
        rows.append([name, *(f"{kernels[o]['seconds']:.2f}" if o in kernels else "-" for o in ops), f"{total:.2f}",
                     f"{comparisons:.2f}", f"{spu_total / total:.2f}x" if spu_total else "-",
                     f"{100 * comparisons / spu_total:.0f} %" if spu_total else "-"])
    floor = (["", "`kernel-floor`'s kernels are only the SPU blocks every kernel of our designs needs (comparisons, their "
              "conversions, bit and secret products: cipherdm_spu/floor_kernels.py): no activation, exp or rsqrt built "
              "from them takes fewer seconds than its row. Its softmax takes the fewest comparisons and bytes (the row max "
              "by pairs), in more levels than a wider tournament: not necessarily the fewest seconds, nor the fewest "
              "rounds (rounds.md counts the rounds floor)."]
             if "kernel-floor" in dict(sets) else [])
    return ["Kernel seconds (each op's calls alone, three parties on this machine's cores), the part of them in SPU's "
            "comparison ops, the total against `spu`'s, and those comparisons alone as a share of `spu`'s total:", ""] + \
        markdown_table(["protocol set", *(f"{o} s" for o in ops), "kernels s", "of which comparisons s", "kernels vs spu",
                        "comparisons / spu's kernels"], rows) + floor


STEP_SECONDS_OPS = 5  # the SPU ops a step's seconds are broken into (the rest summed)


def render_step_seconds(block: dict, out: Path) -> list:
    """Where a step's seconds go on this machine: its SPU ops with the most seconds (the first run's profile; the
    table above gives the median of the runs), over every set that recorded them; the markdown is written in ``out``
    (the link to primitives.md is relative to it)."""
    sets = [(n, r["seconds_by_spu_op"]) for n, r in block["rows"].items() if r.get("seconds_by_spu_op")]
    if not sets:
        return []
    totals = {}
    for _, by_op in sets:
        for op, seconds in by_op.items():
            totals[op] = totals.get(op, 0.0) + seconds
    ops = sorted(totals, key=totals.get, reverse=True)[:STEP_SECONDS_OPS]
    rows = []
    for name, by_op in sets:
        row = block["rows"][name]
        in_ops = sum(by_op.values())
        outside = (f"{row['profiled_run_seconds'] - in_ops:.2f}", f"{row['spu_ops_executed']:,}") \
            if "spu_ops_executed" in row else ("n/a", "n/a")
        rows.append([name, *(f"{by_op.get(o, 0.0):.2f}" for o in ops),
                     f"{sum(s for o, s in by_op.items() if o not in ops):.2f}", f"{in_ops:.2f}", *outside])
    return ["The step's seconds by SPU op (one run's profile, all three parties on this machine's cores), and the same "
            "run's seconds outside every op (the runtime's own work per op of the program, parsing and verifying its "
            "text on every run among it: it grows with the program's ops, communication or not; "
            f"[primitives.md]({os.path.relpath(ROOT / 'docs' / 'results' / 'primitives.md', out)}) measures what one op "
            "adds):", ""] + \
        markdown_table(["protocol set", *(f"{o} s" for o in ops), "other ops s", "total s", "outside ops s",
                        "SPU ops executed"], rows)


def render(results: dict, command: str, out: Path) -> str:
    lines = ["# Benchmark: cipherdm-spu against vanilla SPU", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {results['cpus']} CPUs; three parties in one process "
             "(ABY3, FM64, 18 fraction bits) on memory links, so measured seconds are compute; the network estimates "
             "add the busiest party's bytes over the bandwidth and RTT/2 per send action "
             "(LAN 5 Gbps / 0.4 ms RTT, WAN 400 Mbps / 40 ms RTT).", ""]
    for block in results.get("step", []) + results.get("sample", []):
        rows = []
        for name, r in block["rows"].items():
            v = r.get("vs_spu", {})
            extra = ""
            if "psnr_vs_plaintext" in r:
                extra = (f"PSNR {r['psnr_vs_plaintext']:.1f} dB, cond. acc. {100 * r['conditional_accuracy']:.0f} % "
                         f"(plaintext {100 * r['plaintext_conditional_accuracy']:.0f} %)")
            err = f"{r['max_abs_err']:.3g}" if "max_abs_err" in r and name not in FLOORS else "n/a"
            rows.append([name, f"{r['seconds']:.2f}", f"{r['bytes_sent'] / 1e6:.1f}", r["send_actions"],
                         f"{r['estimated_seconds']['LAN']:.2f}", f"{r['estimated_seconds']['WAN']:.1f}",
                         f"{v.get('bytes', 0):.2f}x", f"{v.get('seconds', 0):.2f}x", f"{v.get('WAN', 0):.2f}x", err, extra])
        lines += [f"## {block['case']}", ""] + markdown_table(
            ["protocol set", "seconds", "MB sent (all parties)", "send actions", "est. LAN s", "est. WAN s", "bytes vs spu",
             "time vs spu", "WAN vs spu", "max abs err vs plaintext", "extra"], rows, align="lrrrrrrrrrl")
        kernel_rows = [(n, r["kernels"]) for n, r in block["rows"].items() if "kernels" in r]
        if kernel_rows:
            ops = sorted({op for _, k in kernel_rows for op in k})
            lines += ["", "Per-kernel MB (all parties) / send actions (the busiest party's: rounds); each op's calls run "
                      "alone at the model's shapes (softmax with attention's values: their product is the kernel's), "
                      "and the rest (linear layers, norms' arithmetic, sampler update):", ""]
            lines += markdown_table(
                ["protocol set", *ops, "rest"],
                [[name, *(f"{k[o]['bytes_sent'] / 1e6:.1f} / {k[o]['send_actions']}" if o in k else "-" for o in ops),
                  f"{(block['rows'][name]['bytes_sent'] - sum(v['bytes_sent'] for v in k.values())) / 1e6:.1f} / "
                  f"{block['rows'][name]['send_actions'] - sum(v['send_actions'] for v in k.values())}"]
                 for name, k in kernel_rows])
            lines += ["", *render_kernel_seconds(block)]
        lines += ["", *render_step_seconds(block, out)]
        lines.append("")
    if "kernels" in results:
        sets = list(results["kernels"])
        lines += ["## Kernels", "", "Bytes per element per party (activation samples; exp on x <= 0; softmax rows); "
                  "full tables with errors: docs/results/kernels.md.", ""]
        lines += markdown_table(["kernel", *sets], [[op, *(f"{results['kernels'][s][op]['cost']['bytes_per_element_per_party']:.0f}" for s in sets)]
                                                    for op in results["kernels"][sets[0]]])
        lines.append("")
    if results.get("step"):  # charts() draws the step rows only
        lines += ["Charts: benchmark_bytes_time.png (bytes and seconds per protocol set), benchmark_kernels.png (bytes by kernel)."]
    return "\n".join(lines) + "\n"


def charts(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = results.get("step", [])
    if not blocks:
        return
    fig, axes = plt.subplots(2, len(blocks), figsize=(4 * len(blocks), 6), squeeze=False)
    for i, block in enumerate(blocks):
        names = list(block["rows"])
        axes[0][i].bar(names, [block["rows"][n]["bytes_sent"] / 1e6 for n in names], color="tab:blue")
        axes[0][i].set_title(block["case"], fontsize=8)
        axes[0][i].set_ylabel("MB sent (all parties)")
        axes[1][i].bar(names, [block["rows"][n]["seconds"] for n in names], color="tab:orange")
        axes[1][i].set_ylabel("seconds")
        for ax in (axes[0][i], axes[1][i]):
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "benchmark_bytes_time.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(blocks), figsize=(4 * len(blocks), 4), squeeze=False)
    all_ops = sorted({op for b in blocks for r in b["rows"].values() for op in r.get("kernels", {})}) + ["rest"]
    colours = {op: plt.cm.tab10(i) for i, op in enumerate(all_ops)}
    for i, block in enumerate(blocks):
        rows = {n: r for n, r in block["rows"].items() if "kernels" in r}
        bottom = np.zeros(len(rows))
        for op in all_ops:
            vals = np.array([(r["bytes_sent"] - sum(k["bytes_sent"] for k in r["kernels"].values())) if op == "rest"
                             else r["kernels"].get(op, {}).get("bytes_sent", 0) for r in rows.values()]) / 1e6
            axes[0][i].bar(list(rows), vals, bottom=bottom, label=op, color=colours[op])
            bottom += vals
        axes[0][i].set_title(block["case"], fontsize=8)
        axes[0][i].set_ylabel("MB sent (all parties)")
        axes[0][i].tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "benchmark_kernels.png", dpi=110)
    plt.close(fig)


def _parse_override(text: str) -> tuple:
    """SET:OP=KERNEL as (set, op, kernel), checked against the registry: a kernel other than the set's own."""
    name, _, choice = text.partition(":")
    op, _, kernel = choice.partition("=")
    if not (name and op and kernel):
        raise argparse.ArgumentTypeError(f"{text!r} is not SET:OP=KERNEL")
    try:
        resolved = registry.resolve(name, {op: kernel})
    except ProtocolError as error:  # an unknown set, op or kernel: the registry's message says which
        raise argparse.ArgumentTypeError(str(error)) from None
    if resolved.kernels[op] == registry.protocol_set(name).kernels[op]:
        raise argparse.ArgumentTypeError(f"{text!r}: {kernel!r} is already {name}'s {op} kernel")
    return name, op, kernel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=["kernels", "step", "sample"], default=["kernels", "step", "sample"],
                   help="which rows to measure (default: all)")
    available = available_protocol_sets()
    p.add_argument("--sets", nargs="+", choices=available, default=available, help="protocol sets (default: all)")
    p.add_argument("--models", nargs="+", type=Path,
                   default=[CHECKPOINTS / "mnist-ddpm-silu", CHECKPOINTS / "mnist-ddpm-mish"],
                   help="MNIST model directories for the step rows (default: the two shipped checkpoints)")
    p.add_argument("--sample-model", type=Path, default=CHECKPOINTS / "mnist-ddpm-silu",
                   help="model of the sample rows (default: the shipped SiLU checkpoint)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="MNIST batch sizes for step rows (default: 1 8)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the sample rows (default: 50)")
    p.add_argument("--sample-batch", type=int, default=4, help="samples in the sample rows (default: 4)")
    p.add_argument("--repeat", type=int, default=1, help="runs per step row; the median time is reported (default: 1)")
    p.add_argument("--cifar", action="store_true",
                   help="also the CIFAR-10-scale step row (google/ddpm-cifar10-32's architecture, random weights; "
                        "about an hour per protocol set on 2 cores)")
    p.add_argument("--only-cifar", action="store_true", help="the CIFAR-10-scale step row alone")
    p.add_argument("--only-sd", action="store_true", help="the SD-shaped step row alone")
    p.add_argument("--override", nargs="+", action="extend", default=[], type=_parse_override, metavar="SET:OP=KERNEL",
                   help="also a step row of SET with OP's kernel replaced by KERNEL (a registered kernel or a set's), "
                        "in each case whose step calls OP; e.g. cipherdm:gelu=cipherdm-masked-square")
    p.add_argument("--network", nargs="+", choices=["none", *PRESETS], default=[],
                   help="also run the MNIST SiLU step (batch 1) on a three-process cluster per network: none (direct "
                        "loopback links), relay (the emulator adding nothing), lan, wan; writes benchmark_network.*")
    p.add_argument("--cluster-steps", type=int, default=2, help="DDIM steps per cluster run; per-step means (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: batch 1, SiLU model only, small kernel sizes, 2 sample steps")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="output directory (default: docs/results)")
    args = p.parse_args(argv)
    if BASELINE not in args.sets:
        p.error(f"--sets must include {BASELINE}: every ratio is against it")
    if args.repeat < 1 or args.sample_steps < 1 or not 1 <= args.sample_batch <= 64 or any(b < 1 for b in args.batches):
        p.error("--repeat, --sample-steps, --batches must be positive and --sample-batch in 1..64")
    if args.quick:
        args.models, args.batches, args.sample_steps, args.sample_batch = args.models[:1], [1], 2, 1
    if any(name not in args.sets for name, _, _ in args.override) or (args.override and "step" not in args.rows):
        p.error("--override's sets must be among --sets, and it adds step rows: --rows must include step")
    if args.override and args.network:
        p.error("--override adds one-process step rows; --network runs the protocol sets on the cluster: one or the other")
    if args.only_sd and (args.quick or args.cifar or args.only_cifar or args.network or "step" not in args.rows):
        p.error("--only-sd measures the SD-shaped step alone: with --rows step, without --quick, --cifar, --only-cifar "
                "and --network")
    if args.network and (args.rows != ["step"] or args.cluster_steps < 1):
        p.error("--network runs with --rows step only, and --cluster-steps must be positive")
    command = "python scripts/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = {"command": command.strip(), "cpus": os.cpu_count(), "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
               "cluster_steps": args.cluster_steps}
    if "kernels" in args.rows:
        results["kernels"] = run_kernels(args)
    if "step" in args.rows:
        results["step"] = run_steps(args)
    if "sample" in args.rows:
        results["sample"] = run_samples(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.network:
        results["network"] = run_network(args, results["step"])
        (args.out / "benchmark_network.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "benchmark_network.md").write_text(render_network(results, command.strip(), args.out))
        network_chart(results, args.out)
        print(f"wrote {args.out / 'benchmark_network.md'}")
        return 0
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "benchmark.md").write_text(render(results, command.strip(), args.out))
    charts(results, args.out)
    print(f"wrote {args.out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
