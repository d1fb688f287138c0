"""Typed configs of the UNet ports, read from a diffusers ``config.json``.

Every field diffusers writes is listed. Fields we do not implement are accepted only at the value
that switches them off, so a checkpoint that needs them fails at load with the field named, never runs
as a different network.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cipherdm_spu.errors import ConfigError


#: bounds on a model's structure: its blocks, and its ResNets and transformer layers (`_Config._check_layers`). A
#: party lists a manifest's tensors by tracing its model (`cipherdm_spu.jobs.SamplingCatalog.model_tensors`), whose
#: time and memory grow with them, so they are refused before the trace; well above the published configs' (SD 1.x
#: and 2.x: 4 blocks, 43 layers).
MAX_BLOCKS = 8
MAX_LAYERS = 128


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _per_block(value, n: int, name: str) -> tuple:
    """An int-or-tuple field as one value per block."""
    if isinstance(value, tuple):
        if len(value) != n:
            raise ConfigError(f"{name} has {len(value)} entries for {n} blocks")
        return value
    return (value,) * n


def sample_shape(config) -> tuple[int, int, int]:
    """(channels, height, width) of one sample a UNet of ``config`` denoises (any config with ``sample_size`` and
    ``in_channels``: diffusers' configs give the size as one side or as (height, width))."""
    size = config.sample_size
    if size is None:
        raise ConfigError("the model config has no sample_size")
    sides = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (list, tuple)) else ()
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise ConfigError(f"sample_size must be a positive side or [height, width], not {size!r}")
    return config.in_channels, *sides


@dataclasses.dataclass(frozen=True)
class _Config:
    CLASS_NAME = ""
    SUPPORTED = {}  # field -> allowed values, for fields with settings the ports do not implement
    PER_BLOCK_FIELDS = ()  # layer counts the port takes one per block (elsewhere one whole number)

    @classmethod
    def from_dict(cls, raw: dict):
        if not isinstance(raw, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(raw).__name__}")
        name = raw.get("_class_name", cls.CLASS_NAME)
        if name != cls.CLASS_NAME:
            raise ConfigError(f"config is for {name}, not {cls.CLASS_NAME}")
        values = {k: _tuples(v) for k, v in raw.items() if not k.startswith("_")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{cls.CLASS_NAME} config field(s) not supported: {', '.join(unknown)}")
        config = cls(**values)
        config.check()
        return config

    @classmethod
    def from_file(cls, path):
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no model config at {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        return {"_class_name": self.CLASS_NAME, **dataclasses.asdict(self)}

    def check(self):
        for name, allowed in self.SUPPORTED.items():
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ConfigError(f"{self.CLASS_NAME}: {name}={bad[0]!r} is not supported (supported: {list(allowed)})")
        n = len(self.block_out_channels)
        # a ControlNet has no up path: its down_block_types alone must match
        if not (len(self.down_block_types) == len(getattr(self, "up_block_types", self.down_block_types)) == n):
            raise ConfigError("down_block_types, up_block_types and block_out_channels must have the same length")
        if not 1 <= n <= MAX_BLOCKS:
            raise ConfigError(f"{self.CLASS_NAME}: {n} blocks; a model has 1 to {MAX_BLOCKS}")
        self._check_layers(n)
        if self.norm_num_groups is None or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}")
        from .activations import get_activation

        try:
            get_activation(self.act_fn)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _check_layers(self, n: int) -> None:
        """Refuse layer counts that are not whole numbers >= 0, and more layers than MAX_LAYERS, counted as the model
        builds them: per block i, a_i ResNets down and a_i + 1 up (a = layers_per_block), each with its attention's
        b_i transformer layers (b = transformer_layers_per_block; 1 where the config has none), and the mid block's
        two ResNets and b_{n-1} transformer layers: sum of (2 a_i + 1)(1 + b_i), plus 2 + b_{n-1} (a ControlNet, which
        has no up path, is counted as if it had one)."""
        per_block = {"layers_per_block": _per_block(self.layers_per_block, n, "layers_per_block")}
        if hasattr(self, "transformer_layers_per_block"):
            per_block["transformer_layers_per_block"] = _per_block(self.transformer_layers_per_block, n,
                                                                   "transformer_layers_per_block")
        for name, values in per_block.items():
            if isinstance(getattr(self, name), tuple) and name not in self.PER_BLOCK_FIELDS:
                raise ConfigError(f"{self.CLASS_NAME}: {name} must be one whole number, not one per block")
            for v in values:
                if isinstance(v, tuple):
                    raise ConfigError(f"nested {name} (per-layer values) is not supported")
                if type(v) is not int or v < 0:
                    raise ConfigError(f"{name} must be whole numbers >= 0, got {v!r}")
        a = per_block["layers_per_block"]
        b = per_block.get("transformer_layers_per_block", (1,) * n)
        count = sum((2 * a_i + 1) * (1 + b_i) for a_i, b_i in zip(a, b)) + 2 + b[-1]
        if count > MAX_LAYERS:
            raise ConfigError(f"{self.CLASS_NAME}: {count} layers (ResNets and transformer layers, down, mid and up), "
                              f"more than {MAX_LAYERS}")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4


@dataclasses.dataclass(frozen=True)
class UNet2DConfig(_Config):
    """diffusers ``UNet2DModel`` config (DDPM/DDIM denoisers, optionally class-conditional)."""

    CLASS_NAME = "UNet2DModel"
    SUPPORTED = {
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
        "mid_block_type": ("UNetMidBlock2D", None),
        "time_embedding_type": ("positional",),
        "downsample_type": ("conv",),
        "upsample_type": ("conv",),
        "resnet_time_scale_shift": ("default", "scale_shift"),
        "class_embed_type": (None,),
    }

    sample_size: int | tuple | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int | None = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None


class _CrossAttentionBlocks:
    """Mixin: the per-block fields of the cross-attention UNets (the SD UNet and its ControlNet)."""

    def per_block(self, name: str) -> tuple:
        """An int-or-tuple field (layers_per_block, heads, ...) as one value per down block."""
        value = getattr(self, name)
        if name == "num_attention_heads" and value is None:  # diffusers' naming quirk: heads = attention_head_dim
            value = self.attention_head_dim
        return _per_block(value, len(self.block_out_channels), name)

    def check_blocks(self):
        for name in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim", "num_attention_heads"):
            values = self.per_block(name)
            if any(isinstance(v, tuple) for v in values):
                raise ConfigError(f"nested {name} (per-layer values) is not supported")
        if len(set(self.per_block("cross_attention_dim"))) != 1:
            raise ConfigError("per-block cross_attention_dim values must all be equal (one encoder_hidden_states)")


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(_CrossAttentionBlocks, _Config):
    """diffusers ``UNet2DConditionModel`` config (Stable Diffusion 1.x/2.x denoisers)."""

    CLASS_NAME = "UNet2DConditionModel"
    PER_BLOCK_FIELDS = ("layers_per_block", "transformer_layers_per_block")
    SUPPORTED = {
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
        "only_cross_attention": (False,),
        "reverse_transformer_layers_per_block": (None,),
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "dual_cross_attention": (False,),
        "class_embed_type": (None,),
        "addition_embed_type": (None,),
        "addition_time_embed_dim": (None,),
        "num_class_embeds": (None,),
        "resnet_time_scale_shift": ("default", "scale_shift"),
        "resnet_out_scale_factor": (1.0,),
        "time_embedding_type": ("positional",),
        "time_embedding_act_fn": (None,),
        "timestep_post_act": (None,),
        "time_cond_proj_dim": (None,),
        "projection_class_embeddings_input_dim": (None,),
        "attention_type": ("default",),
        "class_embeddings_concat": (False,),
        "mid_block_only_cross_attention": (None, False),
        "cross_attention_norm": (None,),
    }

    sample_size: int | tuple | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 1280
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple = 8
    num_attention_heads: int | tuple | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    def check(self):
        super().check()
        self.check_blocks()
        for k in (self.conv_in_kernel, self.conv_out_kernel):
            if k % 2 == 0:
                raise ConfigError("conv_in_kernel and conv_out_kernel must be odd")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(_CrossAttentionBlocks, _Config):
    """diffusers ``ControlNetModel`` config (the SD 1.x/2.x ControlNets): the UNet's encoder, no up path."""

    CLASS_NAME = "ControlNetModel"
    PER_BLOCK_FIELDS = ("transformer_layers_per_block",)
    SUPPORTED = {
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "only_cross_attention": (False,),
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "class_embed_type": (None,),
        "addition_embed_type": (None,),
        "addition_time_embed_dim": (None,),
        "num_class_embeds": (None,),
        "projection_class_embeddings_input_dim": (None,),
        "resnet_time_scale_shift": ("default", "scale_shift"),
        "controlnet_conditioning_channel_order": ("rgb", "bgr"),
        "global_pool_conditions": (False,),
    }

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple = 8
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64
    time_embedding_dim = None  # diffusers' ControlNet always uses 4 x block_out_channels[0]

    def check(self):
        super().check()
        self.check_blocks()
        if not 1 <= len(self.conditioning_embedding_out_channels) <= MAX_BLOCKS:
            raise ConfigError(f"conditioning_embedding_out_channels must list 1 to {MAX_BLOCKS} channel counts")
