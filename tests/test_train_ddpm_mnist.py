"""The training script: resumable, deterministic with a seed, writes a diffusers-format model and card."""


import jax
import numpy as np
import pytest
import safetensors.numpy
from jax.experimental.compilation_cache import compilation_cache

from .scripts import load_script

evaluate_mnist = load_script("evaluate_mnist")
train_ddpm_mnist = load_script("train_ddpm_mnist")


@pytest.fixture(scope="module", autouse=True)
def jax_compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this module's runs only (reset after): each run of the script jits its
    training step anew, and runs with the same batch, steps and learning rate compile the same program, which the
    cache then compiles once."""
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-compile-cache")))
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
    common = ["--batch", "2", "--checkpoint-every", "1", "--seed", "3"]
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


@pytest.mark.slow
def test_init_from_starts_at_the_given_weights_and_refuses_another_architecture(tmp_path):
    common = ["--batch", "2", "--seed", "1"]
    assert train_ddpm_mnist.main(["--out", str(tmp_path / "a"), "--steps", "1", *common]) == 0
    # A zero learning rate leaves the weights where they started: the export must equal the init's weights.
    assert train_ddpm_mnist.main(["--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "a"),
                                  "--steps", "1", "--lr", "0", *common]) == 0
    a = safetensors.numpy.load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    b = safetensors.numpy.load_file(str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-7, err_msg=key)  # EMA arithmetic rounds
    card = (tmp_path / "b" / "README.md").read_text()
    assert f"Initialised from the weights then in `{tmp_path / 'a'}`" in card and "trained 1 steps" in card
    # A second generation keeps the whole history on its card and in its step count.
    assert train_ddpm_mnist.main(["--out", str(tmp_path / "d"), "--init-from", str(tmp_path / "b"),
                                  "--steps", "1", *common]) == 0
    card = (tmp_path / "d" / "README.md").read_text()
    assert f"Those weights were in turn initialised from the weights then in `{tmp_path / 'a'}`" in card
    assert "(3 in all, with the 2 behind the initial weights)" in card and "CPU cores available to it: " in card
    assert evaluate_mnist.trained_steps(tmp_path / "d") == 3

    assert train_ddpm_mnist.main(["--out", str(tmp_path / "c"), "--act-fn", "mish",
                                  "--init-from", str(tmp_path / "a"), *common]) == 2
    assert train_ddpm_mnist.main(["--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "missing"), *common]) == 2
    assert not (tmp_path / "c").exists()
