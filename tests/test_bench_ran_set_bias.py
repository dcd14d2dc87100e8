"""``benchmarks/bench_ran_set_bias.py``'s summary table for pools of any size."""

from __future__ import annotations

from tests.script_helpers import load_script


def _bench():
    return load_script("benchmarks/bench_ran_set_bias.py")


def _result(models: int, strategies: tuple[str, ...]) -> dict:
    sizes = [{"size": k, "run_bias": 0.01 * k, "unrun_bias": -0.01 * k, "selected_bias": 0.001 * k}
             for k in range(models + 1)]
    halves = {f"{s}_auc": 80.0 + i for i, s in enumerate(strategies)}
    halves.update({f"{s}_cost_over_budget": [1.0, 0.01] for s in strategies},
                  cr_minus_routing_auc=0.0, worst_budget_cr_minus_routing=-0.002)
    return {"artifact": "a.safetensors", "singleton_masks": 2, "bias_val": sizes, "bias_calibration": sizes,
            "calibration_halves": halves}


def test_summary_marks_ran_set_sizes_a_small_pool_does_not_have():
    """A 2-model artifact (the RouteLLM datasets) has no ran-sets of 3 or 5 models: '-' there, not a crash."""
    bench = _bench()
    table = bench.summary_markdown({"two": _result(2, bench.STRATEGIES), "eleven": _result(11, bench.STRATEGIES)})
    two = next(line for line in table.splitlines() if line.startswith("| two |"))
    eleven = next(line for line in table.splitlines() if line.startswith("| eleven |"))
    assert two.endswith("| +0.001 / +0.002 / - / - |")
    assert eleven.endswith("| +0.001 / +0.002 / +0.003 / +0.005 |")


def test_a_rerun_replaces_its_own_entry_and_keeps_the_others(tmp_path):
    """Re-measuring one artifact into a results folder keeps the other artifacts' entries, in order."""
    import json

    specs = load_script("benchmarks/artifact_specs.py")
    with_earlier_results, write_summary = specs.with_earlier_results, specs.write_summary
    write_summary(tmp_path, {"a": {"x": 1}, "b": {"x": 2}}, "table")
    merged = with_earlier_results(tmp_path, {"b": {"x": 3}, "c": {"x": 4}})
    assert merged == {"a": {"x": 1}, "b": {"x": 3}, "c": {"x": 4}} and list(merged) == ["a", "b", "c"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": {"x": 1}, "b": {"x": 2}}
    assert with_earlier_results(tmp_path / "new", {"c": {}}) == {"c": {}}
