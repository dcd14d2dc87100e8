"""``benchmarks/bench_posthoc_ceiling.py``: its options and summary table."""

from __future__ import annotations

import pytest

from tests.script_helpers import load_script


def _row(weight: float, gain: float) -> dict:
    strategies = ("routing", "threshold_cascade_one_threshold", "threshold_cascade", "optimal_cascade", "cascade_routing")
    row = {f"{s}_auc": 80.0 for s in strategies}
    row.update(weight=weight, own_answer_auroc=0.7 + weight / 4, cascade_routing_auc=80.0 + gain,
               cr_minus_routing_auc=gain, worst_budget_cr_minus_routing=-0.0042)
    return row


def test_summary_has_one_row_per_dataset_and_weight():
    bench = load_script("benchmarks/bench_posthoc_ceiling.py")
    table = bench.summary_markdown({"rb": [_row(0.0, -0.06), _row(1.0, 9.35)], "gsm8k": [_row(0.0, 0.0)]})
    rows = [line for line in table.splitlines() if line.startswith("| rb ") or line.startswith("| gsm8k ")]
    assert rows == ["| rb | 0 | 0.700 | 80.00 | 80.00 | 80.00 | 79.94 | -0.06 | -0.42 |",
                    "| rb | 1 | 0.950 | 80.00 | 80.00 | 80.00 | 89.35 | +9.35 | -0.42 |",
                    "| gsm8k | 0 | 0.700 | 80.00 | 80.00 | 80.00 | 80.00 | +0.00 | -0.42 |"]


def test_an_artifact_option_without_a_name_is_a_usage_error(capsys):
    bench = load_script("benchmarks/bench_posthoc_ceiling.py")
    with pytest.raises(SystemExit) as err:
        bench.main(["--artifact", "artifacts/rb.safetensors", "--weights", "0"])
    assert err.value.code == 2 and "--artifact must be NAME=PATH" in capsys.readouterr().err


def test_uncertainty_rows_get_their_own_column_and_bad_names_are_usage_errors(capsys):
    bench = load_script("benchmarks/bench_posthoc_ceiling.py")
    rows = [{**_row(0.0, 0.31), "uncertainty": "none"}, {**_row(0.0, 0.52), "uncertainty": "variance*0.3"}]
    table = bench.summary_markdown({"gsm8k": rows}).splitlines()
    assert table[0].startswith("| artifact | w | uncertainty | own-answer AUROC |")
    assert table[2:] == ["| gsm8k | 0 | none | 0.700 | 80.00 | 80.00 | 80.00 | 80.31 | +0.31 | -0.42 |",
                         "| gsm8k | 0 | variance*0.3 | 0.700 | 80.00 | 80.00 | 80.00 | 80.52 | +0.52 | -0.42 |"]
    assert bench.parse_uncertainty("variance*0.3") == ("variance", 0.3)
    assert bench.parse_uncertainty("none") == ("none", 1.0)
    for bad in ("covariance", "variance*0", "variance*x", "none*2"):
        with pytest.raises(SystemExit) as err:
            bench.main(["--artifact", "rb=artifacts/rb.safetensors", "--uncertainty", bad])
        assert err.value.code == 2 and repr(bad) in capsys.readouterr().err
