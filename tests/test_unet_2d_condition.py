"""UNet2DConditionModel port: parity with diffusers on two small SD-shaped configs (float32, 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import UNet2DConditionModel as TorchUNet2DConditionModel

from cipherdm_spu.models import UNet2DConditionModel

from .diffusers_models import save_random, torch_forward

CONFIGS = {
    "SD-1.x shape: conv projections, heads from attention_head_dim": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8),
    "SD-2.x shape: linear projections, per-block heads, 2 transformer layers, scale-shift": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=(1, 2, 1),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=(2, 4, 4), use_linear_projection=True, transformer_layers_per_block=2,
        resnet_time_scale_shift="scale_shift", norm_num_groups=8, act_fn="silu", conv_in_kernel=5, flip_sin_to_cos=False),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("unet2dcond")
    torch_model = save_random(TorchUNet2DConditionModel, CONFIGS[request.param], directory, scale=0.15)
    model, params = UNet2DConditionModel.from_pretrained(directory)
    return CONFIGS[request.param], torch_model, model, params


def _inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, config["in_channels"], 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    return x, context


def test_matches_diffusers(pair):
    config, torch_model, model, params = pair
    x, context = _inputs(config)
    for t in (1, 500, 981):
        want = torch_forward(torch_model, x, t, context)
        got = model.apply(params, jnp.asarray(x), t, jnp.asarray(context))
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_time_terms_take_one_timestep(pair):
    """One timestep serves every sample of a step: a per-sample array is refused by name."""
    _, _, model, params = pair
    with pytest.raises(ValueError, match="time_terms takes one timestep"):
        model.apply(params, jnp.array([321, 321]), method=model.time_terms)
    jax.tree_util.tree_map(np.testing.assert_array_equal, model.apply(params, jnp.array([321]), method=model.time_terms),
                           model.apply(params, 321, method=model.time_terms))


def test_precomputed_time_terms_give_the_same_output(pair):
    config, _, model, params = pair
    x, context = _inputs(config, seed=1)
    direct = model.apply(params, jnp.asarray(x), 321, jnp.asarray(context))
    terms = model.apply(params, 321, method=model.time_terms)
    via_terms = model.apply(params, jnp.asarray(x), encoder_hidden_states=jnp.asarray(context), time_terms=terms)
    np.testing.assert_allclose(np.asarray(via_terms), np.asarray(direct), atol=1e-5)


def test_encoder_hidden_states_are_checked(pair):
    config, _, model, params = pair
    x, context = _inputs(config)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model.apply(params, jnp.asarray(x), 1, jnp.asarray(context[..., :-1]))


def test_classifier_free_guidance_matches_two_diffusers_passes(pair):
    from cipherdm_spu.models.guidance import guided_prediction

    config, torch_model, model, params = pair
    x, context = _inputs(config)
    uncond = np.zeros_like(context)
    want_u = torch_forward(torch_model, x, 300, uncond)
    want_c = torch_forward(torch_model, x, 300, context)
    got = guided_prediction(model, params, jnp.asarray(x), jnp.asarray(uncond), jnp.asarray(context), 7.5, timestep=300)
    np.testing.assert_allclose(np.asarray(got), want_u + 7.5 * (want_c - want_u), atol=1e-3, rtol=0)
    terms = model.apply(params, 300, method=model.time_terms)
    via_terms = guided_prediction(model, params, jnp.asarray(x), jnp.asarray(uncond), jnp.asarray(context), 7.5,
                                  time_terms=terms)
    np.testing.assert_allclose(np.asarray(via_terms), np.asarray(got), atol=1e-4)
