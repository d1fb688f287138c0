"""The user's image inputs on run_sd.py: ControlNet (the control image secret-shared) and image-to-image (the
init image encoded and noised on the user's machine), on tiny random directories built here (no downloads)."""

import json

import numpy as np
import pytest
from PIL import Image

from cipherdm_spu import SecureSession
from cipherdm_spu import session as session_module
from cipherdm_spu.ir_audit import declassifications
from cipherdm_spu.session import compile_function
from cipherdm_spu.models import ScheduleConfig, UNet2DConditionModel
from cipherdm_spu.sd_cli import main

from .test_sd_cli import tiny_sd  # noqa: F401 (the tiny SD directory fixture)

torch = pytest.importorskip("torch")

#: a ControlNet for the tiny SD's UNet: same encoder shape, an image embedding that halves once (the VAE's factor 2)
TINY_CONTROLNET = dict(in_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
                       attention_head_dim=4, norm_num_groups=8, conditioning_embedding_out_channels=(8, 16))


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    from diffusers import ControlNetModel as TorchControlNetModel

    from .diffusers_models import save_random

    directory = tmp_path_factory.mktemp("tiny-controlnet")
    save_random(TorchControlNetModel, TINY_CONTROLNET, directory, seed=1, scale=0.1)  # random: no zero convolutions
    return directory


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 16x16 RGB control image (an edge-like pattern) and a 16x16 photo-like init image, as PNG files."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    edges = np.zeros((16, 16, 3), np.uint8)
    edges[4:12, [4, 11]] = 255
    edges[[4, 11], 4:12] = 255
    Image.fromarray(edges).save(root / "control.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "init.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "gray.png")
    Image.fromarray(edges[:8, :8]).save(root / "small.png")
    return root


def _report(out):
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("guess_mode", [False, True], ids=["plain", "guess-mode"])
def test_controlnet_plaintext_port_matches_the_diffusers_pipeline(tiny_sd, controlnet_dir, pictures, tmp_path, guess_mode):
    argv = ["--model", str(tiny_sd), "--prompt", "a red square", "--steps", "3", "--guidance-scale", "5",
            "--controlnet", str(controlnet_dir), "--control-image", str(pictures / "control.png"),
            "--controlnet-scale", "0.7", "--plaintext", "--reference", "--out", str(tmp_path)]
    assert main(argv + (["--guess-mode"] if guess_mode else [])) == 0
    report = _report(tmp_path)
    assert report["controlnet_scale"] == 0.7 and report["guess_mode"] is guess_mode
    assert not report["control_image_left_this_machine"] and report["max_abs_latent_diff_vs_diffusers"] < 1e-3


def test_the_controlnet_changes_the_result(tiny_sd, controlnet_dir, pictures, tmp_path):
    """The control image matters: the tiny ControlNet's residuals are not zero (the parity above is not vacuous)."""
    base = ["--model", str(tiny_sd), "--prompt", "a red square", "--steps", "2", "--plaintext", "--seed", "0"]
    assert main(base + ["--out", str(tmp_path / "text")]) == 0
    assert main(base + ["--controlnet", str(controlnet_dir), "--control-image", str(pictures / "control.png"),
                        "--out", str(tmp_path / "control")]) == 0
    text, control = np.load(tmp_path / "text" / "latent.npy"), np.load(tmp_path / "control" / "latent.npy")
    assert np.abs(text - control).max() > 1e-2


@pytest.mark.parametrize("strength, steps", [(0.5, 4), (1.0, 3)])
def test_img2img_plaintext_port_matches_the_diffusers_pipeline(tiny_sd, pictures, tmp_path, strength, steps):
    assert main(["--model", str(tiny_sd), "--prompt", "a red square", "--steps", str(steps), "--guidance-scale", "5",
                 "--init-image", str(pictures / "init.png"), "--strength", str(strength), "--plaintext", "--reference",
                 "--out", str(tmp_path)]) == 0
    report = _report(tmp_path)
    assert report["steps"] == int(steps * strength) and report["latent_shape"] == [1, 4, 8, 8]
    assert not report["init_image_left_this_machine"] and report["max_abs_latent_diff_vs_diffusers"] < 1e-3


@pytest.mark.parametrize("args, message", [
    (["--init-image", "{init}", "--strength", "0"], "--strength must be in (0, 1], got 0.0"),
    (["--init-image", "{init}", "--strength", "1.5"], "--strength must be in (0, 1], got 1.5"),
    (["--strength", "0.5"], "--strength is for --init-image"),
    (["--init-image", "{init}", "--strength", "0.05"], "leaves no step to run"),
    (["--init-image", "{init}", "--height", "32"], "--height 32 differs from the --init-image's 16"),
    (["--init-image", "{init}", "--scheduler", "unipc"], "multistep solvers are not supported"),
    (["--controlnet", "{controlnet}"], "--controlnet and --control-image go together"),
    (["--guess-mode"], "--controlnet-scale and --guess-mode are for --controlnet"),
    (["--controlnet", "{controlnet}", "--control-image", "{small}"], "is 8x8 (height x width); the image being generated is 16x16"),
    (["--controlnet", "{controlnet}", "--control-image", "{gray}"], "has 1 channel(s) (mode L); this ControlNet takes 3"),
    (["--controlnet", "{misfit}", "--control-image", "{control}"], "does not fit the UNet: its block_out_channels"),
])
def test_bad_image_inputs_fail_clearly_and_share_nothing(tiny_sd, controlnet_dir, pictures, tmp_path, capsys, monkeypatch,
                                                         args, message):
    misfit = tmp_path / "misfit"
    misfit.mkdir()
    (misfit / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel",
                                                    **{**TINY_CONTROLNET, "block_out_channels": [16, 16]}}))
    names = {"init": pictures / "init.png", "small": pictures / "small.png", "gray": pictures / "gray.png",
             "control": pictures / "control.png", "controlnet": controlnet_dir, "misfit": misfit}
    monkeypatch.setattr(SecureSession, "__init__", lambda *a, **k: pytest.fail("a session was opened"))
    argv = ["--model", str(tiny_sd), "--prompt", "x", "--steps", "4", "--out", str(tmp_path / "out")]
    assert main(argv + [a.format(**names) for a in args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_secure_controlnet_img2img_run_matches_plaintext(tiny_sd, controlnet_dir, pictures, tmp_path, monkeypatch):
    """Both image inputs at once, 2 secure steps (4 steps at strength 0.5), against the plaintext port; the guided
    ControlNet step the run compiled takes the control image as a secret input, and nothing secret becomes public."""
    compiled = []

    def recording(*args, **kwargs):
        compiled.append(compile_function(*args, **kwargs))
        return compiled[-1]

    monkeypatch.setattr(session_module, "compile_function", recording)
    assert main(["--model", str(tiny_sd), "--prompt", "a red square", "--steps", "4", "--guidance-scale", "5",
                 "--controlnet", str(controlnet_dir), "--control-image", str(pictures / "control.png"),
                 "--init-image", str(pictures / "init.png"), "--strength", "0.5", "--compare",
                 "--out", str(tmp_path)]) == 0
    report = _report(tmp_path)
    assert report["mode"] == "secure" and len(report["per_step"]) == 2 and report["bytes_sent"] > 0
    latent, plain = np.load(tmp_path / "latent.npy"), np.load(tmp_path / "plaintext_latent.npy")
    assert np.abs(latent - plain).max() < 0.1 * np.abs(plain).max()
    (step,) = [c.mlir for c in compiled if "pphlo.convolution" in c.mlir]
    assert declassifications(step) == []
    inputs = step.split("func.func @main(")[1].split(")")[0].split("%arg")
    assert any("tensor<1x3x16x16x!pphlo.secret<" in arg for arg in inputs)  # the control image


def test_a_cluster_job_with_a_strength_runs_the_last_steps(tiny_sd):
    from cipherdm_spu.jobs import make_sampler, parse_job
    from cipherdm_spu.stable_diffusion import scheduler_config

    model, _ = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    scheduler = scheduler_config(tiny_sd)
    schedule = ScheduleConfig.from_dict(scheduler)
    job = {"sampler": "ddim", "steps": 4, "batch": 1, "guidance_scale": 5.0, "tokens": 16}
    full = make_sampler(parse_job(json.dumps(job), model, schedule), schedule, scheduler)
    cut = make_sampler(parse_job(json.dumps({**job, "strength": 0.5}), model, schedule), schedule, scheduler)
    assert cut.num_steps == 2 and list(cut.timesteps) == list(full.timesteps[2:])
    for strength in (0, 1.5, "0.5", float("nan")):
        with pytest.raises(ValueError, match="strength"):
            parse_job(json.dumps({**job, "strength": strength}), model, schedule)


@pytest.fixture(scope="module")
def sd_cluster(tmp_path_factory):
    """A loopback cluster (as conftest's) whose sessions wait long enough for each party to compile an SD step."""
    from .cluster_fixtures import running_cluster

    with running_cluster(tmp_path_factory.mktemp("sd-cluster"), session_idle_s=600) as (config, _):
        yield config


@pytest.mark.slow
def test_image_inputs_as_a_user_of_the_cluster_match_plaintext(sd_cluster, tiny_sd, controlnet_dir, pictures, tmp_path,
                                                               capsys):
    """The owner uploads the tiny SD's UNet with its ControlNet (spu-launch upload --controlnet); the user redraws its
    init image under its control image on the cluster (2 of 4 steps, guess mode): only the noised latent, the control
    image and the text embeddings are shared, and the result is the embedded plaintext port's. One job for both
    image inputs: one SD program for the parties to compile."""
    from cipherdm_spu.cluster import main as launch

    config = sd_cluster
    assert launch(["--config", str(config), "upload", "--model", str(tiny_sd), "--controlnet", str(controlnet_dir),
                   "--model-id", "tiny-sd-cn"]) == 0
    assert launch(["--config", str(config), "upload", "--model", str(tiny_sd), "--model-id", "tiny-sd-text"]) == 0
    common = ["--model", str(tiny_sd), "--prompt", "a red square", "--steps", "4", "--guidance-scale", "5", "--seed", "0",
              "--init-image", str(pictures / "init.png"), "--strength", "0.5"]
    control = ["--control-image", str(pictures / "control.png"), "--controlnet-scale", "0.7", "--guess-mode"]
    on_cluster = ["--cluster", str(config), "--model-owner", "owner"]
    assert main(common + control + on_cluster + ["--model-id", "tiny-sd-cn", "--out", str(tmp_path / "cluster")]) == 0
    assert main(common + control + ["--controlnet", str(controlnet_dir), "--plaintext",
                                    "--out", str(tmp_path / "plain")]) == 0
    report = _report(tmp_path / "cluster")
    assert report["parties"].startswith(f"cluster {config}") and len(report["per_step"]) == 2
    assert report["guess_mode"] and report["controlnet_scale"] == 0.7
    assert not report["control_image_left_this_machine"] and not report["init_image_left_this_machine"]
    latent, plain = np.load(tmp_path / "cluster" / "latent.npy"), np.load(tmp_path / "plain" / "latent.npy")
    assert np.abs(latent - plain).max() < 0.1 * np.abs(plain).max()
    # a model without a ControlNet refuses a control image, and one with it needs one, before anything is shared
    for model_id, args, message in (("tiny-sd-text", control, "uploaded without a ControlNet"),
                                    ("tiny-sd-cn", [], "has a ControlNet: pass --control-image")):
        assert main(common + args + on_cluster + ["--model-id", model_id, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
