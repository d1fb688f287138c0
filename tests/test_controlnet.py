"""ControlNetModel port and the UNet's additional residuals: parity with diffusers (float32, 1e-4) on small
random configs and on the SD v1.5 ControlNet configuration at a small latent; what is refused, by name."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNetModel
from diffusers import UNet2DConditionModel as TorchUNet2DConditionModel

from cipherdm_spu.models import ConfigError, ControlledUNet, ControlNetModel, UNet2DConditionModel

from .diffusers_models import save_random

CONFIGS = {
    "SD-1.x shape: conv projections, heads from attention_head_dim": dict(
        in_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=24, attention_head_dim=4,
        norm_num_groups=8, conditioning_embedding_out_channels=(8, 16)),
    "SD-2.x shape: linear projections, 2 transformer layers, scale-shift, bgr, 3 levels": dict(
        in_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=16,
        attention_head_dim=(2, 4, 4), use_linear_projection=True, transformer_layers_per_block=2,
        resnet_time_scale_shift="scale_shift", norm_num_groups=8, conditioning_embedding_out_channels=(8, 8, 16),
        controlnet_conditioning_channel_order="bgr", conditioning_channels=1, flip_sin_to_cos=False),
}

#: diffusers' documented SD v1.5 ControlNet config (lllyasviel/control_v11p_sd15_canny's config.json values)
SD15_CONTROLNET = dict(
    in_channels=4, conditioning_channels=3, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
    use_linear_projection=False, upcast_attention=False, resnet_time_scale_shift="default",
    controlnet_conditioning_channel_order="rgb", conditioning_embedding_out_channels=(16, 32, 96, 256),
    global_pool_conditions=False)


def _inputs(config, n=2, size=8, seed=0):
    rng = np.random.default_rng(seed)
    factor = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    x = rng.standard_normal((n, config["in_channels"], size, size)).astype(np.float32)
    context = rng.standard_normal((n, 7, config["cross_attention_dim"])).astype(np.float32)
    image = rng.random((n, config.get("conditioning_channels", 3), size * factor, size * factor)).astype(np.float32)
    return x, context, image


def _torch_residuals(model, x, t, context, image, scale, guess_mode):
    with torch.no_grad():
        out = model(torch.from_numpy(x), t, torch.from_numpy(context), torch.from_numpy(image),
                    conditioning_scale=scale, guess_mode=guess_mode)
    return [r.numpy() for r in out.down_block_res_samples], out.mid_block_res_sample.numpy()


def _assert_residuals_match(got, want, atol=1e-4):
    (down, mid), (want_down, want_mid) = got, want
    assert len(down) == len(want_down)
    for r, w in zip(down, want_down):
        np.testing.assert_allclose(np.asarray(r), w, atol=atol, rtol=0)
    np.testing.assert_allclose(np.asarray(mid), want_mid, atol=atol, rtol=0)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("controlnet")
    torch_model = save_random(TorchControlNetModel, CONFIGS[request.param], directory, scale=0.15)
    model, params = ControlNetModel.from_pretrained(directory)
    return CONFIGS[request.param], torch_model, model, params


@pytest.mark.parametrize("scale, guess_mode", [(1.0, False), (0.6, False), (0.8, True)])
def test_matches_diffusers(pair, scale, guess_mode):
    config, torch_model, model, params = pair
    x, context, image = _inputs(config)
    for t in (1, 981):
        want = _torch_residuals(torch_model, x, t, context, image, scale, guess_mode)
        got = model.apply(params, jnp.asarray(x), t, jnp.asarray(context), jnp.asarray(image), scale, guess_mode)
        _assert_residuals_match(got, want)


def test_precomputed_time_terms_give_the_same_residuals(pair):
    config, _, model, params = pair
    x, context, image = (jnp.asarray(a) for a in _inputs(config, seed=1))
    direct = model.apply(params, x, 321, context, image)
    terms = model.apply(params, 321, method=model.time_terms)
    _assert_residuals_match(model.apply(params, x, None, context, image, time_terms=terms),
                            ([np.asarray(r) for r in direct[0]], np.asarray(direct[1])), atol=1e-5)


def test_time_terms_take_one_timestep(pair):
    """One timestep serves every sample of a step: a per-sample array is refused by name."""
    _, _, model, params = pair
    with pytest.raises(ValueError, match="time_terms takes one timestep"):
        model.apply(params, jnp.array([321, 321]), method=model.time_terms)


def test_control_image_of_the_wrong_size_or_channels_is_refused(pair):
    config, _, model, params = pair
    x, context, image = _inputs(config)
    with pytest.raises(ValueError, match="controlnet_cond must have shape"):
        model.apply(params, jnp.asarray(x), 1, jnp.asarray(context), jnp.asarray(image[:, :, :-8, :-8]))
    with pytest.raises(ValueError, match="controlnet_cond must have shape"):
        model.apply(params, jnp.asarray(x), 1, jnp.asarray(context), jnp.asarray(np.concatenate([image, image], 1)))


def test_unet_adds_the_residuals_as_diffusers_does(tmp_path):
    config = CONFIGS["SD-1.x shape: conv projections, heads from attention_head_dim"]
    unet_config = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=config["block_out_channels"],
                       layers_per_block=1, down_block_types=config["down_block_types"],
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                       attention_head_dim=4, norm_num_groups=8)
    torch_unet = save_random(TorchUNet2DConditionModel, unet_config, tmp_path / "unet", scale=0.15)
    torch_cn = save_random(TorchControlNetModel, config, tmp_path / "controlnet", seed=1, scale=0.15)
    unet, unet_params = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    controlnet, cn_params = ControlNetModel.from_pretrained(tmp_path / "controlnet")
    x, context, image = _inputs(config)
    down, mid = _torch_residuals(torch_cn, x, 400, context, image, 1.0, False)
    with torch.no_grad():
        want = torch_unet(torch.from_numpy(x), 400, torch.from_numpy(context),
                          down_block_additional_residuals=[torch.from_numpy(r) for r in down],
                          mid_block_additional_residual=torch.from_numpy(mid)).sample.numpy()
    got = unet.apply(unet_params, jnp.asarray(x), 400, jnp.asarray(context),
                     down_block_additional_residuals=[jnp.asarray(r) for r in down],
                     mid_block_additional_residual=jnp.asarray(mid))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="down residuals"):
        unet.apply(unet_params, jnp.asarray(x), 400, jnp.asarray(context),
                   down_block_additional_residuals=[jnp.asarray(r) for r in down[:-1]],
                   mid_block_additional_residual=jnp.asarray(mid))
    # the combined model, guided (2N = [uncond; cond], one control image per sample) and in guess mode
    model, params = ControlledUNet.combine(unet, unet_params, controlnet, cn_params, 0.9, guess_mode=True)
    doubled, contexts = np.concatenate([x, x]), np.concatenate([np.zeros_like(context), context])
    got = model.apply(params, jnp.asarray(doubled), 400, jnp.asarray(contexts), jnp.asarray(image), guided=True)
    down, mid = _torch_residuals(torch_cn, x, 400, context, image, 0.9, True)
    with torch.no_grad():
        want = torch_unet(torch.from_numpy(doubled), 400, torch.from_numpy(contexts),
                          down_block_additional_residuals=[torch.from_numpy(np.concatenate([0 * r, r])) for r in down],
                          mid_block_additional_residual=torch.from_numpy(np.concatenate([0 * mid, mid]))).sample.numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_a_controlnet_that_does_not_fit_the_unet_is_refused(tmp_path):
    config = CONFIGS["SD-1.x shape: conv projections, heads from attention_head_dim"]
    save_random(TorchControlNetModel, config, tmp_path / "controlnet")
    controlnet, cn_params = ControlNetModel.from_pretrained(tmp_path / "controlnet")
    unet = UNet2DConditionModel.from_config(dict(
        in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=24,
        down_block_types=config["down_block_types"], up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8))
    with pytest.raises(ConfigError, match=r"its layers_per_block is \(1, 1\), the UNet's \(2, 2\)"):
        ControlledUNet.combine(unet, {"params": {}}, controlnet, cn_params)


@pytest.mark.parametrize("field, value", [
    ("global_pool_conditions", True), ("class_embed_type", "timestep"), ("mid_block_type", "UNetMidBlock2D"),
    ("addition_embed_type", "text"), ("controlnet_conditioning_channel_order", "brg"),
])
def test_unsupported_options_are_refused_by_name(tmp_path, field, value):
    raw = {"_class_name": "ControlNetModel", **CONFIGS["SD-1.x shape: conv projections, heads from attention_head_dim"],
           field: value}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=field):
        ControlNetModel.from_pretrained(tmp_path)


def test_sd15_controlnet_configuration_at_a_small_latent(tmp_path):
    torch_model = save_random(TorchControlNetModel, SD15_CONTROLNET, tmp_path, scale=0.02)
    model, params = ControlNetModel.from_pretrained(tmp_path)
    x, context, image = _inputs(SD15_CONTROLNET, n=1, size=8)  # latent 8x8: a 64x64 control image
    want = _torch_residuals(torch_model, x, 500, context, image, 1.0, False)
    assert len(want[0]) == 12 and want[1].shape == (1, 1280, 1, 1)
    got = model.apply(params, jnp.asarray(x), 500, jnp.asarray(context), jnp.asarray(image))
    _assert_residuals_match(got, want)
