"""Flax port of diffusers' ``ControlNetModel``, and a UNet steered by one (`ControlledUNet`), NCHW in and out.

A ControlNet is a copy of the SD UNet's encoder (conv_in, down blocks, mid block) whose input is
``conv_in(latent) + E(control image)``, E a small strided conv stack that brings the image to latent
resolution. Every down skip and the mid output pass through a zero-initialised 1x1 conv and are scaled:

    down_i = s_i * zero_conv_i(skip_i),  mid = s_mid * zero_conv_mid(h_mid)

with s_i = conditioning_scale, or in guess mode s_i = conditioning_scale * 10 ** (i / K - 1), i = 0..K
(diffusers' logspace(-1, 0, K + 1); the mid output takes the last). The UNet adds down_i to its i-th skip
and mid to its mid block's output. The time path (time MLP, the ResNets' time projections) depends only on
the public timestep and the owner's weights, so, as for the UNet, ``time_terms`` computes it in plaintext.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .activations import get_activation
from .config import ConfigError, ControlNetConfig, UNet2DConditionConfig
from .embeddings import TimestepEmbedding, one_timestep, timestep_embedding
from .pretrained import PretrainedMixin
from .resnet import conv
from .unet_2d_condition import UNet2DConditionModel, conditioned_time_terms
from .unet_blocks import AttentionSpec, DownBlock, MidBlock, ResnetSpec


class ControlNetConditioningEmbedding(nn.Module):
    """conv_in, then per level a 3x3 conv and a stride-2 3x3 conv, SiLU after each, then conv_out (zero-initialised
    in training): the control image at latent resolution, ``out_channels`` deep."""

    out_channels: int
    block_out_channels: tuple

    def setup(self):
        channels = self.block_out_channels
        self.conv_in = conv(channels[0])
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [conv(c_in), conv(c_out, stride=2)]
        self.blocks = blocks
        self.conv_out = conv(self.out_channels)

    def __call__(self, x):
        silu = get_activation("silu")  # diffusers hard-codes SiLU here, whatever act_fn says
        x = silu(self.conv_in(x))
        for block in self.blocks:
            x = silu(block(x))
        return self.conv_out(x)


def guess_mode_scales(count: int) -> np.ndarray:
    """diffusers' guess-mode weights 10 ** linspace(-1, 0, count) (float32, as torch.logspace): 0.1 for the
    shallowest residual up to 1 for the mid block's."""
    return np.logspace(-1, 0, count).astype(np.float32)


class ControlNetModel(PretrainedMixin, nn.Module):
    """diffusers ControlNetModel: ``model, params = ControlNetModel.from_pretrained(directory)``."""

    config: ControlNetConfig
    CONFIG_CLASS = ControlNetConfig

    def setup(self):
        c = self.config
        channels, n = c.block_out_channels, len(c.block_out_channels)
        heads, depth = c.per_block("num_attention_heads"), c.per_block("transformer_layers_per_block")
        self.conv_in = conv(channels[0])
        self.time_embedding = TimestepEmbedding(c.time_embed_dim, c.act_fn)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(channels[0], c.conditioning_embedding_out_channels)
        resnet = ResnetSpec(c.norm_num_groups, c.norm_eps, c.act_fn, c.resnet_time_scale_shift == "scale_shift")

        def cross(i):
            return AttentionSpec("cross", heads=heads[i], norm_groups=c.norm_num_groups, layers=depth[i],
                                 linear_projection=c.use_linear_projection)

        self.down_blocks = [
            DownBlock(channels[i], c.layers_per_block, resnet, cross(i) if kind == "CrossAttnDownBlock2D" else None,
                      add_downsample=i < n - 1, downsample_padding=c.downsample_padding)
            for i, kind in enumerate(c.down_block_types)
        ]
        self.controlnet_down_blocks = [conv(ch, kernel=1) for ch in self.residual_channels()]
        self.mid_block = MidBlock(channels[-1], resnet, cross(n - 1), output_scale_factor=c.mid_block_scale_factor)
        self.controlnet_mid_block = conv(channels[-1], kernel=1)

    def residual_channels(self) -> list:
        """Channels of the down residuals, in the UNet's skip order: conv_in's, then per block one per layer and
        one after its downsampler (all but the last block)."""
        c = self.config
        out = [c.block_out_channels[0]]
        for i, ch in enumerate(c.block_out_channels):
            out += [ch] * (c.layers_per_block + (i < len(c.block_out_channels) - 1))
        return out

    @property
    def image_factor(self) -> int:
        """Control-image pixels per latent cell: the conditioning embedding's stride-2 convs."""
        return 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)

    def example_inputs(self):
        c = self.config
        size = 2 ** (len(c.block_out_channels) - 1)
        sample = jnp.zeros((1, c.in_channels, size, size), jnp.float32)
        image = jnp.zeros((1, c.conditioning_channels, size * self.image_factor, size * self.image_factor), jnp.float32)
        return sample, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, c.cross_attention_dim), jnp.float32), image

    def _embed(self, timesteps):
        c = self.config
        return self.time_embedding(timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift))

    def _time_terms_from_embedding(self, emb):
        return {"down": [block.time_terms(emb) for block in self.down_blocks], "mid": self.mid_block.time_terms(emb)}

    def time_terms(self, timestep):
        """The owner's plaintext tables for one public timestep: per ResNet, (1, channels)."""
        return self._time_terms_from_embedding(self._embed(one_timestep(timestep)))

    def check_control_image(self, sample_shape, image_shape):
        """Refuse a control image the network cannot take: (N, conditioning_channels, factor*H, factor*W)."""
        c, f = self.config, self.image_factor
        n, _, h, w = sample_shape
        want = (n, c.conditioning_channels, h * f, w * f)
        if tuple(image_shape) != want:
            raise ValueError(f"controlnet_cond must have shape {want} for a latent of shape {tuple(sample_shape)}, "
                             f"got {tuple(image_shape)}")

    def __call__(self, sample, timestep=None, encoder_hidden_states=None, controlnet_cond=None,
                 conditioning_scale: float = 1.0, guess_mode: bool = False, time_terms=None):
        """(down residuals, mid residual), NCHW, as diffusers' ControlNetModel returns them."""
        c = self.config
        terms = conditioned_time_terms(self, sample, encoder_hidden_states, c.cross_attention_dim, timestep, time_terms)
        if controlnet_cond is None:
            raise ValueError("pass controlnet_cond, the control image")
        self.check_control_image(sample.shape, controlnet_cond.shape)
        image = controlnet_cond.transpose(0, 2, 3, 1)
        if c.controlnet_conditioning_channel_order == "bgr":
            image = image[..., ::-1]
        x = self.conv_in(sample.transpose(0, 2, 3, 1)) + self.controlnet_cond_embedding(image)
        skips = [x]
        for block, t in zip(self.down_blocks, terms["down"]):
            x, block_skips = block(x, t, encoder_hidden_states)
            skips += block_skips
        x = self.mid_block(x, terms["mid"], encoder_hidden_states)
        down = [zero_conv(skip) for zero_conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        scales = (guess_mode_scales(len(down) + 1) * conditioning_scale if guess_mode
                  else np.full(len(down) + 1, conditioning_scale, np.float32))
        down = [(r * float(s)).transpose(0, 3, 1, 2) for r, s in zip(down, scales)]
        return down, (mid * float(scales[-1])).transpose(0, 3, 1, 2)


def check_fits(unet: UNet2DConditionConfig, controlnet: ControlNetConfig) -> None:
    """Refuse a ControlNet whose residuals cannot be added to this UNet's skips, naming the field that differs."""
    pairs = {
        "in_channels": (unet.in_channels, controlnet.in_channels),
        "block_out_channels": (unet.block_out_channels, controlnet.block_out_channels),
        "layers_per_block": (unet.per_block("layers_per_block"), controlnet.per_block("layers_per_block")),
        "cross_attention_dim": (unet.per_block("cross_attention_dim")[0], controlnet.cross_attention_dim),
    }
    for name, (want, got) in pairs.items():
        if want != got:
            raise ConfigError(f"the ControlNet does not fit the UNet: its {name} is {got}, the UNet's {want}")


@dataclasses.dataclass(frozen=True)
class ControlledUNetConfig:
    """A UNet's and its ControlNet's configs, as one model's (a cluster's manifest carries it); the fields a UNet
    config is read for (sample size, channels, cross-attention width) are the UNet's."""

    CLASS_NAME = "ControlledUNet"

    unet: UNet2DConditionConfig
    controlnet: ControlNetConfig

    def __post_init__(self):
        check_fits(self.unet, self.controlnet)

    @classmethod
    def from_dict(cls, raw: dict):
        if not isinstance(raw, dict) or set(raw) - {"_class_name", "unet", "controlnet"} or raw.get(
                "_class_name", cls.CLASS_NAME) != cls.CLASS_NAME:
            raise ConfigError(f"a {cls.CLASS_NAME} config is an object with the fields unet and controlnet")
        return cls(UNet2DConditionConfig.from_dict(raw.get("unet")), ControlNetConfig.from_dict(raw.get("controlnet")))

    def to_dict(self) -> dict:
        return {"_class_name": self.CLASS_NAME, "unet": self.unet.to_dict(), "controlnet": self.controlnet.to_dict()}

    sample_size = property(lambda self: self.unet.sample_size)
    in_channels = property(lambda self: self.unet.in_channels)
    block_out_channels = property(lambda self: self.unet.block_out_channels)
    cross_attention_dim = property(lambda self: self.unet.cross_attention_dim)


class ControlledUNet(nn.Module):
    """A UNet2DConditionModel steered by a ControlNetModel, as one step of diffusers'
    StableDiffusionControlNetPipeline. Params: ``{"params": {"unet": ..., "controlnet": ...}}`` (`combine`).

    ``guided=True``: the batch is [unconditional; conditional] (classifier-free guidance, 2N) and the control
    image has N rows. Outside guess mode the ControlNet sees the whole batch (the image twice); in guess mode
    only the conditional half, and the unconditional half gets no residuals (diffusers' zeros).
    ``conditioning_scale`` and ``guess_mode`` are public constants of the step, like the guidance scale.
    """

    config: ControlledUNetConfig
    conditioning_scale: float = 1.0
    guess_mode: bool = False

    def setup(self):
        self.unet = UNet2DConditionModel(self.config.unet)
        self.controlnet = ControlNetModel(self.config.controlnet)

    @classmethod
    def from_config(cls, config):
        """The module for a config object or its dict (``{"unet": ..., "controlnet": ...}``)."""
        return cls(config if isinstance(config, ControlledUNetConfig) else ControlledUNetConfig.from_dict(dict(config)))

    @classmethod
    def combine(cls, unet, unet_params, controlnet, controlnet_params, conditioning_scale: float = 1.0,
                guess_mode: bool = False):
        """(model, params) from the two loaded ports; a ControlNet that does not fit fails here, by field."""
        model = cls(ControlledUNetConfig(unet.config, controlnet.config), float(conditioning_scale), bool(guess_mode))
        return model, {"params": {"unet": unet_params["params"], "controlnet": controlnet_params["params"]}}

    def control_image_shape(self, batch: int, height: int, width: int) -> tuple:
        """The control image's shape for a latent of ``height`` x ``width``."""
        c = self.config.controlnet
        factor = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
        return batch, c.conditioning_channels, height * factor, width * factor

    def example_inputs(self):
        sample, t, context = UNet2DConditionModel(self.config.unet, parent=None).example_inputs()
        return sample, t, context, jnp.zeros(self.control_image_shape(1, *sample.shape[2:]), jnp.float32)

    def time_terms(self, timestep):
        """Both networks' plaintext time terms for one public timestep (the owner's)."""
        return {"unet": self.unet.time_terms(timestep), "controlnet": self.controlnet.time_terms(timestep)}

    def __call__(self, sample, timestep=None, encoder_hidden_states=None, controlnet_cond=None, time_terms=None,
                 guided: bool = False):
        if controlnet_cond is None:
            raise ValueError("pass controlnet_cond, the control image")
        n = controlnet_cond.shape[0] * (2 if guided else 1)
        if sample.shape[0] != n:
            raise ValueError(f"{controlnet_cond.shape[0]} control image(s) for a batch of {sample.shape[0]}"
                             + (" (guided: [unconditional; conditional])" if guided else ""))
        terms = time_terms or {"unet": None, "controlnet": None}
        half = guided and self.guess_mode
        x, context, image = sample, encoder_hidden_states, controlnet_cond
        if half:
            x, context = sample[n // 2:], encoder_hidden_states[n // 2:]
        elif guided:
            image = jnp.concatenate([controlnet_cond, controlnet_cond], axis=0)
        down, mid = self.controlnet(x, timestep, context, image, self.conditioning_scale, self.guess_mode,
                                    time_terms=terms["controlnet"])
        if half:
            down = [jnp.concatenate([jnp.zeros_like(r), r], axis=0) for r in down]
            mid = jnp.concatenate([jnp.zeros_like(mid), mid], axis=0)
        return self.unet(sample, timestep, encoder_hidden_states, time_terms=terms["unet"],
                         down_block_additional_residuals=down, mid_block_additional_residual=mid)
