"""A budget the cost estimates cannot reach: a clear error from λ fitting, a raised budget in sweeps.

Cost estimates that rank models differently from the realised costs make every query run a model
that is not the realised-cheapest, so the least a policy can spend is above the cheapest model's
mean cost. Before, λ grew until it overflowed float32 and the policy failed with "λ must be finite".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.evaluation.sweep import budget_sweep
from cascade_routing.policies import BudgetUnreachable, CascadeRouting, Routing, fit_lambda

from engine_helpers import make_data, synthetic_pair


class Float32Quality:
    """The synthetic estimator's estimates in float32 (what the learned estimator returns)."""

    def __init__(self, base) -> None:
        self.base, self.models = base, base.models

    def estimate(self, queries, ran):
        e = self.base.estimate(queries, ran)
        return QualityEstimate(e.mean.float(), std=None if e.std is None else e.std.float())


class SwappedCost:
    """Cost estimates of models 0 and 1 swapped: model 1 looks cheapest, model 0 is."""

    def __init__(self, cost: np.ndarray, models: list[str]) -> None:
        self.cost, self.models = torch.as_tensor(cost, dtype=torch.float32), models

    def estimate(self, queries, ran):
        c = self.cost[torch.as_tensor(queries)].clone()
        return c[:, [1, 0, *range(2, c.shape[1])]]


@pytest.fixture(scope="module")
def setup():
    quality, cost = make_data(n=300, m=4)
    cost[:, 1] = cost[:, 0] * 3.0  # model 1 clearly costlier than model 0 (but estimated cheaper)
    qe, _ = synthetic_pair(quality, cost, "low", fit_rows=100)
    return quality, cost, Float32Quality(qe), SwappedCost(cost, qe.models)


@pytest.mark.parametrize("policy", [Routing(), CascadeRouting(max_depth=2)], ids=["routing", "cascade_routing"])
def test_unreachable_budget_is_a_clear_error_with_the_cost_at_the_largest_lambda(setup, policy):
    quality, cost, qe, ce = setup
    rows = np.arange(100, 300)
    reachable = float(cost[rows, 1].mean())  # every query runs model 1, the cheapest by estimate
    budget = float(cost[rows, 0].mean()) * 1.5  # above the cheapest model's mean, below the reachable
    assert budget < reachable
    with pytest.raises(BudgetUnreachable, match="not reachable") as info:
        fit_lambda(policy, qe, ce, quality[rows], cost[rows], budget, rows=torch.as_tensor(rows))
    assert info.value.min_cost == pytest.approx(reachable, rel=1e-6)
    # at that cost the fit succeeds and stays within it
    target = info.value.min_cost * (1 + 1e-9)
    f = fit_lambda(policy, qe, ce, quality[rows], cost[rows], target, rows=torch.as_tensor(rows))
    assert f.calibration_cost <= target * (1 + 1e-9)


def test_sweep_raises_an_unreachable_budget_and_counts_it(setup):
    quality, cost, qe, ce = setup
    fit, test = np.arange(100, 200), np.arange(200, 300)
    low = float(cost[fit, 0].mean()) * 1.5
    high = float(cost[fit].mean(0)[3])
    res = budget_sweep(Routing(), qe, ce, quality, cost, fit, test, [low, high], num_resamples=5)
    assert res.raised_budgets == 1
    assert res.fitted[0].budget == pytest.approx(float(cost[fit, 1].mean()), rel=1e-6)
    assert res.fitted[1].budget == pytest.approx(high)


@pytest.mark.parametrize("policy", [Routing(), CascadeRouting(max_depth=2)], ids=["routing", "cascade_routing"])
def test_a_budget_at_the_floor_is_fitted_as_the_floor_policy(setup, policy):
    """At the reachable floor, λ is the floor policy's (every query its cheapest model by estimate), not
    the smallest λ that coincides with it on the calibration rows: on other queries that smaller λ may
    still run a costlier model."""
    from cascade_routing.policies.lambda_search import MAX_LAMBDA
    from cascade_routing.policies.rollout import simulate

    quality, cost, _, _ = setup
    qe, ce = synthetic_pair(quality, cost, "low", fit_rows=100)  # cost estimates = the realised costs
    fit, test = np.arange(100, 200), np.arange(200, 300)
    cheapest = int(cost[fit].mean(0).argmin())
    assert bool((cost[:, cheapest:cheapest + 1] <= cost).all())  # the cheapest model for every query
    floor = float(cost[fit, cheapest].mean()) * (1 + 1e-9)
    f = fit_lambda(policy, qe, ce, quality[fit], cost[fit], floor, rows=torch.as_tensor(fit))
    assert f.info.get("floor") is True and float(f.lam_high.max()) == pytest.approx(MAX_LAMBDA)
    assert f.calibration_cost <= floor
    res = simulate(policy, qe, ce, quality[test], cost[test], f, rows=torch.as_tensor(test))
    assert bool((res.ran.sum(1) == 1).all()) and bool(res.ran[:, cheapest].all())  # the floor policy on new rows
    # a budget clearly above the floor is still fitted by bisection (a finite λ)
    mid = fit_lambda(policy, qe, ce, quality[fit], cost[fit], float(cost[fit].mean(0)[3]), rows=torch.as_tensor(fit))
    assert "floor" not in mid.info and float(mid.lam_high.max()) < MAX_LAMBDA


def test_a_cascade_whose_chain_starts_above_the_cheapest_model_is_fitted_at_its_own_floor(setup):
    """A threshold cascade always runs its chain's first model: a budget of the cheapest model's mean
    cost (the lowest of every sweep grid) is below what it can spend when that model is not in its
    pool. ``fit_reachable_lambdas`` (λ tables, sweeps) raises the budget to the cascade's floor."""
    from cascade_routing.policies import ThresholdCascade
    from cascade_routing.policies.fitting import fit_reachable_lambdas
    from cascade_routing.policies.pool import PooledPolicy

    quality, cost, _, _ = setup
    qe, ce = synthetic_pair(quality, cost, "low", fit_rows=100)
    rows = np.arange(100, 300)
    policy = PooledPolicy(ThresholdCascade(), (1, 2, 3))  # the chain starts with model 1, 3x model 0's price
    cheapest, high = float(cost[rows, 0].mean()), float(cost[rows].mean(0)[3])
    with pytest.raises(BudgetUnreachable):
        fit_lambda(policy, qe, ce, quality[rows], cost[rows], cheapest, rows=torch.as_tensor(rows))
    fits, budgets = fit_reachable_lambdas(policy, qe, ce, quality[rows], cost[rows], [cheapest, high],
                                          rows=torch.as_tensor(rows))
    assert budgets[0] == pytest.approx(float(cost[rows, 1].mean()), rel=1e-6) and budgets[1] == high
    assert fits[0].calibration_cost <= budgets[0] * (1 + 1e-9) and fits[1].budget == pytest.approx(high)
