"""Benchmark harness: call discovery, the linear floor, latency estimates, and one measured step."""

import json

import jax
import numpy as np
import pytest

from cipherdm_spu import Public, RunStats, SecureSession, ops, registry
from cipherdm_spu.benchmark import (COMPARISON_OPS, OVERRIDE_KERNELS, NonlinearCall, estimate_latency,
                                    estimate_terms, linear_floor, measure_override, measure_softmax_forms, measure_step,
                                    mnist_step_case, nonlinear_calls, ratios, softmax_call_cost)
from cipherdm_spu.protocols.cipherdm import tournament_levels
from cipherdm_spu.protocols.coefficients import MASKED_ACTIVATIONS

from .conftest import fewest_send_actions
from .scripts import load_script
from .test_sampling import tiny_model  # noqa: F401 - the fixture


def test_nonlinear_calls_finds_every_op_with_shape_and_params():
    def f(x, w):
        h = ops.silu(x @ w)
        return ops.softmax(h, axis=0) + jax.vmap(ops.gelu)(h)

    calls = nonlinear_calls(f, np.ones((3, 4), np.float32), Public(np.ones((4, 5), np.float32)))
    assert [(c[0], c[1]) for c in calls] == [("silu", (3, 5)), ("softmax", (3, 5)), ("gelu", (3, 5))]
    assert calls[1][2] == {"axis": 0, "scale": 1.0} and calls[2][2] == {"approximate": False}


def test_linear_floor_is_identity_everywhere():
    floor = linear_floor()
    assert set(floor.kernels.values()) == {"identity"} and set(floor.kernels) == set(registry.OPS)
    with registry.use_protocol(floor):
        x = np.linspace(-3, 3, 7).astype(np.float32)
        # a fresh function: jax.jit caches traces per function object, whatever protocol is active
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: ops.silu(v))(x)), x)


def test_latency_estimate_arithmetic():
    stats = RunStats(2.0, 3_000_000, 3_000_000, [1_000_000, 2_000_000, 0], [0, 0, 0], 100, [100, 90, 80], {})
    assert estimate_latency(stats, "WAN") == pytest.approx(2.0 + 2e6 * 8 / 400e6 + 100 * 0.020)
    assert estimate_latency(stats, "LAN") == pytest.approx(2.0 + 2e6 * 8 / 5e9 + 100 * 0.0002)


def test_estimate_terms_take_the_busiest_party():
    stats = RunStats(2.0, 3_000_000, 3_000_000, [1_000_000, 2_000_000, 0], [0, 0, 0], 100, [100, 90, 80], {},
                     cpu_seconds_per_party=[1.0, 1.5, 0.5], busy_seconds_per_party=[2.0, 2.0, 2.0])
    assert estimate_terms(stats, 400e6, 0.02) == pytest.approx({"compute": 1.5, "bytes": 2e6 * 8 / 400e6, "rounds": 2.0})
    with pytest.raises(ValueError, match="no per-party compute"):
        estimate_terms(RunStats.zero(), 400e6, 0.02)


def test_softmax_forms_are_measured_side_by_side_on_the_same_logits():
    """The kernel's form and the fixed ones are accurate on a 49-wide call with a 1e4 logit; the kernel's takes the
    fewest send actions and pairs the fewest bytes, and each form's network time is its send actions and bytes
    priced at the network's RTT and bandwidth."""
    (row,) = measure_softmax_forms(np.random.default_rng(0), shapes=((20, 49),))
    assert row["elements"] == 980
    kernel, threes, pairs = row["kernel"], row["threes, apart"], row["pairs, apart"]
    assert (kernel["levels"], kernel["fold_exps"]) == ([[7, 1], [7, 1]], True)
    assert (threes["levels"], pairs["levels"]) == ([[3, 0]], [[2, 0]])
    for form in (kernel, threes, pairs):
        assert form["max_abs_err"] <= 5e-3
        assert form["network_seconds"]["WAN"] == pytest.approx(form["send_actions"] * 0.020
                                                               + form["busiest_party_bytes"] * 8 / 400e6)
    assert kernel["send_actions"] < threes["send_actions"] < pairs["send_actions"]
    assert pairs["busiest_party_bytes"] < threes["busiest_party_bytes"] < kernel["busiest_party_bytes"]


# How far two runs of one program may differ in send actions: SPU's counts move by a few between runs, most on a busy
# machine (SPU's softmax on 2 x 32 x 256 logits with values: 181-184 quiet, 179 on one run of the suite in full).
SEND_ACTIONS_NOISE = 5


def test_a_softmax_call_is_priced_by_fewer_rows_in_its_own_form(sessions):
    """A call priced by a quarter of its rows sends the call's bytes (within 2 %) in its send actions (within 5), for
    SPU's softmax and ours; and a call too large to run here is priced in the form it would take (ours takes another
    for 2**18 elements than for 2**12: the tournament's bits ANDed and the exps apart, more send actions, fewer
    bytes per row)."""
    call = NonlinearCall("softmax", (2, 32, 256), {"axis": 2, "scale": 0.25})
    x = np.random.default_rng(0).normal(0, 4, call.shape).astype(np.float32)
    for name in ("spu", "cipherdm"):
        session = sessions[name]
        session.run(lambda a: ops.softmax(a, axis=2, scale=0.25), x)
        full = session.last_stats
        # send actions vary by a few from run to run: each side's fewest of a few runs, within SEND_ACTIONS_NOISE
        fewest = fewest_send_actions(session, lambda a: ops.softmax(a, axis=2, scale=0.25), x)
        pricings = [softmax_call_cost(session, call, max_elements=16 * 256) for _ in range(2)]
        priced = pricings[0]
        assert (priced["rows"], priced["measured_rows"]) == (64, 16)
        assert priced["bytes_sent"] == pytest.approx(full.bytes_sent, rel=0.02), name
        assert abs(min(p["send_actions"] for p in pricings) - fewest) <= SEND_ACTIONS_NOISE, name
    assert tournament_levels(256, 2**18) != tournament_levels(256, 2**12)
    large = softmax_call_cost(sessions["cipherdm"], NonlinearCall("softmax", (1024, 256), {"axis": 1}), max_elements=2**12)
    small = softmax_call_cost(sessions["cipherdm"], NonlinearCall("softmax", (16, 256), {"axis": 1}), max_elements=2**12)
    assert large["measured_rows"] == small["measured_rows"] == 16
    assert large["send_actions"] > small["send_actions"] + 5
    assert large["bytes_sent"] < 64 * small["bytes_sent"]  # ANDed bits, exps apart: fewer bytes per row


def test_a_softmax_call_that_weighs_values_is_priced_with_them(sessions):
    """Attention's call (the values handed to the softmax) priced by a quarter of its rows in each batch element, with
    values of its width: the call's bytes within 2 % and its send actions within 5 (SPU multiplies each batch
    element apart), for SPU's softmax (the product after its probabilities) and ours (before dividing)."""
    call = NonlinearCall("softmax", (2, 32, 256), {"axis": 2, "scale": 0.25}, ((2, 256, 8),))
    rng = np.random.default_rng(0)
    x = rng.normal(0, 4, call.shape).astype(np.float32)
    v = rng.standard_normal(call.other_shapes[0]).astype(np.float32)
    for name in ("spu", "cipherdm"):
        session = sessions[name]
        session.run(lambda a, b: ops.softmax(a, axis=2, scale=0.25, values=b), x, v)
        full = session.last_stats.bytes_sent
        fewest = fewest_send_actions(session, lambda a, b: ops.softmax(a, axis=2, scale=0.25, values=b), x, v)
        pricings = [softmax_call_cost(session, call, max_elements=16 * 256) for _ in range(3)]
        priced = pricings[0]
        assert (priced["rows"], priced["measured_rows"]) == (64, 16)
        assert priced["bytes_sent"] == pytest.approx(full, rel=0.02), name
        assert abs(min(p["send_actions"] for p in pricings) - fewest) <= SEND_ACTIONS_NOISE, name
        without = softmax_call_cost(session, call._replace(other_shapes=()), max_elements=16 * 256)
        assert priced["bytes_sent"] != without["bytes_sent"], name


def test_the_masked_square_gelu_is_measured_under_cipherdm_with_gelu_replaced(sessions):
    """The kernel table's override row runs `cipherdm`'s session with GeLU overridden: the override's own cost (the
    SiLU's bytes, fewer than the set's GeLU) and its error on every input category within its fit's cap (plus half
    a float32 step at the extremes' 1e4)."""
    assert ("cipherdm", "gelu", "cipherdm-masked-square") in OVERRIDE_KERNELS
    row = measure_override("cipherdm", "gelu", "cipherdm-masked-square", np.random.default_rng(0), 200)
    assert set(row) == {"grid", "bulk", "samples", "extremes", "cost"}
    x = np.random.default_rng(0).normal(0, 2, 200).astype(np.float32)
    sessions["cipherdm"].run(ops.gelu, x)
    assert row["cost"]["bytes_per_element_per_party"] < sessions["cipherdm"].last_stats.bytes_sent / 3 / x.size
    cap = MASKED_ACTIVATIONS["gelu"]["err"]
    assert max(row[c]["max_abs_err"] for c in ("grid", "bulk", "samples", "extremes")) <= cap + 1e-5 + 2.0**-11


def test_the_softmax_forms_table_names_the_kernels_form_and_prices_each():
    def form(levels, fold, actions):
        return {"max_abs_err": 1e-3, "send_actions": actions, "busiest_party_bytes": 4000 * 49, "levels": levels,
                "fold_exps": fold, "network_seconds": {"LAN": 0.0123, "WAN": actions * 0.02}, "seconds": 0.001}

    row = {"shape": [98, 49], "elements": 4802, "kernel": form([[7, 1], [7, 3]], True, 70),
           "threes, apart": form([[3, 0]], False, 95), "pairs, apart": form([[2, 0]], False, 110)}
    table = load_script("benchmark_kernels").render_softmax_forms([row])
    assert table[0] == "## Softmax forms"
    (cells,) = [line.split(" | ") for line in table if line.startswith("| 98 x 49")]
    assert cells[2] == "7&1-7&3, folded" and cells[3] == "41, 70, 0.001"
    assert cells[6:] == ["1401 / 1901 / 2201", "13.3 / 13.3 / 13.3 |"]  # with the form's seconds


def test_measure_step_on_a_tiny_unet(tiny_model):  # noqa: F811
    """The benchmark's step case on the tiny model (the programs the script's tests below run again, from the
    compile cache)."""
    case = mnist_step_case(tiny_model, 1, 0)
    assert case.inputs[0].shape == (1, 1, 8, 8)  # the model's sample shape
    rows, ops_in_program = {}, {}
    for name in ("spu", "cipherdm"):
        with SecureSession(name) as session:
            rows[name] = measure_step(session, case)
            # the executable the step ran (the session's cache): the ops the profile counts are its (all but a few)
            shared = session.share(case.weights)
            ops_in_program[name] = session.compile(case.secure_fn, shared, *case.inputs).mlir.count("= pphlo.")
            session.delete(shared)
    ratios(rows)
    for name, row in rows.items():
        assert row["max_abs_err"] < 0.1, name
        kernels = row["kernels"]
        assert set(kernels) == {"silu", "rsqrt", "softmax"}
        assert kernels["softmax"]["calls"] == 4  # AttnDownBlock2D (1 layer), mid block (1), AttnUpBlock2D (2 layers)
        assert 0 < sum(k["bytes_sent"] for k in kernels.values()) < row["bytes_sent"]
        for k in kernels.values():  # SPU's own ops split a kernel's seconds (a pphlo op's profile is its own)
            assert 0 < sum(k["seconds_by_spu_op"].values()) <= k["seconds"] * 1.05
        assert 0 < sum(row["seconds_by_spu_op"].values()) <= row["seconds"] * 1.05  # and the step's
        assert 0 < sum(row["seconds_by_spu_op"].values()) <= row["profiled_run_seconds"]  # the same run's
        assert "convolution" in row["seconds_by_spu_op"]
        assert 0.97 * ops_in_program[name] <= row["spu_ops_executed"] <= ops_in_program[name], name
    assert any(op in COMPARISON_OPS for op in rows["cipherdm"]["kernels"]["silu"]["seconds_by_spu_op"])
    assert rows["spu"]["vs_spu"]["bytes"] == 1.0
    assert rows["cipherdm"]["vs_spu"]["bytes"] > 1.0  # our kernels send less than SPU's


@pytest.mark.slow
def test_benchmark_script_quick_mode_writes_every_row(tiny_model, tmp_path):  # noqa: F811
    """scripts/benchmark.py --quick end to end (kernel, step and sample rows) on a tiny model, with a step row of a set
    whose op is overridden (only where the step calls the op)."""
    script = load_script("benchmark")
    out = tmp_path / "bench"
    assert script.main(["--quick", "--sets", "spu", "cipherdm", "--models", str(tiny_model),
                        "--sample-model", str(tiny_model), "--out", str(out),
                        "--override", "cipherdm:silu=cipherdm-low-byte", "cipherdm:gelu=cipherdm-masked-square"]) == 0
    results = json.loads((out / "benchmark.json").read_text())
    assert set(results["kernels"]) == {"spu", "cipherdm"}
    assert results["kernels"]["cipherdm"]["silu"]["grid"]["max_abs_err"] < 1e-2
    (step,) = results["step"]
    assert set(step["rows"]) == {"spu", "cipherdm", "cipherdm[silu=cipherdm-low-byte]", "linear-floor", "kernel-floor"}
    overridden = step["rows"]["cipherdm[silu=cipherdm-low-byte]"]
    assert overridden["send_actions"] > step["rows"]["cipherdm"]["send_actions"]  # its SiLU's window waits for |x|
    assert overridden["kernels"]["silu"]["bytes_sent"] == step["rows"]["cipherdm"]["kernels"]["silu"]["bytes_sent"]
    assert step["rows"]["spu"]["vs_spu"]["bytes"] == 1.0
    assert step["rows"]["cipherdm"]["bytes_sent"] < step["rows"]["spu"]["bytes_sent"]
    assert step["rows"]["linear-floor"]["bytes_sent"] < step["rows"]["kernel-floor"]["bytes_sent"] \
        < step["rows"]["cipherdm"]["bytes_sent"]
    assert step["rows"]["cipherdm"]["max_abs_err"] < 0.1
    (sample,) = results["sample"]
    for row in sample["rows"].values():
        assert row["psnr_vs_plaintext"] > 20 and 0 <= row["conditional_accuracy"] <= 1
        assert row["estimated_seconds"]["WAN"] > row["seconds"]
    markdown = (out / "benchmark.md").read_text()
    assert "Command: `python scripts/benchmark.py --quick" in markdown and "DDIM-2" in markdown
    assert "of which comparisons s" in markdown and "| kernel-floor |" in markdown  # the kernel seconds table
    assert "The step's seconds by SPU op" in markdown and "other ops s" in markdown
    assert (out / "benchmark_bytes_time.png").stat().st_size > 0 and (out / "benchmark_kernels.png").stat().st_size > 0


@pytest.mark.parametrize("argv", [
    ["--override", "cipherdm:gelu=nope"],  # an unknown kernel
    ["--override", "cipherdm-gelu"],  # not SET:OP=KERNEL
    ["--override", "cipherdm:gelu=cipherdm"],  # the set's own kernel
    ["--override", "cipherdm-low-byte:gelu=cipherdm-masked-square"],  # a set not measured
    ["--override", "cipherdm:gelu=cipherdm-masked-square", "--override", "cipherdm-low-byte:gelu=cipherdm-masked-square"],
    ["--override", "cipherdm:gelu=cipherdm-masked-square", "--network", "relay"],  # the cluster would not run it
    ["--only-sd", "--quick"], ["--only-sd", "--cifar"], ["--only-sd", "--rows", "kernels"],
])
def test_benchmark_script_refuses_bad_overrides_and_case_options(argv):
    """Refused before anything runs; a repeated --override adds to the first (the last one here is refused)."""
    with pytest.raises(SystemExit) as exit_info:
        load_script("benchmark").main(["--rows", "step", "--sets", "spu", "cipherdm", *argv])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_benchmark_script_network_mode_runs_the_step_on_a_cluster(tiny_model, tmp_path):  # noqa: F811
    """scripts/benchmark.py --network relay: the step on three processes through the emulator, with each party's CPU."""
    script = load_script("benchmark")
    out = tmp_path / "bench"
    assert script.main(["--rows", "step", "--network", "relay", "--sets", "spu", "cipherdm", "--models", str(tiny_model),
                        "--cluster-steps", "1", "--out", str(out)]) == 0
    results = json.loads((out / "benchmark_network.json").read_text())
    (block,) = results["network"]
    assert block["network"] == "relay" and set(block["rows"]) == {"spu", "cipherdm"}
    for row in block["rows"].values():
        assert row["seconds"] > 0 and len(row["cpu_seconds_per_party"]) == 3 and min(row["cpu_seconds_per_party"]) > 0
        assert row["terms"]["compute"] == max(row["cpu_seconds_per_party"]) and row["max_abs_err"] < 0.1
    markdown = (out / "benchmark_network.md").read_text()
    assert "## Network: relay" in markdown and "send actions" in markdown
    assert (out / "benchmark_network.png").stat().st_size > 0 and not (out / "benchmark.md").exists()
