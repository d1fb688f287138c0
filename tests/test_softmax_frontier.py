"""The softmax forms' frontier (cipherdm_spu/softmax_frontier.py, `tournament_frontier` in protocols/cipherdm.py) and
scripts/softmax_frontier.py: the cost model's frontier is what a brute force over every tournament finds, a form's
kernel computes the form, a step's calls are read off its program, and a measured frontier run has every row."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from cipherdm_spu import ops, registry, softmax_frontier
from cipherdm_spu.benchmark import StepCase, mnist_step_case
from cipherdm_spu.protocols import cipherdm
from cipherdm_spu.session import SecureSession

from .conftest import fewest_send_actions
from .scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
MNIST_CALL = softmax_frontier.SoftmaxCallShape(calls=4, width=49, rows=98, values_width=32)


def _every_tournament(width):
    """Every sequence of levels from ``width`` candidates down to one, by brute force."""
    options = list(cipherdm._level_costs())
    found = []

    def walk(candidates, levels):
        if candidates == 1:
            found.append(tuple(levels))
            return
        for k, r in options:
            if k <= candidates:
                walk(-(-candidates // k), levels + [(k, r)])

    walk(width, [])
    return found


@pytest.mark.parametrize("width", [2, 5, 9, 16])
def test_tournament_frontier_is_the_brute_force_pareto_front(width):
    priced = [(*cipherdm.tournament_cost(width, levels)[:2], levels) for levels in _every_tournament(width)]
    brute = cipherdm.pareto_front([(a, b * width, levels) for a, b, levels in priced])
    front = cipherdm.tournament_frontier(width)
    assert [(a, pytest.approx(b)) for a, b, _ in front] == [(a, pytest.approx(b)) for a, b, _ in brute]
    for actions, row_bytes, levels in front:  # each entry priced as tournament_cost prices its levels
        cost = cipherdm.tournament_cost(width, levels)
        assert (actions, row_bytes) == (cost[0], pytest.approx(cost[1] * width))


def test_pareto_front_keeps_only_points_nothing_beats():
    points = [(3, 5.0, "a"), (1, 9.0, "b"), (2, 9.0, "c"), (3, 4.0, "d"), (5, 1.0, "e"), (4, 4.0, "f")]
    assert [p[2] for p in cipherdm.pareto_front(points)] == ["b", "d", "e"]


def test_call_frontier_trades_send_actions_for_bytes_and_holds_the_kernels_form():
    forms = softmax_frontier.call_frontier(MNIST_CALL)
    actions = [f.modelled_send_actions for f in forms]
    costs = [f.modelled_bytes for f in forms]
    assert actions == sorted(set(actions)) and costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
    assert forms[0] == softmax_frontier.kernel_form(MNIST_CALL)  # the kernel's choice has the fewest send actions here
    assert {f.fold_exps for f in forms} == {True, False}
    off_frontier = softmax_frontier.SoftmaxCallShape(calls=4, width=77, rows=1024, values_width=40)
    kernel = softmax_frontier.kernel_form(off_frontier)  # chosen for its time, compute included: priced all the same
    assert kernel.levels == cipherdm.tournament_levels(77, 77 * 1024)
    assert kernel.levels not in [f.levels for f in softmax_frontier.call_frontier(off_frontier)]


def test_the_division_is_priced_as_spu_counts_it():
    """Folded against apart, on one call under SPU: the bytes and send actions `division_cost` says they differ by."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 4, (2, 8, 9)).astype(np.float32)
    values = rng.standard_normal((2, 9, 5)).astype(np.float32)
    shape = softmax_frontier.SoftmaxCallShape(calls=1, width=9, rows=16, values_width=5)
    measured, actions = {}, {}
    with SecureSession("cipherdm") as session:
        for fold in (True, False):
            def form(v, w, f=fold):
                return cipherdm.softmax_in_form(v, -1, "cipherdm", ((3, 0),), f, 1.0, w)
            actions[fold] = fewest_send_actions(session, form, x, values)
            measured[fold] = session.last_stats.bytes_sent  # all parties'; the same in every run
    (_, folded), (extra_actions, apart) = (softmax_frontier.division_cost(fold, shape) for fold in (True, False))
    assert measured[True] - measured[False] == pytest.approx(3 * (folded - apart), rel=0.05)
    assert extra_actions - 2 <= actions[False] - actions[True] <= extra_actions + 2  # a run's count varies by up to 2


def test_form_labels_name_levels_and_division():
    form = softmax_frontier.SoftmaxForm(((2, 0), (5, 2), (7, 1)), False, 0, 0.0)
    assert form.label == "2-5&2-7&1, apart"
    assert softmax_frontier.SoftmaxForm(((7, 1),), True, 0, 0.0).label == "7&1, folded"


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("with_values", [False, True])
def test_a_forms_kernel_runs_the_form(monkeypatch, fold, with_values):
    form = softmax_frontier.SoftmaxForm(((2, 0), (3, 1)), fold, 0, 0.0)
    name = softmax_frontier.form_kernel(form)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0, 4, (3, 6)).astype(np.float32))
    values = jnp.asarray(rng.standard_normal((6, 2)).astype(np.float32)) if with_values else None
    got = np.asarray(registry.kernel("softmax", name)(x, -1, "cipherdm", 0.5, values))
    exact = np.exp(0.5 * (x - x.max(-1, keepdims=True)))
    exact = exact / exact.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, exact if values is None else exact @ values, atol=5e-3)
    seen = []
    monkeypatch.setattr(softmax_frontier, "softmax_in_form", lambda *args: seen.append(args))
    registry.kernel("softmax", name)(x, -1, "cipherdm", 0.5, values)
    assert seen == [(x, -1, "cipherdm", form.levels, fold, 0.5, values)]


def _softmax_case(widths):
    """A step whose softmax calls take rows of ``widths`` (one call each), with attention's values."""
    weights = {"w": np.ones((1,), np.float32)}
    inputs = tuple(np.linspace(-3, 3, 4 * w, dtype=np.float32).reshape(4, w) for w in widths)

    def secure_fn(weights, *xs):
        return sum(jnp.sum(ops.softmax(x * weights["w"], axis=-1, values=jnp.ones((x.shape[-1], 3), x.dtype)))
                   for x in xs)

    return StepCase("toy", weights, inputs, secure_fn, lambda: np.asarray(4.0 * 3 * len(widths), np.float32))


def test_step_softmax_shape_reads_the_calls_and_refuses_mixed_ones():
    shape = softmax_frontier.step_softmax_shape(_softmax_case([5, 5]))
    assert shape == softmax_frontier.SoftmaxCallShape(calls=2, width=5, rows=4, values_width=3)
    assert shape.divided == 12
    with pytest.raises(ValueError, match="exactly one"):
        softmax_frontier.step_softmax_shape(_softmax_case([5, 6]))
    with pytest.raises(ValueError, match="exactly one"):
        softmax_frontier.step_softmax_shape(_softmax_case([]))


def test_the_mnist_steps_calls():
    case = mnist_step_case(ROOT / "checkpoints" / "mnist-ddpm-silu", 1, 0)
    assert softmax_frontier.step_softmax_shape(case) == MNIST_CALL


def test_measure_frontier_runs_every_form_beside_spu_and_cipherdm():
    case = _softmax_case([5])
    forms = softmax_frontier.call_frontier(softmax_frontier.step_softmax_shape(case))
    chosen = [forms[0], forms[-1]]
    seen = []
    rows = softmax_frontier.measure_frontier(case, chosen, repeat=1, progress=seen.append)
    kernels = [softmax_frontier.form_kernel(f) for f in chosen]
    assert list(rows) == seen == [registry.BASELINE, "cipherdm", *kernels]
    for form, name in zip(chosen, kernels):
        assert rows[name]["form"]["levels"] == [list(level) for level in form.levels]
        assert rows[name]["max_abs_err"] < 0.05  # every form computes the softmax
    # the frontier's ends, as measured: the fewest send actions, and the fewest bytes
    assert rows[kernels[-1]]["send_actions"] > rows[kernels[0]]["send_actions"]
    assert rows[kernels[-1]]["bytes_sent"] < rows[kernels[0]]["bytes_sent"]
    assert rows["cipherdm"]["vs_spu"]["bytes"] == pytest.approx(rows["spu"]["bytes_sent"] / rows["cipherdm"]["bytes_sent"])


def test_verdicts_compare_bytes_to_the_cap_and_the_wan_ratio():
    rows = {"spu": {"bytes_sent": 9e8, "vs_spu": {"WAN": 1.0}},
            "a": {"bytes_sent": 2.41e8, "vs_spu": {"WAN": 2.6}},
            "b": {"bytes_sent": 2.39e8, "vs_spu": {"WAN": 2.4}},
            "c": {"bytes_sent": 2.4e8, "vs_spu": {"WAN": 2.5}}}
    assert softmax_frontier.verdicts(rows, 2.4e8, 2.5) == {
        "a": {"within_cap": False, "reaches_wan_ratio": True},
        "b": {"within_cap": True, "reaches_wan_ratio": False},
        "c": {"within_cap": True, "reaches_wan_ratio": True}}


def test_script_refuses_bad_arguments(tmp_path):
    script = load_script("softmax_frontier")
    for argv in (["--repeat", "0"], ["--forms", "0"], ["--model", str(tmp_path)]):
        with pytest.raises(SystemExit) as raised:
            script.main([*argv, "--out", str(tmp_path / "f")])
        assert raised.value.code == 2


def test_script_renders_each_row_and_what_meets_both(tmp_path):
    script = load_script("softmax_frontier")
    form = {"levels": [[2, 0], [5, 2]], "fold_exps": False, "modelled_send_actions": 42, "modelled_bytes": 4.5e5}
    row = {"bytes_sent": 2.39e8, "send_actions": 1600, "seconds": 5.0, "estimated_seconds": {"WAN": 39.0},
           "vs_spu": {"bytes": 3.2, "send_actions": 2.7, "WAN": 2.51}, "max_abs_err": 0.004}
    kernel = {"label": "7&1-7&1, folded", "levels": [[7, 1], [7, 1]], "fold_exps": True, "modelled_send_actions": 26,
              "modelled_bytes": 1.09e6}
    result = {"case": "toy", "machine": "x", "cpus": 2, "calls": 4, "width": 49, "rows_per_call": 98,
              "values_width": 32, "repeat": 3, "cap_mb": 240.0, "wan_ratio": 2.5, "kernel_form": kernel,
              "rows": {"spu": {**row, "bytes_sent": 7.8e8, "vs_spu": {"bytes": 1, "send_actions": 1, "WAN": 1}},
                       "cipherdm": {**row, "bytes_sent": 2.47e8},
                       "cipherdm-form[2-5&2, apart]": {**row, "form": form}},
              "verdicts": {"cipherdm": {"within_cap": False, "reaches_wan_ratio": True},
                           "cipherdm-form[2-5&2, apart]": {"within_cap": True, "reaches_wan_ratio": True}}}
    text = script.render(result, "python scripts/softmax_frontier.py")
    assert "| `spu` |  | 780.0 |" in text
    assert "| `cipherdm` | 26 / 3.27 | 247.0 | 1600 |" in text and "(7&1-7&1, folded)" in text
    assert "| form 2-5&2, apart | 42 / 1.35 | 239.0 | 1600 |" in text
    assert "32-wide weighted sums of attention's values" in text
    assert "Both in this run: `cipherdm-form[2-5&2, apart]`." in text
    result["verdicts"]["cipherdm-form[2-5&2, apart]"]["reaches_wan_ratio"] = False
    assert "Both in this run: none." in script.render(result, "c")
    assert "divide their exps" in script.render({**result, "values_width": 0}, "c")
