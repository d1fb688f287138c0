#!/usr/bin/env python
"""Train the MNIST digit classifier that judges generated samples (cipherdm_spu.quality).

Trained on the 4,000 training digits of `cipherdm_spu.mnist` with random shifts of up to 2 pixels,
evaluated on the 1,000 held-out digits; writes model.safetensors and metrics.json (held-out accuracy,
command, seed) to --out.

    python scripts/train_mnist_classifier.py --out checkpoints/mnist-classifier
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from tqdm import tqdm


from cipherdm_spu.mnist import load_digits
from cipherdm_spu.quality import CLASSIFIER_DIR, DigitJudge, MnistClassifier


def shift(images, rng, max_shift=2):
    """Random translations by up to max_shift pixels (zero-padded with the background value -1)."""
    n = len(images)
    padded = np.pad(images, ((0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)), constant_values=-1.0)
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
    return np.stack([padded[i, :, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28] for i in range(n)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=CLASSIFIER_DIR, help=f"output directory (default: {CLASSIFIER_DIR})")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    args = p.parse_args(argv)
    started = time.time()
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("heldout")
    model = MnistClassifier()
    params = model.init(jax.random.PRNGKey(args.seed), x_train[:1])
    steps = args.epochs * (len(y_train) // 64)
    optimizer = optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=1e-4)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    for _ in tqdm(range(args.epochs), desc="classifier"):
        order = rng.permutation(len(y_train))
        for i in range(0, len(order) - 63, 64):
            idx = order[i:i + 64]
            params, opt_state, _ = train_step(params, opt_state, shift(x_train[idx], rng), y_train[idx])
    judge = DigitJudge(params, model)
    probs, _ = judge(x_test)
    accuracy = float(np.mean(probs.argmax(1) == y_test))
    card = {
        "heldout_accuracy": accuracy,
        "heldout_digits": int(len(y_test)),
        "command": " ".join(["python scripts/train_mnist_classifier.py", shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
        "seed": args.seed,
        "epochs": args.epochs,
        "training_seconds": round(time.time() - started, 1),
    }
    judge.save(args.out, card)
    print(f"held-out accuracy {accuracy:.4f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
