"""Model pools (dominated models), the routing guard and fitted depth limits of cascade routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.evaluation import simulate
from cascade_routing.policies import CascadeRouting, FittedLambda, PolicyError, Routing, ThresholdCascade, fit_lambda
from cascade_routing.policies.pool import PooledPolicy, nondominated_pool
from cascade_routing.policies.registry import calibrated_policy, make_policy
from engine_helpers import make_data, synthetic_pair


def with_dominated_models(n: int = 240, seed: int = 0):
    """4 frontier models plus 2 dominated ones (index 1: cheaper than 2 but worse than 0; index 4:
    dearer than 3 and worse than 2)."""
    quality, cost = make_data(n=n, m=4, seed=seed)
    rng = np.random.default_rng(seed + 1)
    bad_cheap = (rng.random(n) < 0.2).astype(float)[:, None]
    bad_dear = (rng.random(n) < 0.3).astype(float)[:, None]
    quality = np.hstack([quality[:, :1], bad_cheap, quality[:, 1:3], quality[:, 3:], bad_dear])
    cost = np.hstack([cost[:, :1], cost[:, :1] * 1.2, cost[:, 1:3], cost[:, 3:], cost[:, 3:] * 1.5])
    return quality, cost


def test_nondominated_pool_is_the_calibration_frontier():
    quality = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])  # means .5 0 1 .5
    cost = np.array([[1.0, 2.0, 3.0, 4.0]] * 2)
    assert nondominated_pool(quality, cost) == (0, 2)
    with pytest.raises(PolicyError, match="pool fitting"):
        nondominated_pool(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(PolicyError, match="pool"):
        CascadeRouting(pool=())


def test_the_pool_is_walked_in_model_order_when_near_tied_costs_swap_on_the_rows():
    """Models 0 and 1 cost nearly the same; on these rows model 1 is a hair cheaper but worse. The
    cascades run model 0 first (index order), so model 1 must not follow it in the chain: walking the
    rows' own cost order would keep both and escalate from the better model to the worse one."""
    quality = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])  # means 2/3, 1/3, 1
    cost = np.array([[1.00, 0.99, 5.0]] * 3)
    assert nondominated_pool(quality, cost) == (0, 2)
    better_second = quality[:, [1, 0, 2]]  # model 1 now better than model 0: both stay
    assert nondominated_pool(better_second, cost) == (0, 1, 2)


def test_pooled_cascades_run_only_the_frontier_in_cost_order():
    quality, cost = with_dominated_models()
    qe, ce = synthetic_pair(quality, cost, "low", fit_rows=120)
    pool = nondominated_pool(quality[:120], cost[:120])
    assert 1 not in pool and 5 not in pool
    res = simulate(PooledPolicy(ThresholdCascade(), pool), qe, ce, quality, cost, 0.05)
    assert not bool(res.ran[:, [1, 5]].any())
    chain = res.order[res.num_run == len(pool)]
    assert chain.numel() and (chain[:, : len(pool)] == torch.tensor(pool)).all()


def test_pooled_cascade_routing_skips_dominated_models_unless_the_query_says_otherwise():
    quality, cost = with_dominated_models()
    qe, ce = synthetic_pair(quality, cost, "high", fit_rows=120)
    pool = nondominated_pool(quality[:120], cost[:120])
    free = simulate(CascadeRouting(max_depth=3, num_samples=32), qe, ce, quality, cost, 5.0)
    pooled = CascadeRouting(max_depth=3, num_samples=32, pool=pool)
    res = simulate(pooled, qe, ce, quality, cost, 5.0)
    assert bool(free.ran[:, 5].any()), "without a pool the dominated model runs (else the test shows nothing)"
    # a dominated model may only run where the query's own estimates put it off the pool's frontier
    rows = torch.arange(len(quality))
    est0 = qe.estimate(rows, torch.zeros_like(res.ran))
    allowed0 = pooled.allowed(est0, ce.estimate(rows, torch.zeros_like(res.ran)).float(), torch.zeros_like(res.ran))
    first = res.order[:, 0]
    assert bool(allowed0[rows, first].all())
    assert 4 * float(res.ran[:, 5].float().mean()) < float(free.ran[:, 5].float().mean())


def test_pooled_cascade_routing_at_depth_one_is_routing_over_all_models():
    quality, cost = with_dominated_models()
    qe, ce = synthetic_pair(quality, cost, "medium", fit_rows=120)
    pool = nondominated_pool(quality[:120], cost[:120])
    for lam in (0.0, 30.0, 300.0):
        cr = simulate(CascadeRouting(max_depth=3, num_samples=32, pool=pool), qe, ce, quality, cost,
                      FittedLambda(torch.tensor([lam]), torch.tensor([lam]), 0.0, max_depth=1))
        rt = simulate(Routing(), qe, ce, quality, cost, lam)
        assert torch.equal(cr.ran, rt.ran)


def test_on_columns_reindexes_the_pool():
    cr = CascadeRouting(pool=(0, 2, 5))
    assert cr.on_columns([0, 1, 2, 3, 5]).pool == (0, 2, 4)
    assert cr.on_columns([1, 3]).pool is None
    assert cr.pool == (0, 2, 5)
    pooled = PooledPolicy(ThresholdCascade(), (1, 3))
    assert pooled.on_columns([0, 3]).pool == (1,)
    assert isinstance(pooled.on_columns([0, 2]), ThresholdCascade)
    assert Routing().on_columns([0]).__class__ is Routing


def test_pooled_policy_rejects_a_ran_set_outside_its_pool():
    pooled = PooledPolicy(ThresholdCascade(), (0, 2))
    est = QualityEstimate(torch.full((1, 3), 0.5))
    with pytest.raises(PolicyError, match="outside this policy's pool"):
        pooled.decide(est, torch.ones(1, 3), torch.tensor([[False, True, False]]), 0.1)


def test_fitted_depth_round_trips_and_limits_the_rollout():
    quality, cost = make_data(n=80)
    qe, ce = synthetic_pair(quality, cost, "medium", fit_rows=40)
    f = FittedLambda(torch.tensor([5.0]), torch.tensor([5.0]), 0.0, max_depth=1)
    back = FittedLambda.from_dict(f.to_dict())
    assert back.max_depth == 1 and "max_depth" not in FittedLambda(torch.tensor([1.0]), torch.tensor([1.0])).to_dict()
    res = simulate(CascadeRouting(num_samples=16), qe, ce, quality, cost, back)
    assert int(res.num_run.max()) == 1
    with pytest.raises(PolicyError, match="max_depth"):
        FittedLambda(torch.tensor([1.0]), torch.tensor([1.0]), max_depth=0)


class InvertedPostHoc:
    """Informative ex-ante means (halfway between each model's mean quality and the query's realised
    quality), but once a model ran its estimate is inverted: escalating and selecting by post-hoc
    estimates is then harmful, and routing beats cascade routing and every single model."""

    def __init__(self, quality):
        self.quality = torch.as_tensor(quality, dtype=torch.float32)
        self.prior = self.quality.mean(0)
        self.models = [f"m{j}" for j in range(quality.shape[1])]

    def estimate(self, queries, ran):
        mean = 0.5 * (self.prior + self.quality[queries])
        mean = torch.where(ran, 1.0 - self.quality[queries], mean)
        return QualityEstimate(mean, std=torch.where(ran, 0.0, 0.3) * torch.ones_like(mean))


def test_routing_guard_fires_when_routing_is_clearly_better_and_is_routing_then():
    quality, cost = make_data(n=400, m=4, seed=3)
    qe = InvertedPostHoc(quality)
    _, ce = synthetic_pair(quality, cost, "low", fit_rows=200, cost_noise="low")
    budget = float(cost.mean(0)[2])
    guarded = make_policy("cascade_routing", num_samples=32, step_ratios=None)
    assert guarded.routing_guard
    fit = fit_lambda(guarded, qe, ce, quality, cost, budget, rows=torch.arange(len(quality)))
    assert fit.max_depth == 1 and len(fit.info["shape_scores"]) == 2
    assert fit.info["routing_score"] == fit.info["shape_scores"][1] > fit.info["shape_scores"][0]
    assert fit.models is None and fit.info["single_model"]["score"] < fit.info["routing_score"]
    cr = simulate(guarded, qe, ce, quality, cost, fit)
    rt = simulate(Routing(), qe, ce, quality, cost, FittedLambda(fit.lam_low, fit.lam_high, fit.gamma))
    assert torch.equal(cr.ran, rt.ran)
    unguarded = fit_lambda(make_policy("cascade_routing", num_samples=32, step_ratios=None, routing_guard=False),
                           qe, ce, quality, cost, budget, rows=torch.arange(len(quality)))
    assert unguarded.max_depth is None and fit.calibration_quality > unguarded.calibration_quality


def test_calibrated_policy_pools_all_but_routing():
    quality, cost = with_dominated_models()
    assert calibrated_policy("routing", quality, cost).__class__ is Routing
    assert calibrated_policy("cascade_routing", quality, cost).pool == nondominated_pool(quality, cost)
    assert calibrated_policy("optimal_cascade", quality, cost).pool == nondominated_pool(quality, cost)

