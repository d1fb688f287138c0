"""scripts/primitive_costs.py: the measured building blocks add up to the measured SiLU, and bound a softmax."""

import json

import numpy as np
import pytest

from cipherdm_spu.protocols.coefficients import MASKED_ACTIVATIONS

from .scripts import load_script


@pytest.fixture(scope="module")
def primitive_costs():
    return load_script("primitive_costs")


def test_silu_is_the_sum_of_its_parts(primitive_costs, tmp_path):
    assert primitive_costs.main(["--elements", "300", "--out", str(tmp_path / "p")]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    acc = result["silu_accounting"]
    assert abs(acc["predicted"] - acc["measured"]) < 1.0  # the accounting explains every byte
    blocks = result["blocks"]
    # a secret product is a reshare plus a truncation; an integer product has no truncation
    integer, secret = (blocks[k]["bytes_per_element_per_party"] for k in ("integer_product", "secret_product"))
    assert integer < secret
    assert result["spu_silu_bytes_per_element_per_party"] > 3 * acc["measured"]
    # the masked-square SiLU truncates sums below 2**43 by a tiny constant: SPU gets them right up to 2**44
    wrong = result["tiny_truncation_wrong_by_magnitude_bits"]
    assert wrong["42"] == wrong["44"] == 0.0 and wrong["48"] > 0.5
    assert primitive_costs.TINY_SHIFT == (2 * 18 + MASKED_ACTIVATIONS["silu"]["square_shift"]
                                          - MASKED_ACTIVATIONS["silu"]["t_bits"])
    text = (tmp_path / "p.md").read_text()
    assert "4x target" in text
    floor = result["softmax_floor"]
    # the floor is below every measured softmax, and above spu / 4: exps of up to two products (quartics at most)
    # miss the contract by far, so three are needed
    assert floor["floor"] < min(floor["measured"].values())
    designs = {d["products"]: d for d in floor["exp_designs"]}
    assert designs[1]["max_err"] > 0.1 and designs[2]["max_err"] > 0.1 and floor["fewest_products"] == 3
    assert floor["floor"] > floor["measured"]["spu"] / 4
    assert "## The softmax's byte floor" in text and "out of reach" in text
    overhead = result["op_overhead"]  # measured, not compared: seconds vary by machine
    assert overhead["ops"] == primitive_costs.OVERHEAD_OPS and "## What one more op of a program costs a run" in text
    assert all(np.isfinite(overhead[k]) for k in ("written_out_ms_per_op", "looped_ms_per_iteration"))


def test_a_known_exp_design_holds_the_contract_and_a_coarse_one_does_not(primitive_costs):
    """The search's yardstick on its own: the kernel's design (a quartic in Knuth's form, squared three times) holds
    the softmax contract in float64; the same quartic without squarings does not."""
    rows = primitive_costs._contract_rows()
    assert primitive_costs._exp_design_error(4, 3, rows)[0] <= primitive_costs.SOFTMAX_MAX_ERR
    assert primitive_costs._exp_design_error(4, 0, rows)[0] > 0.1


def test_rejects_too_few_elements(primitive_costs):
    with pytest.raises(SystemExit):
        primitive_costs.main(["--elements", "10"])
