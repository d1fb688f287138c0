"""Loading diffusers checkpoints: unsupported configs and broken directories fail clearly, by name."""

import json

import numpy as np
import pytest
import safetensors.numpy
from diffusers import UNet2DModel as TorchUNet2DModel

from cipherdm_spu.models import ConfigError, UNet2DConditionModel, UNet2DModel
from cipherdm_spu.models.pretrained import WEIGHTS_NAME

from .diffusers_models import save_random

SMALL = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
             down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


@pytest.fixture
def checkpoint(tmp_path):
    save_random(TorchUNet2DModel, SMALL, tmp_path)
    return tmp_path


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_directory_and_files(tmp_path, checkpoint):
    with pytest.raises(ConfigError, match="does not exist"):
        UNet2DModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no model config"):
        UNet2DModel.from_pretrained(tmp_path / "..")
    (checkpoint / WEIGHTS_NAME).unlink()
    with pytest.raises(ConfigError, match="safetensors"):
        UNet2DModel.from_pretrained(checkpoint)


def test_malformed_config(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        UNet2DModel.from_pretrained(checkpoint)


def test_wrong_class(checkpoint):
    with pytest.raises(ConfigError, match="not UNet2DConditionModel"):
        UNet2DConditionModel.from_pretrained(checkpoint)


@pytest.mark.parametrize("field, value", [
    ("down_block_types", ["SkipDownBlock2D", "DownBlock2D"]),
    ("time_embedding_type", "fourier"),
    ("act_fn", "tanh"),
    ("class_embed_type", "timestep"),
    ("some_future_option", 1),
])
def test_unsupported_options_are_named(checkpoint, field, value):
    _edit_config(checkpoint, **{field: value})
    with pytest.raises(ConfigError, match=field if field != "act_fn" else "tanh"):
        UNet2DModel.from_pretrained(checkpoint)


def test_weights_that_do_not_fit_the_config(checkpoint):
    state = safetensors.numpy.load_file(str(checkpoint / WEIGHTS_NAME))
    state["conv_in.weight"] = np.zeros((8, 1, 5, 5), np.float32)
    safetensors.numpy.save_file(state, str(checkpoint / WEIGHTS_NAME))
    with pytest.raises(ConfigError, match="conv_in.weight"):
        UNet2DModel.from_pretrained(checkpoint)
    del state["conv_in.weight"]
    state["extra.weight"] = np.zeros((1,), np.float32)
    safetensors.numpy.save_file(state, str(checkpoint / WEIGHTS_NAME))
    with pytest.raises(ConfigError, match="missing 1 weight.*conv_in.weight.*extra.weight"):
        UNet2DModel.from_pretrained(checkpoint)
