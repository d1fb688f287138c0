"""scripts/rounds_budget.py: the floor it sets is the linear floor plus each call at its kernel's floor, and each
kernel's floor is made of the building blocks it measures."""

import json

import pytest

from .scripts import load_script


@pytest.fixture(scope="module")
def rounds_budget():
    return load_script("rounds_budget")


def _row(actions, kernels=None):
    return {"send_actions": actions, "estimated_seconds": {"LAN": 1.0, "WAN": actions * 0.02}, "kernels": kernels or {}}


def _step():
    kernels = {"silu": {"calls": 2, "send_actions": 40, "shapes": [[1, 8], [1, 8]]},
               "softmax": {"calls": 1, "send_actions": 100, "shapes": [[1, 2, 49, 49]]},
               "rsqrt": {"calls": 3, "send_actions": 66, "shapes": [[1, 8]] * 3}}
    return {"case": "toy", "rows": {"spu": _row(900, kernels), "cipherdm": _row(700, kernels), "linear-floor": _row(300)}}


def test_floor_is_the_linear_floor_plus_every_call_at_its_kernels_floor(rounds_budget, tmp_path):
    bench = tmp_path / "benchmark.json"
    bench.write_text(json.dumps({"step": [_step()]}))
    assert rounds_budget.main(["--benchmark", str(bench), "--out", str(tmp_path / "r")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    b, case = result["blocks"], result["cases"][0]
    decide = b["compare"] + b["conversion"]
    assert case["kernel_floor"]["rsqrt"] == decide + 2 * b["secret_product"]
    assert case["kernel_floor"]["silu"] == decide + b["integer_product"] + b["secret_product"]
    # a tournament over 49 in groups of any width k (levels of one comparison round, its conversion and
    # ceil(log2 k) bit-product rounds), the exp's clamp, the reciprocal with the exps riding in its products
    levels = {k: next(n for n in range(1, 50) if k**n >= 49) for k in range(2, 50)}
    tournament = min(levels[k] * (decide + (k - 1).bit_length() * b["integer_product"]) for k in levels)
    assert case["kernel_floor"]["softmax"] == tournament + decide + b["integer_product"] + decide + 2 * b["secret_product"]
    assert case["step_floor"] == 300 + round(2 * case["kernel_floor"]["silu"] + case["kernel_floor"]["softmax"]
                                             + 3 * case["kernel_floor"]["rsqrt"])
    assert case["sets"]["cipherdm"]["kernels"]["rsqrt"]["per_call"] == 22
    assert "Step floor" in (tmp_path / "r.md").read_text()


def test_refuses_a_benchmark_without_step_rows_or_shapes(rounds_budget, tmp_path):
    with pytest.raises(SystemExit):
        rounds_budget.main(["--benchmark", str(tmp_path / "missing.json")])
    old = _step()
    del old["rows"]["spu"]["kernels"]["silu"]["shapes"]
    (tmp_path / "old.json").write_text(json.dumps({"step": [old]}))
    with pytest.raises(SystemExit):
        rounds_budget.main(["--benchmark", str(tmp_path / "old.json"), "--out", str(tmp_path / "r")])
