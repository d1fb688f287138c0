"""The SD v1.5 cost extrapolation: the cost model on known inputs, and the full model's element counts."""

import pytest

from .scripts import load_script

estimate = load_script("sd_cost_estimate")

MEASURED = {"bytes_sent": 1000, "bytes_sent_per_party": [400, 300, 300], "send_actions": 50,
            "kernels": {"silu": {"bytes_sent": 600}, "softmax": {"bytes_sent": 300}}}
SOURCE = {"ops": {"silu": 10, "softmax": 30}, "linear_outputs": 5, "nonlinear_calls": 4}


def test_same_shape_gives_the_measurement_back():
    out = estimate.extrapolate(MEASURED, SOURCE, SOURCE)
    assert out["bytes_sent"] == pytest.approx(1000) and out["send_actions"] == pytest.approx(50)


def test_each_part_scales_with_its_own_count():
    target = {"ops": {"silu": 20, "softmax": 300}, "linear_outputs": 50, "nonlinear_calls": 8}
    out = estimate.extrapolate(MEASURED, SOURCE, target)
    assert out["bytes_by_op"] == pytest.approx({"silu": 1200, "softmax": 3000})
    assert out["bytes_linear_and_rest"] == pytest.approx(1000)  # (1000 - 900) * 50 / 5
    assert out["bytes_sent"] == pytest.approx(5200) and out["send_actions"] == pytest.approx(100)


@pytest.mark.slow
def test_sd15_counts_come_from_the_full_config_traced_abstractly():
    counts = estimate.counts(estimate.step_case(estimate.SD15, 0, abstract=True))
    # five transformers work at 64x64 = 4096 positions; guidance doubles the batch; 8 heads
    assert counts["ops"]["softmax"] >= 5 * 2 * 8 * 4096 * 4096
    assert set(counts["ops"]) == {"silu", "gelu", "softmax", "rsqrt"} and counts["linear_outputs"] > 1e9
