"""Input validation of the engine (an audit's findings): bad input is a PolicyError that names the
problem, never a hang, a raw torch error or a silent wrong answer; valid input decides as before.

1. non-finite / out-of-range ground truth in fit_lambda(s) and simulate (an infinite cost made the
   bisection's starting scale 0 and ``hi·4`` looped forever), and a bisection bracket that cannot grow;
2. an infinite quality std or cov in ``decide`` (cascade routing silently ran nothing);
3. a per-step λ shape whose mean cost is not monotone in the scale: the budget is still met on the
   calibration rows at the returned bracket;
4. negative costs, model counts that differ from the estimators', bad row ids, no queries, no models;
5. ``select`` checks its inputs like ``decide`` (shape, bool ``ran``, finite post-hoc means of run models);
6. ``max_depth < 1`` is refused by every policy that takes one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies import (
    CascadeRouting,
    FittedLambda,
    OptimalCascade,
    PolicyError,
    Routing,
    ThresholdCascade,
    fit_lambda,
    select_best_ran,
)
from cascade_routing.policies.fitting import fit_lambdas
from cascade_routing.policies.lambda_search import _bisect, drive, scale_search
from cascade_routing.policies.rollout import simulate

from engine_helpers import make_data, synthetic_pair

POLICIES = [Routing(), ThresholdCascade(), OptimalCascade(num_samples=16), CascadeRouting(num_samples=16)]
IDS = ["routing", "threshold", "optimal_cascade", "cascade_routing"]


@pytest.fixture(scope="module")
def data():
    quality, cost = make_data(60, 3, seed=1)
    qe, ce = synthetic_pair(quality, cost, "medium", 60)
    return quality, cost, qe, ce


def _beliefs(b: int = 2, m: int = 3):
    mean = torch.tensor([[0.5, 0.6, 0.9]]).expand(b, m).clone()
    std = torch.full((b, m), 0.1)
    cost = torch.tensor([[1e-4, 2e-4, 1e-3]]).expand(b, m).clone()
    return mean, std, cost, torch.zeros(b, m, dtype=torch.bool)


# ----------------------------------------------------------------------------- 1. ground truth, bisection
@pytest.mark.parametrize("field,value,match", [
    ("cost", math.inf, r"calibration cost must be finite and >= 0; row 3, model 2 has inf"),
    ("cost", -1e-4, r"calibration cost must be finite and >= 0; row 3, model 2 has -0.0001"),
    ("quality", math.nan, r"calibration quality must be finite and in \[0, 1\]; row 3, model 2 has NaN"),
    ("quality", math.inf, r"calibration quality .* has inf"),
    ("quality", 1.5, r"calibration quality must be finite and in \[0, 1\]; row 3, model 2 has 1.5"),
])
def test_fit_lambda_refuses_bad_ground_truth(data, field, value, match):
    quality, cost, qe, ce = data
    q, c = quality.copy(), cost.copy()
    (q if field == "quality" else c)[3, 2] = value
    with pytest.raises(PolicyError, match=match):  # an infinite cost used to hang here
        fit_lambda(CascadeRouting(num_samples=16), qe, ce, q, c, 1e-3)
    with pytest.raises(PolicyError, match=match):
        fit_lambdas(Routing(), qe, ce, q, c, [1e-3, 2e-3])


@pytest.mark.parametrize("field,value,match", [
    ("cost", math.inf, r"ground-truth cost must be finite and >= 0; row 3, model 2 has inf"),
    ("cost", -1e-4, r"ground-truth cost must be finite and >= 0; row 3, model 2"),
    ("quality", math.nan, r"ground-truth quality .* has NaN"),
    ("quality", -0.5, r"ground-truth quality must be finite and in \[0, 1\]; row 3, model 2 has -0.5"),
])
def test_simulate_refuses_bad_ground_truth(data, field, value, match):
    quality, cost, qe, ce = data
    q, c = quality.copy(), cost.copy()
    (q if field == "quality" else c)[3, 2] = value
    with pytest.raises(PolicyError, match=match):  # an infinite cost used to give mean_cost inf
        simulate(CascadeRouting(num_samples=16), qe, ce, q, c, 10.0)


def test_bisection_refuses_a_bracket_that_cannot_grow(data):
    """hi = 0 stays 0 under hi·4 (hi = NaN stays NaN): refused at once instead of looping forever."""
    v = torch.ones(1, dtype=torch.float64)
    for lo, hi in ((0.0, 0.0), (0.0, math.nan), (0.0, math.inf), (2.0, 1.0)):
        gen = _bisect(Routing(), v, None, {}, 1e-3, lo, hi, 40, 1e-5)
        with pytest.raises(PolicyError, match="bracket must satisfy 0 <= lo < hi"):
            next(gen)
    # the search itself, handed an infinite cost behind fit_lambda's back: 1 / mean = 0
    quality, cost, qe, ce = data
    bad = cost.copy()
    bad[0, 0] = math.inf
    u = torch.rand(len(quality), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    search = scale_search(Routing(), bad, 1e-3, None, u, 40, 1e-5)
    with pytest.raises(PolicyError, match="bracket"):
        drive([search], Routing(), qe, ce, quality, cost, u, None, {})


# ----------------------------------------------------------------------------- 2. infinite std / cov
@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_infinite_std_or_cov_is_refused(policy):
    mean, std, cost, ran = _beliefs()
    all_inf = std.clone().fill_(math.inf)
    one_inf = std.clone()
    one_inf[1, 1] = math.inf
    with pytest.raises(PolicyError, match="infinite value in the quality std estimate"):
        policy.decide(QualityEstimate(mean, std=all_inf), cost, ran, 1.0)
    with pytest.raises(PolicyError, match=r"quality std estimate \(first at batch row 1\)"):
        policy.decide(QualityEstimate(mean, std=one_inf), cost, ran, 1.0)
    with pytest.raises(PolicyError, match="infinite value in the quality cov estimate"):
        policy.decide(QualityEstimate(mean, cov=torch.diag_embed(all_inf)), cost, ran, 1.0)
    with pytest.raises(PolicyError, match="infinite value in the quality mean"):
        policy.decide(QualityEstimate(mean.masked_fill(ran.logical_not(), -math.inf), std=std), cost, ran, 1.0)


def test_infinite_std_no_longer_runs_nothing_silently():
    """The audit's repro: cascade routing returned [-1] and simulate answered -1 at quality 0, cost 0."""
    mean = torch.tensor([[0.5, 0.6, 0.9]])
    cost = torch.tensor([[1e-4, 2e-4, 1e-3]])
    with pytest.raises(PolicyError, match="quality std"):
        CascadeRouting().decide(QualityEstimate(mean, std=torch.full((1, 3), math.inf)), cost,
                                torch.zeros(1, 3, dtype=torch.bool), 1.0)

    class InfStd:
        models = ["a", "b", "c"]

        def estimate(self, q, ran):
            return QualityEstimate(mean.expand(len(q), 3).clone(),
                                   std=torch.where(ran, 0.0, math.inf).expand(len(q), 3).float())

    class Cost:
        models = ["a", "b", "c"]

        def estimate(self, q, ran):
            return cost.expand(len(q), 3).clone()

    with pytest.raises(PolicyError, match="infinite value in the quality std"):
        simulate(CascadeRouting(), InfStd(), Cost(), np.ones((5, 3)), cost.double().numpy().repeat(5, 0), 1.0)


# ----------------------------------------------------------------------------- 3. non-monotone λ shape
class _PlanEstimator:
    """Prior beliefs m0 ~ N(0.3, 0.4), m1 = 0.6, m2 = 0.95 (std 0); a run model's realised quality."""

    models = ["m0", "m1", "m2"]

    def __init__(self, quality: np.ndarray) -> None:
        self.y = torch.as_tensor(quality, dtype=torch.float64)

    def estimate(self, queries, ran):
        b = len(queries)
        prior = torch.tensor([0.3, 0.6, 0.95], dtype=torch.float64).expand(b, 3)
        std = torch.tensor([0.4, 0.0, 0.0], dtype=torch.float64).expand(b, 3)
        return QualityEstimate(torch.where(ran, self.y[queries], prior), std=torch.where(ran, 0.0, std))


class _ExactCost:
    models = ["m0", "m1", "m2"]

    def __init__(self, cost: np.ndarray) -> None:
        self.c = torch.as_tensor(cost, dtype=torch.float64)

    def estimate(self, queries, ran):
        return self.c[queries]


def test_shape_fit_meets_budget_at_bracket_when_cost_is_not_monotone():
    """With λ = (s, 100·s) a dearer escalation makes the stronger first model the better plan: the
    plan "m0, then maybe m1" (realised cost 1: escalation is then too dear) gives way to "m1 alone"
    (cost 2) as s grows, and "m2" (cost 20) sits between two cost-1 stretches. The bisection still
    returns a bracket whose upper end meets the budget on the calibration rows, and so does the mix."""
    n = 20
    quality = np.tile([0.0, 0.6, 0.95], (n, 1))
    quality[::2, 0] = 0.9
    cost = np.tile([1.0, 2.0, 20.0], (n, 1))
    qe, ce = _PlanEstimator(quality), _ExactCost(cost)
    policy = CascadeRouting()
    v = torch.tensor([1.0, 100.0], dtype=torch.float64)

    def mean_cost(lam_low, lam_high=None, gamma=0.0, uniforms=None):
        lam_high = lam_low if lam_high is None else lam_high
        return simulate(policy, qe, ce, quality, cost, FittedLambda(lam_low, lam_high, gamma),
                        uniforms=uniforms).mean_cost

    curve = [mean_cost(s * v) for s in (0.005, 0.01, 0.03, 0.1, 0.4)]
    assert curve == pytest.approx([1.0, 20.0, 1.0, 2.0, 1.0])  # not monotone in the scale
    u = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for budget in (1.5, 2.5, 5.0):
        for correction in (False, True):
            f = fit_lambda(policy, qe, ce, quality, cost, budget, uniforms=u, shape=v,
                           overshoot_correction=correction)
            target = budget - f.info.get("overshoot", 0.0)
            assert mean_cost(f.lam_high) <= target + 1e-9  # the bracket's upper end meets the target
            assert mean_cost(f.lam_low) > target  # and its lower end does not
            assert f.calibration_cost <= budget + 1e-9
            assert mean_cost(f.lam_low, f.lam_high, f.gamma, u) == pytest.approx(f.calibration_cost)


# ----------------------------------------------------------------------------- 4. other bad inputs
@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_negative_cost_estimate_and_no_models_are_refused(policy):
    mean, std, cost, ran = _beliefs()
    neg = cost.clone()
    neg[1, 0] = -1e-3
    with pytest.raises(PolicyError, match="negative cost estimate .* at batch row 1, model 0"):
        policy.decide(QualityEstimate(mean, std=std), neg, ran, 1.0)
    with pytest.raises(PolicyError, match="M = 0"):
        policy.decide(QualityEstimate(mean[:, :0], std=std[:, :0]), cost[:, :0], ran[:, :0], 1.0)
    with pytest.raises(PolicyError, match="M = 0"):
        policy.select(QualityEstimate(mean[:, :0]), ran[:, :0])
    # an empty batch is fine
    assert policy.decide(QualityEstimate(mean[:0], std=std[:0]), cost[:0], ran[:0], 1.0).tolist() == []


def test_model_count_mismatch_names_both_shapes(data):
    quality, cost, qe, ce = data
    with pytest.raises(PolicyError, match=r"M=2 model columns but the quality estimator has 3 models"):
        fit_lambda(CascadeRouting(num_samples=16), qe, ce, quality[:, :2], cost[:, :2], 1e-3)
    with pytest.raises(PolicyError, match=r"M=2 model columns but the quality estimator has 3 models"):
        simulate(Routing(), qe, ce, quality[:, :2], cost[:, :2], 1.0)

    class Anonymous:  # no ``models`` list: checked on its output instead
        def estimate(self, q, ran):
            return ce.estimate(q, ran)[:, :2]

    with pytest.raises(PolicyError, match=r"cost estimator returned shape \(60, 2\), expected \[B=60, M=3\]"):
        simulate(Routing(), qe, Anonymous(), quality, cost, 1.0)
    with pytest.raises(PolicyError, match=r"M >= 1"):
        fit_lambda(Routing(), qe, ce, quality[:, :0], cost[:, :0], 1e-3)
    with pytest.raises(PolicyError, match=r"M >= 1"):
        simulate(Routing(), qe, ce, quality[:, :0], cost[:, :0], 1.0)


def test_bad_row_ids_and_empty_input(data):
    quality, cost, qe, ce = data
    q, c = quality[:5], cost[:5]
    with pytest.raises(PolicyError, match=r"rows must lie >= 0, got -1 at position 4"):  # used to read the table's last row
        simulate(Routing(), qe, ce, q, c, 1.0, rows=torch.tensor([0, 1, 2, 3, -1]))
    with pytest.raises(PolicyError, match=r"could not look up query rows 0\.\.999"):
        simulate(Routing(), qe, ce, q, c, 1.0, rows=torch.tensor([0, 1, 2, 3, 999]))
    with pytest.raises(PolicyError, match=r"rows must lie >= 0, got -2 at position 1"):
        fit_lambda(Routing(), qe, ce, q, c, 1e-3, rows=torch.tensor([0, -2, 2, 3, 4]))
    with pytest.raises(PolicyError, match=r"rows must be \[N=5\]"):  # not N·(scales per round)
        fit_lambda(Routing(), qe, ce, q, c, 1e-3, rows=torch.arange(4))
    with pytest.raises(PolicyError, match="no queries to simulate"):  # used to give mean_quality nan
        simulate(Routing(), qe, ce, quality[:0], cost[:0], 1.0)
    with pytest.raises(PolicyError, match="N >= 1"):
        fit_lambda(Routing(), qe, ce, quality[:0], cost[:0], 1e-3)
    # valid explicit rows still simulate as the default ones
    rows = torch.arange(5)
    assert simulate(Routing(), qe, ce, q, c, 1e3, rows=rows).answer.tolist() == \
        simulate(Routing(), qe, ce, q, c, 1e3).answer.tolist()


# ----------------------------------------------------------------------------- 5. select
@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_select_checks_its_inputs(policy):
    mean, _, _, ran = _beliefs()
    all_ran = torch.ones_like(ran)
    with pytest.raises(PolicyError, match="ran must be bool"):
        policy.select(QualityEstimate(mean), all_ran.float())
    with pytest.raises(PolicyError, match=r"ran must be bool \[B=2, M=3\].*\(2, 2\)"):
        policy.select(QualityEstimate(mean), all_ran[:, :2])
    nan = mean.clone()
    nan[1, 1] = math.nan
    with pytest.raises(PolicyError, match="post-hoc quality mean nan of model 1, which ran, at batch row 1"):
        policy.select(QualityEstimate(nan), all_ran)
    inf = mean.clone()
    inf[0, 2] = math.inf
    with pytest.raises(PolicyError, match="model 2, which ran, at batch row 0"):
        policy.select(QualityEstimate(inf), all_ran)
    # a NaN belief about a model that did not run does not matter
    prefix = torch.tensor([[True, False, False], [True, True, False]])
    nan_unrun = mean.clone()
    nan_unrun[:, 2] = math.nan
    assert policy.select(QualityEstimate(nan_unrun), prefix).tolist() == policy.select(QualityEstimate(mean),
                                                                                        prefix).tolist()


def test_select_nan_is_no_longer_the_answer():
    """The audit's repro: argmax took the NaN post-hoc mean of model 1 for the best answer."""
    est = QualityEstimate(torch.tensor([[0.2, math.nan, 0.9]]))
    with pytest.raises(PolicyError, match="model 1"):
        CascadeRouting().select(est, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(PolicyError, match="model 1"):
        select_best_ran(est, torch.ones(1, 3, dtype=torch.bool))
    ok = QualityEstimate(torch.tensor([[0.2, 0.95, 0.9], [0.2, 0.1, 0.3]]))
    ran = torch.tensor([[True, True, True], [True, True, False]])
    assert CascadeRouting().select(ok, ran).tolist() == [1, 0]


def test_threshold_cascade_select_needs_a_prefix():
    mean = QualityEstimate(torch.tensor([[0.2, 0.5, 0.9]] * 3))
    ran = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    assert ThresholdCascade().select(mean, ran).tolist() == [1, -1, 2]
    with pytest.raises(PolicyError, match="prefix of the model order; row 0"):
        ThresholdCascade().select(mean, torch.tensor([[True, False, True]] * 3))


# ----------------------------------------------------------------------------- 6. max_depth
@pytest.mark.parametrize("make", [CascadeRouting, OptimalCascade, ThresholdCascade], ids=["cr", "optimal", "threshold"])
def test_max_depth_below_one_is_refused(make):
    for depth in (0, -1):
        with pytest.raises(PolicyError, match=f"max_depth must be >= 1, got {depth}"):
            make(max_depth=depth)
    assert make(max_depth=1).max_steps(3) == 1
    assert make().max_steps(3) == 3


def test_a_non_psd_covariance_is_a_policy_error_naming_the_row():
    from cascade_routing.policies import CascadeRouting, PolicyError

    mean = torch.tensor([[0.5, 0.6], [0.4, 0.7]])
    cov = torch.tensor([[[0.01, 0.0], [0.0, 0.01]], [[0.01, 0.5], [0.5, 0.01]]])  # row 1: not PSD
    ran = torch.zeros(2, 2, dtype=torch.bool)
    with pytest.raises(PolicyError, match=r"covariance of batch row 1 is not positive semi-definite"):
        CascadeRouting(num_samples=16).decide(QualityEstimate(mean, cov=cov), torch.ones(2, 2), ran, 0.1)


def test_an_empty_stream_is_refused():
    from cascade_routing.evaluation.online import simulate_controlled
    from cascade_routing.policies import FittedLambda, PolicyError, Routing

    fitted = FittedLambda(torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(PolicyError, match="empty stream"):
        simulate_controlled(Routing(), None, None, torch.zeros(0, 2), torch.zeros(0, 2), fitted, 0.1,
                            uniforms=torch.zeros(0))
