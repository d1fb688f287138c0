"""The training script: resumable, deterministic with a seed, writes a diffusers-format model and card."""

import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import train_ddpm_mnist  # noqa: E402


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
    common = ["--batch", "4", "--checkpoint-every", "1", "--seed", "3"]
    assert train_ddpm_mnist.main(["--out", str(tmp_path / "a"), "--steps", "2", *common]) == 0
    assert train_ddpm_mnist.main(["--out", str(tmp_path / "b"), "--steps", "1", *common]) == 0
    assert train_ddpm_mnist.main(["--out", str(tmp_path / "b"), "--steps", "2", *common]) == 0
    a = safetensors.numpy.load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    b = safetensors.numpy.load_file(str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    card = (tmp_path / "b" / "README.md").read_text()
    assert "from step 0: `python scripts/train_ddpm_mnist.py --out" in card and "from step 1" in card
    assert "steps trained: 2 of 2" in card

    from diffusers import UNet2DModel

    assert UNet2DModel.from_pretrained(tmp_path / "b").config.num_class_embeds == 10
