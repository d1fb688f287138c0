"""Loading and saving diffusers-format checkpoints (config.json + diffusion_pytorch_model.safetensors).

Weights are converted in numpy: torch's state-dict names map to the ports' Flax parameter paths
(``down_blocks.0.resnets.1.conv1.weight`` -> down_blocks_0/resnets_1/conv1/kernel), conv kernels
OIHW -> HWIO, linear weights (out, in) -> (in, out). No torch is needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy
from flax.traverse_util import flatten_dict, unflatten_dict

from cipherdm_spu.errors import ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# torch ModuleList / Sequential names whose numeric children the ports name "<list>_<i>"
_LISTS = {"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
          "transformer_blocks", "to_out", "net", "controlnet_down_blocks", "blocks"}
_LIST_ITEM = re.compile(r"^(?P<list>[a-z_]+)_(?P<index>\d+)$")


def _flax_path(torch_key: str) -> tuple[tuple[str, ...], str]:
    parts = torch_key.split(".")
    path: list[str] = []
    for part in parts[:-1]:
        if part.isdigit() and path and path[-1] in _LISTS:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path), parts[-1]


def _torch_key(flax_path: tuple[str, ...]) -> str:
    parts = []
    for part in flax_path[:-1]:
        m = _LIST_ITEM.match(part)
        parts.append(f"{m['list']}.{m['index']}" if m and m["list"] in _LISTS else part)
    leaf = flax_path[-1]
    return ".".join(parts + ["bias" if leaf == "bias" else "weight"])


def _to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    return value


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return value


def expected_params(model, *example_inputs) -> dict:
    """The model's parameter shapes (flat dict path -> ShapeDtypeStruct), without allocating them."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example_inputs))
    return flatten_dict(shapes["params"])


def convert_state_dict(state: dict[str, np.ndarray], expected: dict) -> dict:
    """A diffusers state dict as the port's params; missing, unexpected or misshapen weights fail by name."""
    by_module: dict[tuple, dict[str, tuple]] = {}
    for path, shape in expected.items():
        by_module.setdefault(path[:-1], {})[path[-1]] = shape
    params, unexpected = {}, []
    for key, value in state.items():
        module, torch_leaf = _flax_path(key)
        leaves = by_module.get(module, {})
        leaf = "bias" if torch_leaf == "bias" else next((n for n in ("kernel", "embedding", "scale") if n in leaves), None)
        if torch_leaf not in ("weight", "bias") or leaf not in leaves:
            unexpected.append(key)
            continue
        array = _to_flax(leaf, np.asarray(value, dtype=np.float32))
        want = tuple(leaves[leaf].shape)
        if array.shape != want:
            raise ConfigError(f"weight {key} has shape {value.shape}; the config implies {_to_torch(leaf, np.empty(want)).shape}")
        params[module + (leaf,)] = array
    missing = sorted(_torch_key(p) for p in expected if p not in params)
    if unexpected or missing:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} weight(s), e.g. {missing[:3]}")
        if unexpected:
            detail.append(f"{len(unexpected)} weight(s) the port has no place for, e.g. {sorted(unexpected)[:3]}")
        raise ConfigError("checkpoint does not match its config: " + "; ".join(detail))
    return {"params": unflatten_dict(params)}


def load_checkpoint(directory, config_cls):
    """(config, state dict) from a diffusers model directory, with clear errors for what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise ConfigError(f"model directory {directory} {problem}")
    config = config_cls.from_file(directory / CONFIG_NAME)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ConfigError(f"no {WEIGHTS_NAME} in {directory} (only safetensors weights are read)")
    try:
        state = safetensors.numpy.load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ConfigError(f"cannot read {weights}: {err}") from None
    return config, state


def save_checkpoint(directory, config, params) -> None:
    """Write config.json and diffusion_pytorch_model.safetensors in diffusers' layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        _torch_key(path): np.ascontiguousarray(_to_torch(path[-1], np.asarray(value, dtype=np.float32)))
        for path, value in flatten_dict(params["params"]).items()
    }
    safetensors.numpy.save_file(state, str(directory / WEIGHTS_NAME))
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` / ``init_params`` for a Flax UNet holding a ``config``."""

    CONFIG_CLASS = None

    @classmethod
    def from_config(cls, config):
        """The module for a config object or a diffusers config dict."""
        if not isinstance(config, cls.CONFIG_CLASS):
            config = cls.CONFIG_CLASS.from_dict(dict(config))
        return cls(config)

    @classmethod
    def from_pretrained(cls, directory):
        """(model, params) from a local diffusers directory; nothing is downloaded."""
        config, state = load_checkpoint(directory, cls.CONFIG_CLASS)
        model = cls(config)
        params = convert_state_dict(state, expected_params(model, *model.example_inputs()))
        return model, jax.tree_util.tree_map(jax.numpy.asarray, params)

    def save_pretrained(self, params, directory) -> None:
        save_checkpoint(directory, self.config, params)

    def init_params(self, rng):
        """Randomly initialised params (for training from scratch)."""
        return self.init(rng, *self.example_inputs())
