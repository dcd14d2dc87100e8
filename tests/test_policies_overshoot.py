"""The overshoot correction of λ fitting (policies/overshoot.py, lambda_search.scale_search)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.policies.cascades import ThresholdCascade
from cascade_routing.policies.fitting import fit_lambdas
from cascade_routing.policies.overshoot import expected_overshoot, window_scales
from cascade_routing.policies.rollout import simulate

from engine_helpers import make_data, synthetic_pair


def _binary(n: int, expensive: int, price: float = 10.0) -> np.ndarray:
    cost = np.zeros(n)
    cost[:expensive] = price
    return cost


def test_binary_jumps_give_the_bernoulli_formula():
    # 100 queries cost 0 or 10; the share p paying 10 rises from 0.2 to 0.3 across the window around B = 2.5:
    # (1/2N) dσ²/dC = c (1 − 2p) / (2N) at p = 0.25
    points = {1.0: _binary(100, 30), 2.0: _binary(100, 25), 3.0: _binary(100, 20)}
    assert expected_overshoot(points, 2.5) == pytest.approx(10 * (1 - 2 * 0.25) / 200)


def test_no_overshoot_when_every_query_moves_alike_or_nothing_moves():
    alike = {1.0: np.full(50, 3.0), 2.0: np.full(50, 2.0)}  # the variance does not grow with the mean
    assert expected_overshoot(alike, 2.5) == pytest.approx(0.0, abs=1e-12)
    still = {1.0: _binary(50, 10), 2.0: _binary(50, 10)}
    assert expected_overshoot(still, 2.0) == 0.0


def test_overshoot_is_capped_at_the_window():
    points = {1.0: _binary(4, 2, price=1000.0), 2.0: _binary(4, 1, price=1000.0)}  # jumps of 250 at B = 300
    assert expected_overshoot(points, 300.0, window=0.1) == pytest.approx(30.0)


def test_window_scales_fill_the_gaps_that_the_window_edges_fall_in():
    # mean costs 4, 2.5, 1 at scales 0.5, 4, 8 around B = 2.5: both edges lie beyond B(1 ± 0.2)
    points = {0.5: _binary(100, 40), 4.0: _binary(100, 25), 8.0: _binary(100, 10)}
    extra = window_scales(points, 2.5, window=0.1, count=4)
    upper, lower = extra[:4], extra[4:]
    assert np.allclose(upper, np.geomspace(0.5, 4.0, 6)[1:-1]) and np.allclose(lower, np.geomspace(4.0, 8.0, 6)[1:-1])
    # edges within B(1 ± 0.2) (here 2.9 and 2.1): nothing to add; one scale: no window at all
    close = {0.5: _binary(100, 29), 4.0: _binary(100, 25), 8.0: _binary(100, 21)}
    assert window_scales(close, 2.5, window=0.1) == []
    assert window_scales({1.0: _binary(10, 5)}, 2.5) == []
    # from s = 0 the gap is filled linearly
    assert np.allclose(window_scales({0.0: _binary(100, 40), 4.0: _binary(100, 25)}, 2.5, count=3), [1.0, 2.0, 3.0])


@pytest.fixture(scope="module")
def heavy_tailed():
    """Three models, the last 200 times the first's price: a threshold cascade escalates in big jumps."""
    quality, cost = make_data(n=4000, m=3, seed=1)
    cost[:, 2] *= 4
    qe, ce = synthetic_pair(quality, cost, "medium", fit_rows=500)
    uniforms = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return quality, cost, qe, ce, uniforms


def _held_out_ratios(heavy_tailed, correct: bool, seeds: int = 50, fit_size: int = 60):
    quality, cost, qe, ce, uniforms = heavy_tailed
    budgets = [1e-3, 2e-3]
    ratios, fits = [], []
    for seed in range(seeds):
        perm = np.random.default_rng(seed).permutation(np.arange(500, 4000))
        fit, held = perm[:fit_size], perm[fit_size:]
        for b, f in zip(budgets, fit_lambdas(ThresholdCascade(), qe, ce, quality[fit], cost[fit], budgets,
                                             uniforms=uniforms[fit], rows=torch.as_tensor(fit),
                                             overshoot_correction=correct)):
            res = simulate(ThresholdCascade(), qe, ce, quality[held], cost[held], f, uniforms[held],
                           torch.as_tensor(held), {})
            ratios.append(float(res.mean_cost) / b)
            fits.append(f)
    return np.array(ratios), fits


def test_corrected_fits_spend_the_budget_on_new_queries(heavy_tailed):
    plain, plain_fits = _held_out_ratios(heavy_tailed, correct=False)
    corrected, fits = _held_out_ratios(heavy_tailed, correct=True)
    # meeting the budget on 60 calibration queries overspends it on new ones ...
    assert plain.mean() > 1.05
    assert all(f.calibration_cost <= f.budget * (1 + 1e-9) for f in plain_fits)
    # ... the corrected fit aims below the budget on the calibration rows and lands near it
    assert abs(corrected.mean() - 1) < abs(plain.mean() - 1) / 2
    assert np.mean([f.info["overshoot"] > 0 for f in fits]) > 0.9
    for f in fits:
        assert f.calibration_cost <= (f.budget - f.info["overshoot"]) * (1 + 1e-9) + 1e-15


def test_a_corrected_target_below_the_floor_fits_the_floor_policy(heavy_tailed):
    quality, cost, qe, ce, uniforms = heavy_tailed
    fit = np.arange(500, 560)
    floor = float(cost[fit, 0].mean())  # the threshold cascade at λ = ∞ runs the chain's first model only
    budget = floor * 1.05  # one more escalation on these 60 rows costs about 15% of the floor
    (plain,) = fit_lambdas(ThresholdCascade(), qe, ce, quality[fit], cost[fit], [budget], uniforms=uniforms[fit],
                           rows=torch.as_tensor(fit), overshoot_correction=False)
    (corrected,) = fit_lambdas(ThresholdCascade(), qe, ce, quality[fit], cost[fit], [budget], uniforms=uniforms[fit],
                               rows=torch.as_tensor(fit))
    # meeting the budget on the rows: the smallest λ at which none of them escalates (new queries would)
    assert not plain.info.get("floor") and float(plain.lam_high[0]) < 1e3
    assert budget - corrected.info["overshoot"] < floor
    assert corrected.info["floor"] and corrected.calibration_cost == pytest.approx(floor)
    assert corrected.budget == budget


class _Simulated:
    """A simulation result of fixed per-query costs (quality = 1 everywhere)."""

    def __init__(self, cost: np.ndarray) -> None:
        self.cost = torch.as_tensor(cost, dtype=torch.float64)
        self.quality = torch.ones_like(self.cost)
        self.mean_cost, self.mean_quality = float(self.cost.mean()), 1.0


def _drive(search, cost_at):
    request = next(search)
    while True:
        try:
            request = search.send([_Simulated(cost_at(s)) for s in request.scales])
        except StopIteration as stop:
            return stop.value


def test_a_target_below_a_floor_that_overspends_keeps_the_budgets_own_fit():
    # 10 queries cost 10 below their own scale threshold and 1.45 above it; at λ = MAX_LAMBDA (the floor policy)
    # every query costs 5: the cost is not monotone in λ, and the corrected target (below 1.45) is unreachable
    from cascade_routing.policies.lambda_search import MAX_LAMBDA, scale_search

    thresholds = np.geomspace(1.0, 100.0, 10)

    def cost_at(scale: float) -> np.ndarray:
        return np.full(10, 5.0) if scale >= MAX_LAMBDA else np.where(scale < thresholds, 10.0, 1.45)

    uniforms = torch.linspace(0.05, 0.95, 10, dtype=torch.float64)
    fit = _drive(scale_search(ThresholdCascade(), np.ones((10, 2)), 1.5, None, uniforms, 40, 1e-5), cost_at)
    plain = _drive(scale_search(ThresholdCascade(), np.ones((10, 2)), 1.5, None, uniforms, 40, 1e-5,
                                overshoot_correction=False), cost_at)
    assert not fit.info.get("floor") and fit.info["overshoot"] == 0.0
    assert fit.calibration_cost == pytest.approx(plain.calibration_cost) and fit.calibration_cost <= 1.5
    assert torch.equal(fit.lam_high, plain.lam_high) and fit.gamma == plain.gamma
