"""scripts/benchmark_spu_threads.py: both OpenMP settings measured in their own processes, same cases, same traffic."""

import json

from .scripts import load_script


def test_both_settings_measure_the_same_cases_and_write_the_table(tmp_path):
    script = load_script("benchmark_spu_threads")
    assert script.main(["--quick", "--repeat", "1", "--out", str(tmp_path / "t")]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    one, default = result["one_thread"], result["openmp_default"]
    assert set(one) == set(default) and len(one) == len(script.MATMULS) + len(script.CONVOLUTIONS) + 2
    for name, row in one.items():
        assert row["seconds"] > 0 and row["send_actions"] >= 1
        assert abs(row["bytes_sent"] - default[name]["bytes_sent"]) <= 0.01 * default[name]["bytes_sent"]
    text = (tmp_path / "t.md").read_text()
    assert "| case | default s | one thread s |" in text and "--quick" in text
    assert all(name in text for name in one)
