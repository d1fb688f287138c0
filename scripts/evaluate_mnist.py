#!/usr/bin/env python
"""Plaintext sample quality of the shipped MNIST models: docs/results/mnist_quality.{md,json} and sample grids.

For each checkpoint and sampler (DDPM 1000 steps; DDIM 100/50/20/10 steps, eta 0) it draws samples with
labels cycling 0..9 from seeded noise, and reports, with the shipped classifier (cipherdm_spu.quality):
FID against the 1,000 held-out digits (on the classifier's features), conditional accuracy and the
confident share. DDPM-1000 is 1000 network evaluations per sample, so it gets fewer samples by default.

    python scripts/evaluate_mnist.py
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm


from cipherdm_spu import quality
from cipherdm_spu.mnist import load_digits, steps_before
from cipherdm_spu.sampling import draw_noise, sample_plaintext
from cipherdm_spu.sampling_cli import image_grid
from cipherdm_spu.models import DDIMSampler, DDPMSampler, ScheduleConfig, UNet2DModel
from cipherdm_spu.results import markdown_table

REPO = Path(__file__).resolve().parents[1]
RUNS = [("DDPM", 1000), ("DDIM", 100), ("DDIM", 50), ("DDIM", 20), ("DDIM", 10)]
TARGET_DDIM50_ACCURACY = 0.9  # the bar the shipped models are meant to reach (issue 5)


def trained_steps(model_dir: Path) -> int:
    """Optimizer steps behind a checkpoint (its own and those of the weights it started from), from its training log."""
    log = json.loads((model_dir / "train_log.json").read_text())
    return (log["losses"][-1][0] if log["losses"] else 0) + steps_before(log.get("init"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", type=Path,
                   default=[REPO / "checkpoints" / "mnist-ddpm-silu", REPO / "checkpoints" / "mnist-ddpm-mish"],
                   help="model directories (default: the two shipped checkpoints)")
    p.add_argument("--samples", type=int, default=200, help="samples per DDIM row (default: 200)")
    p.add_argument("--ddpm-samples", type=int, default=100, help="samples for the DDPM-1000 rows (default: 100)")
    p.add_argument("--batch", type=int, default=100, help="samples per forward pass (default: 100)")
    p.add_argument("--samplers", nargs="+", choices=[f"{k}-{n}" for k, n in RUNS], default=[f"{k}-{n}" for k, n in RUNS],
                   help="rows to draw (default: all; e.g. --samplers DDIM-50 to judge a training run quickly)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results", help="output directory (default: docs/results)")
    args = p.parse_args(argv)
    judge = quality.DigitJudge.load()
    heldout, _ = load_digits("heldout")
    _, heldout_features = judge(heldout)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for model_dir in args.models:
        model, params = UNet2DModel.from_pretrained(model_dir)
        trained = trained_steps(model_dir)
        schedule = ScheduleConfig.from_file(model_dir)
        for kind, steps in [r for r in RUNS if f"{r[0]}-{r[1]}" in args.samplers]:
            sampler = DDPMSampler(schedule, steps) if kind == "DDPM" else DDIMSampler(schedule, steps)
            n = args.ddpm_samples if kind == "DDPM" else args.samples
            labels = np.arange(n) % 10
            started = time.time()
            images = []
            for start in tqdm(range(0, n, args.batch), desc=f"{model_dir.name} {kind}-{steps}"):
                chunk = labels[start:start + args.batch]
                x_t, noise = draw_noise(args.seed * 100_003 + start, sampler, (len(chunk), 1, 28, 28))
                images.append(sample_plaintext(model, params, sampler, x_t, chunk, noise))
            images = np.concatenate(images)
            probs, features = judge(images)
            rows.append({
                "model": model_dir.name, "act_fn": model.config.act_fn, "trained_steps": trained, "sampler": kind, "steps": steps, "samples": n,
                "fid": quality.fid(features, heldout_features),
                "conditional_accuracy": quality.conditional_accuracy(probs, labels),
                "confident_share": quality.confident_share(probs),
                "seconds": round(time.time() - started, 1),
            })
            print(rows[-1], file=sys.stderr)
            if kind == "DDIM" and steps == 50:
                image_grid(images[:40], columns=10, scale=3).save(args.out / f"mnist_ddim50_{model.config.act_fn}.png")
    command = "python scripts/evaluate_mnist.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    reference = quality.fid(heldout_features[::2], heldout_features[1::2])
    (args.out / "mnist_quality.json").write_text(json.dumps({"command": command.strip(), "rows": rows,
                                                             "heldout_split_half_fid": reference}, indent=2) + "\n")
    lines = [
        "# Plaintext sample quality of the shipped MNIST models", "",
        f"Command: `{command.strip()}` (seeded; CPU). Labels cycle 0..9. Metrics from the shipped classifier "
        "(checkpoints/mnist-classifier, 98.4 % held-out accuracy): FID between its 128-d penultimate features of "
        "the samples and of the 1,000 held-out digits (an MNIST-feature FID, not Inception's: compare rows "
        "with each other); conditional accuracy = share classified as the requested digit; confident share = "
        f"share with top-class probability >= {quality.CONFIDENCE}.",
        "", f"For scale: FID between the two halves of the held-out set is {reference:.2f} (a floor; "
        "it shrinks as sets grow, and FID on 100-200 samples is biased upwards).", "",
    ]
    lines += markdown_table(
        ["model", "trained steps", "sampler", "steps", "samples", "FID", "conditional accuracy", "confident share", "seconds"],
        [[r["model"], r["trained_steps"], r["sampler"], r["steps"], r["samples"], f"{r['fid']:.2f}",
          f"{100 * r['conditional_accuracy']:.1f} %", f"{100 * r['confident_share']:.1f} %", f"{r['seconds']:.0f}"]
         for r in rows], align="lrl")
    short = [r["model"] for r in rows if r["sampler"] == "DDIM" and r["steps"] == 50
             and r["conditional_accuracy"] < TARGET_DDIM50_ACCURACY]
    if short:
        lines += ["", f"Below the {100 * TARGET_DDIM50_ACCURACY:.0f} % DDIM-50 conditional accuracy these models are meant "
                  f"to reach: {', '.join(short)}. They are under-trained (trained steps above; see their model cards): "
                  "many samples are malformed or drawn as another digit."]
    if "DDIM-50" in args.samplers:
        lines += ["", "DDIM-50 samples (rows: labels 0..9 repeated):", ""]
        lines += [f"![{m.name}](mnist_ddim50_{UNet2DModel.from_pretrained(m)[0].config.act_fn}.png)" for m in args.models]
    (args.out / "mnist_quality.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
