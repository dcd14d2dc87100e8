"""The single-model guard of cascade routing: the best model a budget affords, run alone, when it
beats the fitted policy by more than its noise on the calibration rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.evaluation import simulate
from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies import FittedLambda, PolicyError, fit_lambda
from cascade_routing.policies.controller import scale_fitted
from cascade_routing.policies.fitting import single_model_fit
from cascade_routing.policies.registry import make_policy
from cascade_routing.policies.step import decide_step, limited_candidates
from engine_helpers import make_data, synthetic_pair


class Misleading:
    """Estimates that rank the models backwards for every query (ex-ante and post-hoc): every
    estimator-driven choice is bad, and the best model alone is far better."""

    def __init__(self, quality):
        self.quality = torch.as_tensor(quality, dtype=torch.float32)
        self.models = [f"m{j}" for j in range(quality.shape[1])]

    def estimate(self, queries, ran):
        return QualityEstimate(1.0 - self.quality[queries])


def test_the_best_affordable_model_replaces_a_policy_it_clearly_beats_and_runs_alone():
    quality, cost = make_data(n=300, m=4, seed=5)
    _, ce = synthetic_pair(quality, cost, "low", fit_rows=150, cost_noise="low")
    qe = Misleading(quality)
    budget = float(cost.mean(0)[2]) * 1.05  # affords models 0..2, not 3
    fit = fit_lambda(make_policy("cascade_routing", num_samples=16, step_ratios=None), qe, ce, quality, cost, budget,
                     rows=torch.arange(len(quality)))
    best = int(np.argmax(quality.mean(0)[:3]))
    assert fit.models == (best,) and fit.max_depth == 1
    assert fit.calibration_quality == pytest.approx(quality[:, best].mean())
    assert fit.info["single_model"] == {"model": best, "score": round(float(quality[:, best].mean()), 6)}
    assert fit.info["chosen_by"].startswith("paired bootstrap")
    # its λ/γ are the routing candidate's for this budget: what a server falls back to if that model fails
    routing = fit_lambda(make_policy("routing"), qe, ce, quality, cost, budget, rows=torch.arange(len(quality)))
    assert torch.equal(fit.lam_low, routing.lam_low) and torch.equal(fit.lam_high, routing.lam_high)
    assert fit.gamma == routing.gamma
    res = simulate(make_policy("cascade_routing", num_samples=16), qe, ce, quality, cost, FittedLambda.from_dict(fit.to_dict()))
    assert bool(res.ran[:, best].all()) and int(res.num_run.max()) == 1
    assert res.mean_quality == pytest.approx(quality[:, best].mean())


def test_an_informative_policy_keeps_its_fit_and_records_the_single_model_score():
    quality, cost = make_data(n=300, m=4, seed=5)
    qe, ce = synthetic_pair(quality, cost, "low", fit_rows=150)
    fit = fit_lambda(make_policy("cascade_routing", num_samples=16, step_ratios=None), qe, ce, quality, cost,
                     float(cost.mean(0)[2]), rows=torch.arange(len(quality)))
    assert fit.models is None and fit.info["single_model"]["score"] < fit.calibration_quality
    no_guard = fit_lambda(make_policy("cascade_routing", num_samples=16, step_ratios=None, routing_guard=False), qe, ce,
                          quality, cost, float(cost.mean(0)[2]), rows=torch.arange(len(quality)))
    assert "single_model" not in no_guard.info


def test_single_model_fit_chooses_among_the_models_within_the_budget():
    quality = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # means .75 .5 1
    cost = np.array([[1.0, 2.0, 4.0]] * 4)
    assert single_model_fit(quality, cost, 4.0).models == (2,)
    cheap = single_model_fit(quality, cost, 3.9)
    assert cheap.models == (0,) and cheap.calibration_cost == 1.0 and cheap.budget == 3.9
    assert single_model_fit(quality, cost, 0.5) is None
    assert float(cheap.lam_high.max()) == 0.0  # no fallback given: λ 0
    routing = FittedLambda(torch.tensor([3.0]), torch.tensor([4.0]), 0.3)
    with_fallback = single_model_fit(quality, cost, 3.9, fallback=routing)
    assert with_fallback.lam_low.tolist() == [3.0] and with_fallback.lam_high.tolist() == [4.0]
    assert with_fallback.gamma == 0.3 and with_fallback.models == (0,) and with_fallback.max_depth == 1


def test_fitted_models_round_trip_and_are_validated():
    f = FittedLambda(torch.zeros(1), torch.zeros(1), max_depth=1, models=(3,))
    back = FittedLambda.from_dict(f.to_dict())
    assert back.models == (3,) and back.max_depth == 1
    assert "models" not in FittedLambda(torch.zeros(1), torch.zeros(1)).to_dict()
    for bad in ((), (-1,), (1, 1), (0.5,)):
        with pytest.raises(PolicyError, match="models must be distinct model indices"):
            FittedLambda(torch.zeros(1), torch.zeros(1), models=bad)


def test_a_row_whose_fitted_model_is_not_a_candidate_decides_among_its_own():
    own = torch.tensor([[True, True, True], [True, False, True], [False, True, False]])
    limited = limited_candidates(own, (1,), 3, 3)
    assert limited.tolist() == [[False, True, False], [True, False, True], [False, True, False]]
    assert limited_candidates(None, (2,), 2, 3).tolist() == [[False, False, True]] * 2
    with pytest.raises(PolicyError, match="only 3 models"):
        limited_candidates(None, (3,), 1, 3)
    # the decision step: model 1 where it is a candidate, else the policy's own choice among the rest
    est = QualityEstimate(torch.tensor([[0.9, 0.5, 0.1]] * 3))
    fit = FittedLambda(torch.zeros(1), torch.zeros(1), max_depth=1, models=(1,))
    nxt, _ = decide_step(make_policy("routing"), est, torch.ones(3, 3), torch.zeros(3, 3, dtype=torch.bool), fit,
                         torch.zeros(3, dtype=torch.bool), candidates=own)
    assert nxt.tolist() == [1, 0, 1]


def test_the_online_controller_keeps_the_fitted_depth_and_models_when_it_scales_lambda():
    f = FittedLambda(torch.tensor([2.0]), torch.tensor([3.0]), 0.25, budget=1.0, max_depth=1, models=(2,))
    scaled = scale_fitted(f, 1.5)
    assert scaled.lam_low.tolist() == [3.0] and scaled.lam_high.tolist() == [4.5] and scaled.gamma == 0.25
    assert scaled.max_depth == 1 and scaled.models == (2,) and scaled.budget == 1.0
