"""Sample-quality metrics for the MNIST models: our digit classifier, FID on its features, PSNR, SSIM.

The classifier (`MnistClassifier`, trained by scripts/train_mnist_classifier.py, shipped in
checkpoints/mnist-classifier) judges generated digits: conditional accuracy (the share classified as
the requested digit), confident share (the share whose top class probability is >= 0.9) and a Frechet
distance between its penultimate-layer features of generated and held-out digits ("FID" here means
this MNIST feature space, not Inception's; values are comparable only with each other).
"""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax.traverse_util import flatten_dict, unflatten_dict

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER_DIR = REPO / "checkpoints" / "mnist-classifier"
CONFIDENCE = 0.9


class MnistClassifier(nn.Module):
    """Two conv layers, one hidden dense layer (the feature layer), ten logits; input (N, 1, 28, 28) in [-1, 1]."""

    features: int = 128

    @nn.compact
    def __call__(self, images, return_features: bool = False):
        x = jnp.asarray(images, jnp.float32).transpose(0, 2, 3, 1)
        x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), (2, 2))
        h = nn.relu(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))
        logits = nn.Dense(10)(h)
        return (logits, h) if return_features else logits


class DigitJudge:
    """A loaded classifier: probabilities and features of digit images, in batches."""

    def __init__(self, params, model: MnistClassifier | None = None):
        self.model = model or MnistClassifier()
        self.params = params
        self._apply = jax.jit(lambda p, x: self.model.apply(p, x, return_features=True))

    @classmethod
    def load(cls, directory=CLASSIFIER_DIR) -> "DigitJudge":
        directory = Path(directory)
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"no classifier weights at {weights} (train one with scripts/train_mnist_classifier.py)")
        flat = safetensors.numpy.load_file(str(weights))
        params = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
        return cls(params)

    def save(self, directory, card: dict) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(self.params).items()}
        safetensors.numpy.save_file(flat, str(directory / "model.safetensors"))
        (directory / "metrics.json").write_text(json.dumps(card, indent=2) + "\n")

    def __call__(self, images, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """(class probabilities (N, 10), penultimate features (N, 128)) for images (N, 1, 28, 28) in [-1, 1]."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != (1, 28, 28):
            raise ValueError(f"digit images must have shape (N, 1, 28, 28), got {images.shape}")
        probs, feats = [], []
        for i in range(0, len(images), batch):
            logits, h = self._apply(self.params, images[i:i + batch])
            probs.append(np.asarray(jax.nn.softmax(logits)))
            feats.append(np.asarray(h))
        return np.concatenate(probs), np.concatenate(feats)


def conditional_accuracy(probs, requested) -> float:
    """Share of samples whose most likely class is the requested digit."""
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(requested)))


def confident_share(probs, threshold: float = CONFIDENCE) -> float:
    """Share of samples the classifier assigns to some class with probability >= threshold."""
    return float(np.mean(np.max(probs, axis=1) >= threshold))


def _sqrtm_psd(m):
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), for symmetric PSD covariances (float64)."""
    mu1, mu2, cov1, cov2 = (np.asarray(a, np.float64) for a in (mu1, mu2, cov1, cov2))
    root1 = _sqrtm_psd(cov1)
    cross = _sqrtm_psd(root1 @ cov2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(cross))


def fid(features_a, features_b) -> float:
    """Frechet distance between two feature sets (rows are samples)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least two samples on each side")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def psnr(a, b, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB (images in [-1, 1] have data_range 2); inf for identical images."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


def _gaussian_filter(x, sigma=1.5, radius=5):
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (-2, -1):  # 'valid' separable filtering along height and width
        x = np.apply_along_axis(lambda r: np.convolve(r, taps, mode="valid"), axis, x)
    return x


def ssim(a, b, data_range: float = 2.0) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03)
    over the last two axes, averaged over everything else."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"SSIM needs two images of the same shape, got {a.shape} and {b.shape}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a**2
    var_b = _gaussian_filter(b * b) - mu_b**2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
