"""The smooth relaxation converges to the exact policy as τ → 0; per-step λ tuning meets the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.evaluation.synthetic import SyntheticCostEstimator, SyntheticQualityEstimator
from cascade_routing.evaluation import simulate
from cascade_routing.policies import CascadeRouting, OptimalCascade, PolicyError
from cascade_routing.policies.relaxation import (
    random_search_step_lambdas,
    relaxed_quality_cost,
    tune_step_lambdas,
)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    n, m = 200, 4
    q = (rng.random((n, m)) < np.linspace(0.35, 0.85, m)).astype(float)
    c = np.geomspace(1e-4, 5e-3, m)[None, :] * rng.uniform(0.7, 1.3, (n, m))
    models = list("abcd")
    qe = SyntheticQualityEstimator(q, models, "medium", np.arange(100), 0, dtype=torch.float64)
    ce = SyntheticCostEstimator(c, models, "medium", np.arange(100), 0, dtype=torch.float64)
    return q, c, qe, ce


@pytest.mark.parametrize("policy", [CascadeRouting(), CascadeRouting(max_depth=2), OptimalCascade()], ids=repr)
def test_relaxation_converges_to_exact_policy(problem, policy):
    q, c, qe, ce = problem
    lam = torch.tensor([300.0, 150.0, 600.0], dtype=torch.float64)
    exact = simulate(policy, qe, ce, q, c, lam)
    errors = []
    for tau in (0.1, 1e-2, 1e-3, 1e-5):
        rq, rc = relaxed_quality_cost(policy, qe, ce, q, c, lam, tau)
        errors.append((abs(float(rq) - exact.mean_quality), abs(float(rc) - exact.mean_cost)))
    assert errors[-1][0] < 1e-6 and errors[-1][1] < 1e-8
    assert errors[0][0] + errors[0][1] * 1e3 > errors[-1][0] + errors[-1][1] * 1e3


def test_relaxation_is_differentiable_and_cost_decreases_with_lambda(problem):
    q, c, qe, ce = problem
    lam = torch.tensor([300.0], dtype=torch.float64, requires_grad=True)
    rq, rc = relaxed_quality_cost(CascadeRouting(), qe, ce, q, c, lam, 0.02)
    rc.backward()
    assert lam.grad is not None and float(lam.grad) < 0
    with pytest.raises(PolicyError, match="τ"):
        relaxed_quality_cost(CascadeRouting(), qe, ce, q, c, lam.detach(), 0.0)


def test_step_lambda_tuning_meets_budget(problem):
    q, c, qe, ce = problem
    budget = float(c.mean(0)[1] * 2)
    u = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for tuner in (tune_step_lambdas, random_search_step_lambdas):
        fitted, _ = tuner(OptimalCascade(), qe, ce, q, c, budget, evaluations=8, uniforms=u)
        assert fitted.lam_low.numel() == 4
        res = simulate(OptimalCascade(), qe, ce, q, c, fitted, u)
        assert res.mean_cost <= budget * (1 + 1e-9)


def test_a_step_search_refuses_to_start_from_a_guard_fit(problem):
    """A routing-guard or single-model fit is not the whole policy at one λ: starting a per-step λ
    search from it would drop its limit; a guarded policy's own start is a constant-λ fit."""
    from cascade_routing.policies import FittedLambda
    from cascade_routing.policies.registry import make_policy

    q, c, qe, ce = problem
    budget = float(c.mean(0)[1] * 2)
    for guard_fit in (FittedLambda([5.0], [5.0], max_depth=1), FittedLambda([0.0], [0.0], max_depth=1, models=(3,)),
                      FittedLambda([5.0], [5.0], cascade=True)):
        for tuner in (tune_step_lambdas, random_search_step_lambdas):
            with pytest.raises(PolicyError, match="constant-λ fit"):
                tuner(CascadeRouting(), qe, ce, q, c, budget, evaluations=2, init=guard_fit)
    fitted, _ = random_search_step_lambdas(make_policy("cascade_routing", num_samples=16), qe, ce, q, c, budget,
                                           evaluations=2)
    assert fitted.max_depth is None and fitted.models is None
