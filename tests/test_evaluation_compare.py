"""Per-budget paired comparison of two sweeps (evaluation/compare.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cascade_routing.evaluation.compare import (adherence_interval, budget_adherence, compare_per_budget, paired_interval,
                                                spend_targets)
from cascade_routing.policies.fitting import FittedLambda


def _sweep(name, per_query_quality, costs):
    q = np.asarray(per_query_quality, dtype=np.float64)
    return SimpleNamespace(strategy=name, budgets=np.array([1.0, 2.0, 3.0]), per_query_quality=q,
                           qualities=q.mean(1), costs=np.asarray(costs, dtype=np.float64))


def test_per_budget_difference_its_ci_and_the_worst_budget():
    a = _sweep("a", [[1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]], [0.9, 2.0, 3.3])
    b = _sweep("b", [[1, 0, 0, 0], [1, 1, 0, 1], [1, 1, 1, 1]], [1.0, 1.8, 3.0])
    cmp = compare_per_budget(a, b, num_resamples=200)
    assert np.allclose(cmp.diff, [0.25, -0.5, 0.0])
    assert np.all(cmp.ci_low <= cmp.diff) and np.all(cmp.diff <= cmp.ci_high)
    assert cmp.ci_low[2] == cmp.ci_high[2] == 0.0  # identical answers: no spread
    assert cmp.worst_index == 1 and cmp.worst == (2.0, -0.5)
    assert np.allclose(budget_adherence(a), [0.9, 1.0, 1.1])


def test_sweeps_over_other_budgets_are_refused():
    a = _sweep("a", [[1, 0]] * 3, [1, 2, 3])
    b = _sweep("b", [[1, 0, 1]] * 3, [1, 2, 3])
    with pytest.raises(ValueError, match="do not share"):
        compare_per_budget(a, b)


def test_sweep_adherence_is_the_mean_over_budgets_with_a_query_bootstrap_ci():
    # budgets 1, 2; per-query costs chosen so budget 1 is overshot by 20% and budget 2 met exactly
    sweep = SimpleNamespace(budgets=np.array([1.0, 2.0]),
                            per_query_cost=np.array([[1.0, 1.4, 1.0, 1.4], [2.0, 2.0, 2.0, 2.0]]))
    mean, low, high = adherence_interval(sweep, num_resamples=300)
    assert mean == pytest.approx((1.2 + 1.0) / 2)
    assert low < mean < high  # the first budget's cost varies over queries
    steady = SimpleNamespace(budgets=np.array([1.0]), per_query_cost=np.full((1, 5), 1.02))
    assert adherence_interval(steady, num_resamples=50) == pytest.approx((1.02, 1.02, 1.02))


def test_paired_interval_of_per_query_differences():
    mean, low, high = paired_interval([1, 1, 0, 1], [1, 0, 0, 0], num_resamples=300)
    assert mean == pytest.approx(0.5)
    assert 0.0 <= low <= mean <= high <= 1.0
    assert paired_interval([1, 0], [1, 0]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same length"):
        paired_interval([1, 0], [1])


def test_adherence_is_measured_against_what_each_fit_aims_at():
    # budget 1: a normal fit; budget 2: raised to the floor 2.5; budget 9: λ = 0 spends only 4 on calibration
    fits = [FittedLambda([3.0], [3.5], 0.2, budget=1.0, calibration_cost=0.99),
            FittedLambda([1e30], [1e30], 0.0, budget=2.5, calibration_cost=2.5),
            FittedLambda([0.0], [0.0], 0.0, budget=9.0, calibration_cost=4.0)]
    sweep = SimpleNamespace(budgets=np.array([1.0, 2.0, 9.0]), costs=np.array([1.1, 2.5, 4.2]), fitted=fits,
                            per_query_cost=np.array([[1.1, 1.1], [2.5, 2.5], [4.2, 4.2]]))
    assert np.allclose(spend_targets(sweep), [1.0, 2.5, 4.0])
    assert np.allclose(budget_adherence(sweep), [1.1, 1.0, 1.05])
    assert adherence_interval(sweep, num_resamples=20)[0] == pytest.approx((1.1 + 1.0 + 1.05) / 3)
    # the single-model guard: one model alone spends its calibration cost, whatever the λ it carries
    sweep.fitted = fits[:2] + [FittedLambda([7.0], [7.0], 0.0, budget=9.0, calibration_cost=8.5, max_depth=1,
                                            models=(2,))]
    assert np.allclose(spend_targets(sweep), [1.0, 2.5, 8.5])
    sweep.fitted = []  # no fits (the linear interpolation): the budgets themselves
    assert np.allclose(spend_targets(sweep), [1.0, 2.0, 9.0])


def test_models_of_equal_mean_cost_are_a_clear_error():
    from cascade_routing.evaluation.sweep import linear_interpolation_sweep

    quality = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cost = np.full((3, 2), 0.01)
    with pytest.raises(ValueError, match=r"every model costs 0\.01 USD per query on average .* nothing to trade off"):
        linear_interpolation_sweep(quality, cost, np.array([0.01]))


def test_paired_auc_interval_resamples_both_strategies_alike():
    from cascade_routing.evaluation.metrics import auc, bootstrap_auc, paired_auc_interval

    rng = np.random.default_rng(0)
    n = 200
    cost = np.stack([np.full(n, 1.0), np.full(n, 2.0), np.full(n, 3.0)])  # [P=3, N]
    quality_b = (rng.random((3, n)) < np.array([[0.5], [0.6], [0.7]])).astype(np.float64)
    quality_a = quality_b.copy()
    quality_a[1, np.flatnonzero(quality_b[1] == 0)[:10]] = 1.0  # a answers 10 more queries at the middle budget
    ref = (1.0, 3.0, 0.4)
    diff, low, high = paired_auc_interval((cost, quality_a), (cost, quality_b), *ref, num_resamples=300)
    expected = auc(cost.mean(1), quality_a.mean(1), *ref) - auc(cost.mean(1), quality_b.mean(1), *ref)
    assert diff == pytest.approx(expected) and diff > 0
    assert 0 < low <= diff <= high
    # paired: the difference's CI is far narrower than either strategy's own AUC CI
    own_low, own_high = bootstrap_auc(cost, quality_b, *ref, num_resamples=300)
    assert high - low < 0.5 * (own_high - own_low)
    assert paired_auc_interval((cost, quality_b), (cost, quality_b), *ref, num_resamples=50) == (0.0, 0.0, 0.0)


def test_paired_auc_interval_refuses_other_queries():
    from cascade_routing.evaluation.metrics import paired_auc_interval

    with pytest.raises(ValueError, match="same N queries"):
        paired_auc_interval((np.ones((2, 5)), np.ones((2, 5))), (np.ones((2, 6)), np.ones((2, 6))), 0.0, 1.0, 0.0)
