"""Per-step λ shapes of cascade routing: chosen on calibration rows only, served as fitted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.evaluation import simulate
from cascade_routing.evaluation.sweep import budget_sweep
from cascade_routing.policies import CascadeRouting, FittedLambda, PolicyError, Routing, fit_lambda, query_uniforms
from cascade_routing.policies.fitting import choose_significant
from cascade_routing.policies.registry import CASCADE_ROUTING_STEP_RATIOS, make_policy
from cascade_routing.policies.significance import significantly_better
from cascade_routing.serving import Answer, CascadeRouter
from engine_helpers import make_data, synthetic_pair
from tests.serving_helpers import FEATURE_NAMES, bind, offline_features, synthetic_dataset

SHAPES = ((1.0,), (1.0, 0.5), (1.0, 3.0), (1.0, 1e6))


class MeanOnly:
    """Drops the uncertainty of another estimator (E[max] of a set = max of its means)."""

    def __init__(self, base):
        self.base, self.models = base, base.models

    def estimate(self, queries, ran):
        return QualityEstimate(self.base.estimate(queries, ran).mean)


@pytest.fixture(scope="module")
def data():
    quality, cost = make_data(n=240)
    return (quality, cost, *synthetic_pair(quality, cost, "medium", fit_rows=80, cost_noise="low"))


def test_fit_keeps_the_default_shape_unless_another_is_significantly_better(data):
    quality, cost, qe, ce = data
    rows = np.arange(120)
    u = torch.rand(len(rows), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    policy = CascadeRouting(num_samples=32, lambda_shapes=SHAPES)
    plain = CascadeRouting(num_samples=32)
    outcomes = set()
    for k in (1, 2, 3):
        budget = float(cost[rows].mean(0)[k])
        each = [fit_lambda(plain, qe, ce, quality[rows], cost[rows], budget, uniforms=u, rows=torch.as_tensor(rows),
                           shape=torch.tensor(s)) for s in SHAPES]
        chosen = fit_lambda(policy, qe, ce, quality[rows], cost[rows], budget, uniforms=u, rows=torch.as_tensor(rows))
        wins = [i for i in range(1, len(SHAPES)) if each[i].calibration_quality > each[0].calibration_quality
                and significantly_better(each[i].info["per_query_quality"], each[0].info["per_query_quality"])]
        expect = max(wins, key=lambda i: (each[i].calibration_quality, -i)) if wins else 0
        assert torch.equal(chosen.lam_low, each[expect].lam_low) and torch.equal(chosen.lam_high, each[expect].lam_high)
        assert chosen.gamma == each[expect].gamma
        assert chosen.info["shape_scores"] == [round(f.calibration_quality, 6) for f in each]
        assert chosen.calibration_cost <= budget * (1 + 1e-9)
        sim = simulate(policy, qe, ce, quality[rows], cost[rows], chosen, u, torch.as_tensor(rows))
        assert abs(sim.mean_quality - chosen.calibration_quality) < 1e-12
        outcomes.add(expect == 0)
        # a mere lead inside the noise never displaces the default
        best_raw = max(range(len(SHAPES)), key=lambda i: (each[i].calibration_quality, -i))
        if best_raw not in wins:
            assert expect == 0
    assert outcomes, "no budget was checked"


def test_choose_significant_needs_more_than_noise():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 400).astype(float)

    def fit(q):
        return FittedLambda(torch.tensor([1.0]), torch.tensor([1.0]), 0.0, 1.0, 1.0, float(q.mean()),
                            {"per_query_quality": q})

    noisy = base.copy()
    noisy[rng.choice(400, 3, replace=False)] = 1.0  # +3 queries of 400: a lead, not a win
    flips = np.flatnonzero(base == 0)[:60]
    clear = base.copy()
    clear[flips] = 1.0  # +60 queries, none worse
    default = fit(base)
    assert choose_significant([default, fit(noisy)]) is default
    assert default.info["chosen_by"] == "default"
    winner = fit(clear)
    assert choose_significant([default, fit(noisy), winner]) is winner
    assert winner.info["chosen_by"].startswith("paired bootstrap")


def test_shape_selection_reads_only_the_fit_rows(data):
    """budget_sweep: corrupting the test rows' quality changes no fitted λ (selection is on fit rows)."""
    quality, cost, qe, ce = data
    fit_rows, test_rows = np.arange(120), np.arange(120, 240)
    budgets = np.array([float(cost[fit_rows].mean(0)[1]), float(cost[fit_rows].mean(0)[2])])
    policy = CascadeRouting(num_samples=32, lambda_shapes=SHAPES)
    a = budget_sweep(policy, qe, ce, quality, cost, fit_rows, test_rows, budgets, num_resamples=2)
    flipped = quality.copy()
    flipped[test_rows] = 1.0 - flipped[test_rows]
    b = budget_sweep(policy, qe, ce, flipped, cost, fit_rows, test_rows, budgets, num_resamples=2)
    for fa, fb in zip(a.fitted, b.fitted):
        assert torch.equal(fa.lam_low, fb.lam_low) and torch.equal(fa.lam_high, fb.lam_high)
        assert fa.info["shape"] == fb.info["shape"]
    assert not np.allclose(a.qualities, b.qualities)


def test_huge_step_ratio_is_routing_without_uncertainty(data):
    """λ = (s, κ·s) with κ → ∞ and mean-only beliefs: cascade routing runs exactly routing's model."""
    quality, cost, qe, ce = data
    qm = MeanOnly(qe)
    for s in (50.0, 200.0, 800.0):
        cr = simulate(CascadeRouting(num_samples=16), qm, ce, quality, cost, torch.tensor([s, 1e12]))
        rt = simulate(Routing(), qm, ce, quality, cost, s)
        assert torch.equal(cr.ran, rt.ran)
        one = simulate(CascadeRouting(num_samples=16), qm, ce, quality, cost, torch.tensor([s]))
        assert int(one.num_run.max()) > 1 or s == 800.0  # with one λ it does escalate at low λ


def test_make_policy_shapes_and_validation():
    p = make_policy("cascade_routing")
    assert p.lambda_shapes == tuple((1.0,) if k == 1.0 else (1.0, k) for k in CASCADE_ROUTING_STEP_RATIOS)
    assert make_policy("cascade_routing", step_ratios=None).lambda_shapes is None
    assert make_policy("routing").lambda_shapes is None
    with pytest.raises(PolicyError, match="λ shape"):
        CascadeRouting(lambda_shapes=((1.0, -1.0),))


def test_per_step_lambda_round_trips_and_serves_like_simulation():
    ds = synthetic_dataset(40)
    qe, ce = bind(ds.queries, ds.responses, offline_features(ds), ds.tasks)
    policy = CascadeRouting(num_samples=32, lambda_shapes=((1.0, 0.25), (1.0, 4.0)))
    fitted = fit_lambda(policy, qe, ce, ds.quality, ds.cost, float(ds.cost.mean(0)[1]), queries=ds.queries)
    assert fitted.lam_low.numel() == 2
    back = FittedLambda.from_dict(fitted.to_dict())
    assert torch.equal(back.lam_low, fitted.lam_low) and back.gamma == fitted.gamma
    sim = simulate(policy, qe, ce, ds.quality, ds.cost, back, query_uniforms(ds.queries))
    router = CascadeRouter(policy, bind, back, ds.models, feature_names=FEATURE_NAMES)
    for i, q in enumerate(ds.queries):
        answers, order = {}, []
        while (model := router.next_model(q, answers)) is not None:
            j = ds.model_index(model)
            answers[model] = Answer(model=model, text=ds.responses[i, j], cost=float(ds.cost[i, j]),
                                    features={k: float(v[i, j]) for k, v in ds.features.items()})
            order.append(j)
        assert order == [j for j in sim.order[i].tolist() if j >= 0]
        assert ds.model_index(router.select(q, answers)) == int(sim.answer[i])


class FixedMeans:
    """Means that do not depend on what ran (enough to pin each step's threshold)."""

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean, self.models = mean, [f"m{j}" for j in range(mean.shape[1])]

    def estimate(self, queries, ran):
        return QualityEstimate(self.mean[torch.as_tensor(queries)])


class FixedCost:
    def __init__(self, cost: torch.Tensor) -> None:
        self.cost = cost

    def estimate(self, queries, ran):
        return self.cost[torch.as_tensor(queries)]


def test_make_policy_gives_the_threshold_cascade_step_shapes_and_none_without_ratios():
    from cascade_routing.policies.cascades import ThresholdCascade

    pooled = make_policy("threshold_cascade", pool=(0, 2))
    assert pooled.lambda_shapes == ((1.0,),) + tuple((1.0, 1.0, k) for k in CASCADE_ROUTING_STEP_RATIOS[1:])
    assert isinstance(pooled.inner, ThresholdCascade) and pooled.inner.lambda_shapes == pooled.lambda_shapes
    assert make_policy("threshold_cascade", step_ratios=None).lambda_shapes is None
    assert make_policy("optimal_cascade").lambda_shapes is None
    with pytest.raises(PolicyError, match="each λ shape must be non-empty"):
        ThresholdCascade(lambda_shapes=((1.0,), (1.0, float("nan"))))


def test_threshold_cascade_reads_the_threshold_of_each_step():
    """λ = (0.1, 0.1, 0.4): continue after the first model iff q̂ < 0.9, after later ones iff q̂ < 0.6."""
    from cascade_routing.policies.cascades import ThresholdCascade

    mean = torch.tensor([[0.85, 0.7, 0.9], [0.95, 0.7, 0.9], [0.5, 0.5, 0.9]])
    quality, cost = torch.ones(3, 3), torch.tensor([[1.0, 2.0, 4.0]]).repeat(3, 1)
    qe, ce = FixedMeans(mean), FixedCost(cost)
    runs = {}
    for name, lam in (("shaped", [0.1, 0.1, 0.4]), ("low", [0.1]), ("high", [0.4])):
        fitted = FittedLambda(torch.tensor(lam), torch.tensor(lam), 0.0)
        runs[name] = simulate(ThresholdCascade(), qe, ce, quality, cost, fitted).ran.sum(1).tolist()
    assert runs["shaped"] == [2, 1, 3]  # 0.85 < 0.9 goes on, then 0.7 >= 0.6 stops; 0.95 stops; 0.5 < 0.6 goes on
    assert runs["low"] == [3, 1, 3] and runs["high"] == [1, 1, 3]


def test_threshold_cascade_shape_is_kept_only_where_it_wins_on_calibration_and_is_served_as_fitted():
    """An over-confident cheap first model: under one threshold the cascade stops there too often; the
    stricter bar after the first model (κ > 1) wins on the calibration rows, by more than the noise."""
    g = torch.Generator().manual_seed(0)
    n = 400
    q1 = (torch.rand(n, generator=g) < 0.5).double()  # the first model is right half the time
    q2 = (torch.rand(n, generator=g) < 0.85).double()
    q3 = torch.ones(n, dtype=torch.float64)
    quality = torch.stack([q1, q2, q3], 1)
    noise = 0.05 * torch.rand(n, 3, generator=g, dtype=torch.float64)
    mean = torch.stack([0.80 + 0.15 * q1, 0.45 + 0.5 * q2, torch.full((n,), 0.99, dtype=torch.float64)], 1) + noise
    cost = torch.tensor([[1.0, 3.0, 20.0]], dtype=torch.float64).repeat(n, 1)
    qe, ce = FixedMeans(mean.clamp(0, 1)), FixedCost(cost)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    shaped = make_policy("threshold_cascade")
    plain = make_policy("threshold_cascade", step_ratios=None)
    budget = 3.5
    chosen = fit_lambda(shaped, qe, ce, quality, cost, budget, uniforms=u)
    constant = fit_lambda(plain, qe, ce, quality, cost, budget, uniforms=u)
    assert chosen.info["shape"][:2] == [1.0, 1.0] and chosen.info["shape"][2] > 1.0
    assert chosen.calibration_quality > constant.calibration_quality + 0.02
    assert chosen.info["chosen_by"].startswith("paired bootstrap")
    assert chosen.calibration_cost <= budget * (1 + 1e-9)
    sim = simulate(shaped, qe, ce, quality, cost, chosen, u)
    assert abs(sim.mean_quality - chosen.calibration_quality) < 1e-12
