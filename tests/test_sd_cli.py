"""scripts/run_sd.py on a tiny random Stable Diffusion directory built here (no downloads)."""

import json

import numpy as np
import pytest

from cipherdm_spu.sd_cli import main

torch = pytest.importorskip("torch")


def byte_level_vocab():
    """A CLIP BPE vocabulary with no merges: every byte, alone and word-final, and the two specials."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    # byte-level BPE's byte -> character map: printable bytes stand for themselves, the rest from 256 up
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    vocab = byte_level_vocab()
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16).save_pretrained(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                                 eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
                  ).save_pretrained(root / "text_encoder")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=4, norm_num_groups=8).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(root / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}))
    return root


def test_plaintext_port_matches_the_diffusers_pipeline(tiny_sd, tmp_path):
    assert main(["--model", str(tiny_sd), "--prompt", "a red square", "--steps", "3", "--guidance-scale", "5",
                 "--plaintext", "--reference", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "plaintext (no MPC)" and report["latent_shape"] == [1, 4, 8, 8]
    assert report["max_abs_latent_diff_vs_diffusers"] < 1e-3
    np.testing.assert_allclose(np.load(tmp_path / "latent.npy"), np.load(tmp_path / "reference_latent.npy"), atol=1e-3)


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "unipc"])
def test_multistep_solvers_match_the_diffusers_pipeline(tiny_sd, tmp_path, scheduler):
    """--scheduler on run_sd.py: the port with DPM-Solver++ / UniPC against diffusers' pipeline with its own scheduler."""
    assert main(["--model", str(tiny_sd), "--prompt", "a red square", "--steps", "4", "--guidance-scale", "5",
                 "--scheduler", scheduler, "--plaintext", "--reference", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sampler"] == scheduler and report["max_abs_latent_diff_vs_diffusers"] < 1e-3


@pytest.mark.slow
def test_secure_run_matches_plaintext(tiny_sd, tmp_path):
    assert main(["--model", str(tiny_sd), "--prompt", "a red square", "--steps", "2", "--guidance-scale", "7.5",
                 "--compare", "--out", str(tmp_path)]) == 0
    for name in ("image.png", "latent.npy", "plaintext.png", "plaintext_latent.npy", "report.json", "spu.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "secure" and report["protocol"] == "cipherdm" and not report["prompt_left_this_machine"]
    assert report["bytes_sent"] == sum(report["bytes_sent_per_party"]) > 0 and len(report["per_step"]) == 2
    latent, plain = np.load(tmp_path / "latent.npy"), np.load(tmp_path / "plaintext_latent.npy")
    assert latent.shape == (1, 4, 8, 8)
    # guidance 7.5 multiplies the fixed-point error of the two branches' difference
    assert np.abs(latent - plain).max() < 0.1 * np.abs(plain).max()


@pytest.mark.parametrize("args, message", [
    (["--prompt", " "], "--prompt is empty"),
    (["--steps", "0"], "--steps"),
    (["--batch", "9"], "--batch"),
    (["--height", "10"], "--height must be a positive multiple of 4"),
    (["--guidance-scale", "-1"], "--guidance-scale"),
    (["--protocol", "nonesuch"], "unknown protocol set"),
    (["--scheduler", "ddpm", "--reference"], "--reference needs a sampler without per-step noise"),
])
def test_bad_input_fails_clearly_and_writes_nothing(tiny_sd, tmp_path, capsys, args, message):
    argv = ["--model", str(tiny_sd), "--prompt", "x", "--out", str(tmp_path / "out")] + args
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_the_user_packages_it_stops_before_loading_the_unet(tiny_sd, tmp_path, capsys, monkeypatch):
    """On the base install (no torch, transformers or diffusers) the prompt encoder and VAE cannot run: refused by name
    before the owner's UNet, which may take minutes to load, is read."""
    from cipherdm_spu import sd_cli, stable_diffusion

    real = stable_diffusion.importlib.util.find_spec
    monkeypatch.setattr(stable_diffusion.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "diffusers") else real(name, *a))
    loads = []
    monkeypatch.setattr(sd_cli.UNet2DConditionModel, "from_pretrained", lambda *a, **k: loads.append(a))
    assert main(["--model", str(tiny_sd), "--prompt", "x", "--out", str(tmp_path / "out")]) == 2
    assert "run on torch, diffusers, not installed here: pip install -e '.[sd]'" in capsys.readouterr().err
    assert loads == [] and not (tmp_path / "out").exists()


def test_the_prompt_and_seed_can_come_from_a_private_file(tmp_path, capsys):
    """Off the command line, which any local user can read while the run lasts: @FILE, one argument per line or an
    option and its value on one, blank lines skipped; a value that starts with @ itself is given as --option=@...; a
    file others may read is warned about, a missing one refused by name."""
    from cipherdm_spu.sd_cli import build_parser

    secret = tmp_path / "secret-args"
    secret.write_text("--prompt a photo of my own cat\n\n--negative-prompt=@nobody\n--seed\n5\n")
    secret.chmod(0o600)
    args = build_parser().parse_args(["--model", str(tmp_path), f"@{secret}"])
    assert (args.prompt, args.negative_prompt, args.seed) == ("a photo of my own cat", "@nobody", 5)
    assert capsys.readouterr().err == ""
    secret.chmod(0o644)
    build_parser().parse_args(["--model", str(tmp_path), f"@{secret}"])
    assert "is readable by other users of this machine" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", str(tmp_path), f"@{tmp_path / 'nowhere'}"])
    assert "nowhere" in capsys.readouterr().err


def test_not_a_stable_diffusion_directory(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    assert main(["--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "out")]) == 2
    assert "missing text_encoder/, tokenizer/, vae/, scheduler/" in capsys.readouterr().err
