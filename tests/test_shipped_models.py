"""The shipped MNIST checkpoints: they load in our port and in diffusers, agree, and sample securely."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel as TorchUNet2DModel

from cipherdm_spu import SecureSession, quality
from cipherdm_spu.sampling import SecureDiffusion, draw_noise, sample_plaintext
from cipherdm_spu.models import ScheduleConfig, UNet2DModel
from cipherdm_spu.models.schedulers import make_sampler
from cipherdm_spu.sampling_cli import DEFAULT_STEPS, MAIN_SAMPLER

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.mark.parametrize("act_fn", ["silu", "mish"])
def test_checkpoint_loads_in_both_and_agrees(act_fn):
    directory = CHECKPOINTS / f"mnist-ddpm-{act_fn}"
    model, params = UNet2DModel.from_pretrained(directory)
    assert model.config.act_fn == act_fn and model.config.num_class_embeds == 10
    assert (directory / "README.md").is_file() and (directory / "scheduler_config.json").is_file()
    reference = TorchUNet2DModel.from_pretrained(directory).eval()
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    labels = np.array([3, 8])
    with torch.no_grad():
        want = reference(torch.from_numpy(x), 420, class_labels=torch.from_numpy(labels)).sample.numpy()
    got = np.asarray(model.apply(params, jnp.asarray(x), 420, class_labels=jnp.asarray(labels)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def secure_and_plain():
    """protocol `cipherdm`, the run_ddim default sampler and steps, fixed noise: secure and plaintext samples."""
    directory = CHECKPOINTS / "mnist-ddpm-silu"
    model, params = UNet2DModel.from_pretrained(directory)
    config = json.loads((directory / "scheduler_config.json").read_text())
    sampler = make_sampler(MAIN_SAMPLER, ScheduleConfig.from_dict(config), DEFAULT_STEPS[MAIN_SAMPLER], options=config)
    labels = [1, 4, 7]  # the run_ddim defaults
    x_t, _ = draw_noise(0, sampler, (3, 1, 28, 28))
    plain = sample_plaintext(model, params, sampler, x_t, labels)
    with SecureSession("cipherdm") as session:
        diffusion = SecureDiffusion(session, model, params, sampler)
        secure, _, _ = diffusion.sample(x_t, labels)
    judge = quality.DigitJudge.load()
    return labels, secure, plain, judge(secure)[0], judge(plain)[0]


@pytest.mark.slow
def test_secure_samples_match_plaintext(secure_and_plain):
    """Same noise, same result: close in PSNR/SSIM, and the same label wherever the classifier is sure."""
    _, secure, plain, secure_probs, plain_probs = secure_and_plain
    assert quality.psnr(secure, plain) > 25 and quality.ssim(secure, plain) > 0.85
    sure = plain_probs.max(1) >= quality.CONFIDENCE
    assert sure.any()  # with this seed the classifier is sure of at least one plaintext sample
    assert (secure_probs.argmax(1)[sure] == plain_probs.argmax(1)[sure]).all()


@pytest.mark.slow
def test_secure_samples_are_the_requested_digits(secure_and_plain):
    """The run_ddim defaults draw what was asked for, securely as in plaintext, with the classifier sure."""
    labels, _, _, secure_probs, plain_probs = secure_and_plain
    assert plain_probs.argmax(1).tolist() == labels
    assert secure_probs.argmax(1).tolist() == labels
    assert (secure_probs.max(1) >= quality.CONFIDENCE).all()
