"""Flax ports of the diffusers UNets, the ControlNet, and the samplers.

Every nonlinear call goes through `cipherdm_spu.ops`, so the protocol set in force decides the kernels.
"""

from .config import ConfigError, ControlNetConfig, UNet2DConditionConfig, UNet2DConfig, sample_shape
from .controlnet import ControlledUNet, ControlledUNetConfig, ControlNetModel
from .guidance import guided_prediction
from .schedulers import DDIMSampler, DDPMSampler, ScheduleConfig
from .unet_2d import UNet2DModel
from .unet_2d_condition import UNet2DConditionModel

__all__ = [
    "ConfigError", "ControlledUNet", "ControlledUNetConfig", "ControlNetConfig", "ControlNetModel", "DDIMSampler",
    "DDPMSampler", "ScheduleConfig", "UNet2DConditionConfig", "UNet2DConditionModel", "UNet2DConfig", "UNet2DModel",
    "guided_prediction", "sample_shape",
]
