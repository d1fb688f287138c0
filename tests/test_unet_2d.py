"""UNet2DModel port: parity with diffusers (float32, 1e-4), precomputed time terms, and a run under MPC."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import UNet2DModel as TorchUNet2DModel

from cipherdm_spu.models import ConfigError, UNet2DConfig, UNet2DModel, sample_shape

from .diffusers_models import save_random, torch_forward

CONFIGS = {
    "class-conditional, attention, silu": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=10),
    "mish, scale-shift, no attention, three levels": dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=2,
        down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=8,
        act_fn="mish", resnet_time_scale_shift="scale_shift", add_attention=False),
    "gelu, attention everywhere, padding 0, centred input, cos-sin": dict(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 16), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=4, attention_head_dim=None, act_fn="gelu", downsample_padding=0, center_input_sample=True,
        flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1.5, norm_eps=1e-6),
    "relu, no mid block": dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, act_fn="relu", mid_block_type=None),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    config = CONFIGS[request.param]
    directory = tmp_path_factory.mktemp("unet2d")
    torch_model = save_random(TorchUNet2DModel, config, directory)
    model, params = UNet2DModel.from_pretrained(directory)
    return config, torch_model, model, params


def _inputs(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    x = rng.standard_normal((batch, config["in_channels"], size, size)).astype(np.float32)
    labels = np.arange(batch, dtype=np.int64) * 3 % 10 if config.get("num_class_embeds") else None
    return x, labels


def test_matches_diffusers(pair):
    config, torch_model, model, params = pair
    x, labels = _inputs(config)
    for t in (0, 37, 999):
        kwargs = {"class_labels": labels} if labels is not None else {}
        want = torch_forward(torch_model, x, t, **kwargs)
        got = model.apply(params, jnp.asarray(x), t, **{k: jnp.asarray(v) for k, v in kwargs.items()})
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_per_sample_timesteps_match_diffusers(pair):
    config, torch_model, model, params = pair
    x, labels = _inputs(config)
    t = np.array([5, 700])
    kwargs = {"class_labels": labels} if labels is not None else {}
    want = torch_forward(torch_model, x, t, **kwargs)
    got = model.apply(params, jnp.asarray(x), jnp.asarray(t), **{k: jnp.asarray(v) for k, v in kwargs.items()})
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_precomputed_time_terms_give_the_same_output(pair):
    config, _, model, params = pair
    x, labels = _inputs(config)
    direct = model.apply(params, jnp.asarray(x), 250, **({"class_labels": jnp.asarray(labels)} if labels is not None else {}))
    terms = model.apply(params, 250, method=model.time_terms)
    one_hot = jax.nn.one_hot(labels, 10) if labels is not None else None
    via_terms = model.apply(params, jnp.asarray(x), class_labels=one_hot, time_terms=terms)
    np.testing.assert_allclose(np.asarray(via_terms), np.asarray(direct), atol=1e-5)


def test_time_terms_take_one_timestep(pair):
    """The owner's terms serve every sample of a step: a per-sample array is refused by name, one value is accepted
    as a scalar or as shape (1,)."""
    _, _, model, params = pair
    with pytest.raises(ValueError, match="time_terms takes one timestep"):
        model.apply(params, jnp.array([10, 10]), method=model.time_terms)
    as_array = model.apply(params, jnp.array([10]), method=model.time_terms)
    as_scalar = model.apply(params, 10, method=model.time_terms)
    jax.tree_util.tree_map(np.testing.assert_array_equal, as_array, as_scalar)


def test_time_terms_need_no_time_weights(pair):
    """The secure path never touches the time MLP, the class table or the time projections."""
    config, _, model, params = pair
    x, labels = _inputs(config)
    terms = model.apply(params, 10, method=model.time_terms)
    one_hot = jax.nn.one_hot(labels, 10) if labels is not None else None
    out = model.apply(_without(params, "time_emb_proj", "time_embedding", "class_embedding"), jnp.asarray(x),
                      class_labels=one_hot, time_terms=terms)
    full = model.apply(params, jnp.asarray(x), class_labels=one_hot, time_terms=terms)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(full))


def _without(params, *names):
    def strip(tree):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in tree.items() if k not in names}

    return strip(params)


def test_bad_inputs_are_refused(pair):
    config, _, model, params = pair
    x, labels = _inputs(config)
    kwargs = {"class_labels": jnp.asarray(labels)} if labels is not None else {}
    with pytest.raises(ValueError, match="shape"):
        model.apply(params, jnp.asarray(np.concatenate([x, x], axis=1)), 1, **kwargs)
    with pytest.raises(ValueError, match="multiples of"):
        model.apply(params, jnp.asarray(x[..., :-1]), 1, **kwargs)
    if labels is not None:
        with pytest.raises(ValueError, match="class_labels"):
            model.apply(params, jnp.asarray(x), 1)
    else:
        with pytest.raises(ValueError, match="class embedding"):
            model.apply(params, jnp.asarray(x), 1, class_labels=jnp.zeros((2,), jnp.int32))


def test_save_pretrained_round_trips_through_diffusers(pair, tmp_path):
    config, _, model, params = pair
    model.save_pretrained(params, tmp_path)
    reloaded = TorchUNet2DModel.from_pretrained(tmp_path).eval()
    x, labels = _inputs(config, seed=3)
    kwargs = {"class_labels": labels} if labels is not None else {}
    got = model.apply(params, jnp.asarray(x), 11, **{k: jnp.asarray(v) for k, v in kwargs.items()})
    np.testing.assert_allclose(torch_forward(reloaded, x, 11, **kwargs), np.asarray(got), atol=1e-4, rtol=0)


def test_small_unet_under_mpc_matches_plaintext(sessions, tmp_path):
    """protocol `spu`: the secure UNet (weights and input secret, time terms shared by the owner)."""
    config = CONFIGS["class-conditional, attention, silu"]
    save_random(TorchUNet2DModel, dict(config, sample_size=8), tmp_path, scale=0.1)
    model, params = UNet2DModel.from_pretrained(tmp_path)
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    one_hot = np.eye(10, dtype=np.float32)[[4]]
    terms = model.apply(params, 500, method=model.time_terms)
    plain = np.asarray(model.apply(params, jnp.asarray(x), class_labels=one_hot, time_terms=terms))

    def denoise(params, x, labels, terms):
        return model.apply(params, x, class_labels=labels, time_terms=terms)

    session = sessions["spu"]
    secure = session.run(denoise, _without(params, "time_embedding", "class_embedding"), x, one_hot, terms)
    err = np.abs(secure - plain).max()
    assert err < 0.05 * max(1.0, np.abs(plain).max()), err
    assert session.last_stats.bytes_sent > 0


def test_class_embedding_starts_like_diffusers():
    """N(0, 1), as torch's nn.Embedding: a weaker start made training ignore the requested class."""
    model = UNet2DModel.from_config(CONFIGS["class-conditional, attention, silu"])
    table = np.asarray(model.init_params(jax.random.PRNGKey(0))["params"]["class_embedding"]["embedding"])
    assert table.shape == (10, model.config.time_embed_dim)
    assert 0.85 < table.std() < 1.15 and abs(table.mean()) < 0.1


def test_sample_shape_reads_either_form_of_sample_size():
    """diffusers gives sample_size as one side or as (height, width); a config without it cannot say what it samples."""
    assert sample_shape(UNet2DConfig(sample_size=28, in_channels=1)) == (1, 28, 28)
    assert sample_shape(UNet2DConfig.from_dict({"sample_size": [16, 24], "in_channels": 3})) == (3, 16, 24)
    with pytest.raises(ConfigError, match="no sample_size"):
        sample_shape(UNet2DConfig())
    for bad in ([28], [1, 2, 3], "ab", True, 0, [28, -1], [28.0, 28]):
        with pytest.raises(ConfigError, match="sample_size must be a positive side or"):
            sample_shape(UNet2DConfig(sample_size=bad))


def test_a_config_too_large_to_list_its_tensors_quickly_is_refused_before_any_trace():
    """A party traces a manifest's model to list its tensors: an independent attacker's small manifest of hundreds of
    layers a block held a party's manifest judge for most of its deadline, refusing every other owner's upload
    meanwhile. Blocks and layers, counted as the model builds them (down, mid and up; a second review found that
    counting the down blocks alone let zero ResNets with 100000 transformer layers through), are bounded in the
    config, before any trace; published configs are well inside (tests/test_unet_2d_condition.py loads SD's)."""
    from cipherdm_spu.jobs import MANIFEST_FORMAT, SamplingCatalog
    from cipherdm_spu.models import UNet2DConditionConfig
    from cipherdm_spu.models.config import MAX_BLOCKS, MAX_LAYERS

    assert UNet2DConfig().check() is None and UNet2DConditionConfig().check() is None  # 43 layers each
    with pytest.raises(ConfigError, match=f"6411 layers .* more than {MAX_LAYERS}"):
        UNet2DConfig.from_dict({"sample_size": 8, "layers_per_block": 400})
    with pytest.raises(ConfigError, match=f"500006 layers .* more than {MAX_LAYERS}"):
        UNet2DConditionConfig.from_dict({"sample_size": 8, "layers_per_block": 0, "transformer_layers_per_block": 100000})
    with pytest.raises(ConfigError, match=f"9 blocks; a model has 1 to {MAX_BLOCKS}"):
        UNet2DConfig.from_dict({"sample_size": 8, "block_out_channels": [32] * 9, "down_block_types": ["DownBlock2D"] * 9,
                                "up_block_types": ["UpBlock2D"] * 9})
    with pytest.raises(ConfigError, match=f"0 blocks; a model has 1 to {MAX_BLOCKS}"):
        UNet2DConfig.from_dict({"sample_size": 8, "block_out_channels": [], "down_block_types": [], "up_block_types": []})
    for bad in (-1, True, 2.5):
        with pytest.raises(ConfigError, match="layers_per_block must be whole numbers >= 0"):
            UNet2DConfig.from_dict({"sample_size": 8, "layers_per_block": bad})
    with pytest.raises(ConfigError, match="must be one whole number, not one per block"):  # the port takes one
        UNet2DConfig.from_dict({"sample_size": 8, "layers_per_block": [2, 2, 2, 2]})
    manifest = json.dumps({"format": MANIFEST_FORMAT, "kind": "UNet2DModel", "scheduler": {}, "policy": None,
                           "config": {"sample_size": 8, "layers_per_block": 400}})
    with pytest.raises(ValueError, match=f"model config: .* more than {MAX_LAYERS}"):  # the judge's refusal
        SamplingCatalog().model_tensors(manifest, 1_000_000)
