"""scripts/primitive_costs.py: the measured building blocks add up to the measured SiLU."""

import json

import pytest

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
    assert blocks["integer_product"]["bytes_per_element_per_party"] < blocks["secret_product"]["bytes_per_element_per_party"]
    assert result["spu_silu_bytes_per_element_per_party"] > 3 * acc["measured"]
    assert "4x target" in (tmp_path / "p.md").read_text()


def test_rejects_too_few_elements(primitive_costs):
    with pytest.raises(SystemExit):
        primitive_costs.main(["--elements", "10"])
