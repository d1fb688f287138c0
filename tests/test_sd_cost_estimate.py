"""The SD v1.5 cost extrapolation: the cost model on known inputs, and the full model's element counts."""

import pytest

from .scripts import load_script

estimate = load_script("sd_cost_estimate")

MEASURED = {"bytes_sent": 1000, "bytes_sent_per_party": [400, 300, 300], "send_actions": 50,
            "kernels": {"silu": {"bytes_sent": 600, "send_actions": 20}, "softmax": {"bytes_sent": 300, "send_actions": 10}}}
CALL = '{"shape": [2, 49], "axis": 1, "scale": 1.0}'
SOURCE = {"ops": {"silu": 10, "softmax": 30}, "calls": {"silu": 2, "softmax": 1}, "linear_outputs": 5,
          "nonlinear_calls": 3, "softmax_calls": {CALL: 1}}
PRICES = {CALL: {"bytes_sent": 300, "send_actions": 10}}


def test_same_shape_gives_the_measurement_back():
    out = estimate.extrapolate(MEASURED, SOURCE, SOURCE, PRICES)
    assert out["bytes_sent"] == pytest.approx(1000) and out["send_actions"] == pytest.approx(50)


def test_each_part_scales_with_its_own_count_and_each_softmax_call_with_its_price():
    wide = '{"shape": [8, 4096], "axis": 1, "scale": 1.0}'
    target = {"ops": {"silu": 20, "softmax": 32866}, "calls": {"silu": 4, "softmax": 3}, "linear_outputs": 50,
              "nonlinear_calls": 6, "softmax_calls": {CALL: 2, wide: 1}}
    prices = {**PRICES, wide: {"bytes_sent": 5000, "send_actions": 40}}
    out = estimate.extrapolate(MEASURED, SOURCE, target, prices)
    # softmax: its calls' prices, not its elements times the source's rate (which would be 328660)
    assert out["bytes_by_op"] == pytest.approx({"silu": 1200, "softmax": 2 * 300 + 5000})
    assert out["bytes_linear_and_rest"] == pytest.approx(1000)  # (1000 - 900) * 50 / 5
    # send actions: silu 20 per 2 calls -> 4 calls; softmax 2 x 10 + 40; the rest (50 - 30) x 6 / 3
    assert out["send_actions_by_op"] == pytest.approx({"silu": 40, "softmax": 60})
    assert out["send_actions"] == pytest.approx(40 + 60 + 40)


@pytest.mark.slow
def test_sd15_counts_come_from_the_full_config_traced_abstractly():
    counts = estimate.counts(estimate.step_case(estimate.SD15, 0, abstract=True))
    # five transformers work at 64x64 = 4096 positions; guidance doubles the batch; 8 heads
    assert counts["ops"]["softmax"] >= 5 * 2 * 8 * 4096 * 4096
    assert set(counts["ops"]) == {"silu", "gelu", "softmax", "rsqrt"} and counts["linear_outputs"] > 1e9
