"""scripts/secure_solver_quality.py: a run goes on where the last one stopped, never mixes settings, and reports
the saved batches (the secure sampling itself is tested in test_sampling)."""

import json

import numpy as np
import pytest

from cipherdm_spu.mnist import load_digits

from .scripts import load_script

SETTING = {"model": "mnist-ddpm-silu", "scheduler": "unipc", "steps": 5, "protocol": "cipherdm", "batch": 8,
           "seed": 0, "timesteps": [830, 664, 498, 332, 166]}


@pytest.fixture(scope="module")
def script():
    return load_script("secure_solver_quality")


def _save_batch(runs, start, images, labels, seconds=10.0):
    np.savez(runs / f"batch-{start:05d}.npz", secure=images, plain=images, labels=labels, seconds=seconds,
             bytes_sent=1_000_000, send_actions=100)


def test_a_run_draws_only_the_batches_not_yet_saved_and_records_each_command(script, tmp_path):
    runs = tmp_path / "runs"
    assert script.batches_to_draw(runs, SETTING, "first", samples=24) == [0, 8, 16]
    _save_batch(runs, 0, np.zeros((8, 1, 28, 28), np.float32), np.arange(8))
    _save_batch(runs, 16, np.zeros((8, 1, 28, 28), np.float32), np.arange(16, 24) % 10)
    (runs / "partial-00008.npz").write_bytes(b"cut short")  # what a killed run leaves: not a batch
    assert script.batches_to_draw(runs, SETTING, "second", samples=24) == [8]
    _save_batch(runs, 8, np.zeros((8, 1, 28, 28), np.float32), np.arange(8, 16) % 10)
    assert script.batches_to_draw(runs, SETTING, "third: nothing left", samples=24) == []
    assert json.loads((runs / "setting.json").read_text())["commands"] == ["first", "second"]


@pytest.mark.parametrize("changed", [{"steps": 6}, {"seed": 1}, {"protocol": "spu"}, {"batch": 4}])
def test_a_folder_holding_another_setting_is_refused_by_what_differs(script, tmp_path, changed):
    runs = tmp_path / "runs"
    script.batches_to_draw(runs, SETTING, "first", samples=8)
    with pytest.raises(SystemExit, match=f"another setting \\(differs in {next(iter(changed))}\\)"):
        script.batches_to_draw(runs, SETTING | changed, "second", samples=8)


def test_the_report_judges_the_saved_batches(script, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    script.batches_to_draw(runs, SETTING, "python scripts/secure_solver_quality.py", samples=16)
    images, labels = load_digits("heldout")[:2]
    picks = np.concatenate([np.flatnonzero(labels == d)[:2] for d in range(8)])  # 16 real digits, 2 of each of 0..7
    _save_batch(runs, 0, images[picks[:8]], labels[picks[:8]], seconds=80.0)
    _save_batch(runs, 8, images[picks[8:]], labels[picks[8:]], seconds=40.0)
    script.main(["--runs", str(runs), "--out", str(out), "--report-only"])
    results = json.loads((out / "solvers_secure.json").read_text())
    assert results["samples"] == 16
    assert results["secure"] == results["plaintext, same noise"]  # the same images in both rows
    assert results["secure"]["conditional_accuracy"] >= 0.9  # held-out digits under their own labels
    assert results["seconds_per_sample"] == pytest.approx(120.0 / 16)
    assert results["seconds_per_sample_fastest_batch"] == pytest.approx(40.0 / 8)
    assert "`python scripts/secure_solver_quality.py`" in (out / "solvers_secure.md").read_text()
