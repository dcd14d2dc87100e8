"""``benchmarks/bench_learned_cr.py``: cascade routing against the best other strategy of the table."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cascade_routing.evaluation.metrics import auc
from tests.script_helpers import load_script


def _sweep(strategy: str, quality: np.ndarray, cost: np.ndarray):
    auc_value = auc(cost.mean(1), quality.mean(1), 1.0, 3.0, 0.5)
    return SimpleNamespace(strategy=strategy, per_query_cost=cost, per_query_quality=quality, auc=auc_value)


def _result():
    """Two budgets, 40 test queries; the learned cascade routing answers 4 queries more than routing at
    the second budget, the baseline's routing 8 more."""
    n = 40
    cost = np.stack([np.full(n, 1.5), np.full(n, 2.5)])
    base = np.stack([np.arange(n) < 24, np.arange(n) < 28]).astype(np.float64)
    cr, baseline_routing = base.copy(), base.copy()
    cr[1, 28:32] = 1.0
    baseline_routing[1, 28:36] = 1.0
    lin = _sweep("linear_interpolation", base * 0.5, cost)
    curves = {"learned estimator": [lin, _sweep("routing", base, cost), _sweep("cascade_routing", cr, cost)],
              "baseline estimator": [lin, _sweep("routing", baseline_routing, cost)]}
    test_quality = np.tile([0.5, 0.9], (n, 1))
    test_cost = np.tile([1.0, 3.0], (n, 1))
    return SimpleNamespace(curves=curves, extra={"test_quality": test_quality, "test_cost": test_cost},
                           config={"num_resamples": 200, "seed": 0})


def test_the_best_other_strategy_is_searched_across_estimators_with_a_paired_ci():
    bench = load_script("benchmarks/bench_learned_cr.py")
    result = _result()
    gap = bench.best_other_gap(result)
    cr = result.curves["learned estimator"][2]
    baseline_routing = result.curves["baseline estimator"][1]
    assert gap["strategy"] == "baseline/routing"
    assert gap["cr_minus_best"] == pytest.approx(round(cr.auc - baseline_routing.auc, 3))
    low, high = gap["ci95"]
    assert gap["cr_minus_best"] < 0 and low <= gap["cr_minus_best"] <= high < 0  # 4 queries fewer, every resample
    diff, low, high = bench.paired_auc_gap(result, cr, result.curves["learned estimator"][1])
    assert diff > 0 and 0 < low <= diff <= high
