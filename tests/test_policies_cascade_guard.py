"""The cascade guard of cascade routing: the optimal cascade over its pool, fitted to the same budget,
replaces the fit when it beats it by more than its noise on the calibration rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cascade_routing.evaluation import simulate
from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies import CascadeRouting, FittedLambda, OptimalCascade, fit_lambda
from cascade_routing.policies.pool import PooledPolicy
from cascade_routing.policies.registry import make_policy
from engine_helpers import make_data, synthetic_pair


class CheapAnswerTells:
    """Ex-ante every query looks the same (each model's mean quality); the cheap model's answer reveals
    its quality, the dear model's says nothing. Routing cannot tell queries apart, and under these
    beliefs cascade routing's first step is routing; a cascade that runs the cheap model first can."""

    def __init__(self, quality):
        self.quality = torch.as_tensor(quality, dtype=torch.float32)
        self.prior = self.quality.mean(0)
        self.models = [f"m{j}" for j in range(quality.shape[1])]

    def estimate(self, queries, ran):
        prior = self.prior.expand(len(queries), -1)
        tells = torch.zeros_like(ran)
        tells[:, 0] = True
        return QualityEstimate(torch.where(ran & tells, self.quality[queries], prior))


def _two_models(n=400, seed=0):
    rng = np.random.default_rng(seed)
    quality = np.stack([(rng.random(n) < 0.6), (rng.random(n) < 0.85)], 1).astype(float)
    cost = np.array([1e-4, 4e-3])[None, :] * rng.uniform(0.9, 1.1, (n, 2))
    return quality, cost


def test_the_cascade_replaces_cascade_routing_where_it_is_clearly_better_and_runs_as_fitted():
    quality, cost = _two_models()
    qe = CheapAnswerTells(quality)
    _, ce = synthetic_pair(quality, cost, "low", fit_rows=200, cost_noise="low")
    # above the dearer model's cost: λ = 0, and cascade routing (first step = routing under these
    # beliefs) sends every query there; the cascade runs the cheap model first and escalates only
    # when its answer is wrong
    budget = 1.2 * float(cost.mean(0)[1])
    policy = make_policy("cascade_routing", num_samples=16, step_ratios=None)
    fit = fit_lambda(policy, qe, ce, quality, cost, budget, rows=torch.arange(len(quality)))
    assert fit.cascade and fit.models is None and fit.info["chosen_by"].startswith("paired bootstrap")
    assert fit.calibration_quality == pytest.approx(fit.info["cascade_score"])
    assert fit.calibration_quality > fit.info["shape_scores"][0] and fit.calibration_quality > fit.info["routing_score"]
    guarded = simulate(policy, qe, ce, quality, cost, FittedLambda.from_dict(fit.to_dict()))
    plain = dataclasses.replace(fit, cascade=False)
    cascade = simulate(OptimalCascade(num_samples=16), qe, ce, quality, cost, plain)
    assert torch.equal(guarded.ran, cascade.ran) and torch.equal(guarded.answer, cascade.answer)
    assert bool(guarded.ran[:, 0].all())  # the chain's first model runs for every query
    assert guarded.mean_quality == pytest.approx(fit.calibration_quality)


def test_an_informative_cascade_routing_keeps_its_fit_and_records_the_cascade_score():
    quality, cost = make_data(n=300, m=4, seed=5)
    qe, ce = synthetic_pair(quality, cost, "low", fit_rows=150)
    budget = float(cost.mean(0)[2])
    fit = fit_lambda(make_policy("cascade_routing", num_samples=16, step_ratios=None), qe, ce, quality, cost, budget,
                     rows=torch.arange(len(quality)))
    assert not fit.cascade and fit.info["cascade_score"] < fit.calibration_quality
    # a budget below the cascade's chain head (pool (1, 2, 3): model 1) has no cascade candidate
    pooled = make_policy("cascade_routing", num_samples=16, step_ratios=None, pool=(1, 2, 3))
    low = 0.5 * float(cost.mean(0)[0] + cost.mean(0)[1])
    below = fit_lambda(pooled, qe, ce, quality, cost, low, rows=torch.arange(len(quality)))
    assert not below.cascade and "cascade_score" not in below.info and "single_model" in below.info


def test_for_fit_runs_the_pooled_cascade_only_for_a_cascade_fit():
    cr = CascadeRouting(num_samples=8, seed=3, pool=(0, 2))
    plain = FittedLambda(torch.ones(1), torch.ones(1))
    assert cr.for_fit(plain) is cr
    runs = cr.for_fit(dataclasses.replace(plain, cascade=True))
    assert isinstance(runs, PooledPolicy) and runs.pool == (0, 2) and isinstance(runs.inner, OptimalCascade)
    assert runs.inner.num_samples == 8 and runs.inner.seed == 3
    assert isinstance(CascadeRouting().cascade_policy(), OptimalCascade)
    back = FittedLambda.from_dict(dataclasses.replace(plain, cascade=True).to_dict())
    assert back.cascade and "cascade" not in plain.to_dict()
