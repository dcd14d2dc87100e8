"""The online λ controller (PI in log λ over a sliding window) and its offline simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cascade_routing.evaluation import simulate
from cascade_routing.evaluation.online import convergence_index, settling_index, simulate_controlled
from cascade_routing.policies import CascadeRouting, PolicyError, query_uniforms
from cascade_routing.policies.controller import BudgetController, ControllerConfig, scale_fitted
from tests.serving_helpers import bind, offline_features, split_and_fit, synthetic_dataset


def reference_factors(costs, budget, cfg: ControllerConfig) -> list[float]:
    """The module docstring's update rule written out with numpy (λ factor after each cost)."""
    lim = math.log(cfg.max_factor)
    integral, out = 0.0, []
    for n in range(len(costs)):
        e = float(np.mean(costs[max(0, n - cfg.window + 1): n + 1])) / budget - 1.0
        integral = min(lim, max(-lim, integral + cfg.k_i * e))
        u = min(lim, max(-lim, integral + cfg.k_p * min(1.0, max(-1.0, e))))
        out.append(math.exp(u))
    return out


def test_update_rule_matches_reference():
    rng = np.random.default_rng(0)
    costs = rng.lognormal(-8, 1.2, size=700)
    budget = float(np.exp(-8))
    cfg = ControllerConfig(window=20, k_p=0.3, k_i=0.07, max_factor=10.0)
    ctrl = BudgetController(budget, cfg)
    assert ctrl.factor == 1.0 and ctrl.take() == (1.0, 0)
    got = [ctrl.observe(c) for c in costs]
    np.testing.assert_allclose(got, reference_factors(costs, budget, cfg), rtol=1e-9)
    assert ctrl.version == 700
    state = ctrl.state()
    assert state["observed"] == 700 and state["mean_cost"] == pytest.approx(costs.mean())
    assert state["window_mean_cost"] == pytest.approx(costs[-20:].mean())


def test_direction_and_bounds():
    over = BudgetController(1.0, ControllerConfig(window=5, max_factor=4.0))
    for _ in range(500):
        over.observe(3.0)  # spending 3x the budget: λ goes up, to the bound and no further
    assert over.factor == pytest.approx(4.0)
    under = BudgetController(1.0, ControllerConfig(window=5, max_factor=4.0))
    for _ in range(500):
        under.observe(0.0)
    assert under.factor == pytest.approx(0.25)
    steady = BudgetController(1.0)
    for _ in range(100):
        steady.observe(1.0)
    assert steady.factor == pytest.approx(1.0)
    # after saturating, the clamped integral lets λ come back as soon as spend falls (anti-windup)
    for _ in range(10):
        over.observe(0.0)
    assert over.factor < 4.0


def test_closed_loop_meets_budget_after_a_shift():
    """A plant whose spend falls with λ (cost ∝ demand / λ^0.8, noisy): the demand triples, then
    drops to a fifth; the realised mean spend over the whole stream ends within 3% of the budget
    (fixed λ: far off), and each window settles."""
    rng = np.random.default_rng(1)
    demand = np.r_[np.full(600, 3.0), np.full(600, 0.2), np.full(600, 1.0)]
    budget = 1.0
    ctrl = BudgetController(budget, ControllerConfig())
    costs = []
    for d in demand:
        cost = d / ctrl.factor ** 0.8 * rng.lognormal(0, 0.5) / math.exp(0.125)
        costs.append(cost)
        ctrl.observe(cost)
    fixed = float(np.mean(demand))
    assert abs(fixed - budget) > 0.3
    assert np.mean(costs) == pytest.approx(budget, rel=0.03)
    for start in (0, 600, 1200):
        settled = convergence_index(costs[start:start + 600], budget, window=100, tolerance=0.15)
        assert settled is not None and settled < 400


def test_bad_settings_and_costs_are_named():
    with pytest.raises(PolicyError, match="window"):
        ControllerConfig(window=0)
    with pytest.raises(PolicyError, match="k_i"):
        ControllerConfig(k_i=-1.0)
    with pytest.raises(PolicyError, match="max_factor"):
        ControllerConfig(max_factor=0.5)
    with pytest.raises(PolicyError, match="budget"):
        BudgetController(0.0)
    with pytest.raises(PolicyError, match="realised cost"):
        BudgetController(1.0).observe(float("nan"))
    # bools are not numbers here, strings are named, numpy numbers are numbers
    with pytest.raises(PolicyError, match="window must be an integer >= 1, got True"):
        ControllerConfig(window=True)
    with pytest.raises(PolicyError, match="k_p must be a finite number >= 0, got '0.5'"):
        ControllerConfig(k_p="0.5")
    with pytest.raises(PolicyError, match="needs a finite budget > 0, got nan"):
        BudgetController(float("nan"))
    cfg = ControllerConfig(window=np.int64(10), k_p=np.float32(0.25))
    assert cfg.window == 10 and type(cfg.window) is int and cfg.k_p == 0.25 and type(cfg.k_p) is float
    assert BudgetController(np.float32(0.5), cfg).budget == 0.5


def test_convergence_index():
    x = [5.0] * 10 + [1.0] * 30
    assert convergence_index(x, 1.0, window=5, tolerance=0.1) == 14
    assert convergence_index([5.0] * 10, 1.0, window=5) is None
    assert convergence_index([1.0] * 3, 1.0, window=5) is None
    assert settling_index([3.0, 1.5, 1.05, 0.97, 1.0], 1.0, 0.1) == 2
    assert settling_index([1.0, 2.0], 1.0, 0.1) is None


@pytest.fixture(scope="module")
def fitted_setup():
    policy = CascadeRouting(max_depth=3)
    fitted, budget, test = split_and_fit(synthetic_dataset(120, seed=5), policy, lambda mean_cost: mean_cost[1])
    return policy, fitted, budget, test


def test_no_gain_equals_fixed_lambda_simulation(fitted_setup):
    policy, fitted, budget, test = fitted_setup
    qe, ce = bind(test.queries, test.responses, offline_features(test))
    u = query_uniforms(test.queries)
    fixed = simulate(policy, qe, ce, test.quality, test.cost, fitted, u)
    off = simulate_controlled(policy, qe, ce, test.quality, test.cost, fitted, budget,
                              ControllerConfig(k_p=0.0, k_i=0.0), uniforms=u)
    assert torch.equal(off.result.order, fixed.order) and torch.equal(off.result.answer, fixed.answer)
    assert torch.allclose(off.result.cost, fixed.cost) and bool((off.lam_factor == 1.0).all())


def test_controlled_simulation_moves_lambda_and_replays_concurrency(fitted_setup):
    policy, fitted, budget, test = fitted_setup
    qe, ce = bind(test.queries, test.responses, offline_features(test))
    u = query_uniforms(test.queries)
    cfg = ControllerConfig(window=5, k_p=0.5, k_i=0.3)
    low = simulate_controlled(policy, qe, ce, test.quality, test.cost, fitted, budget / 4, cfg, uniforms=u)
    assert float(low.lam_factor[-1]) > 1.0  # spending above a quarter of the budget: λ went up
    assert low.mean_cost < simulate(policy, qe, ce, test.quality, test.cost, fitted, u).mean_cost
    # each request's factor is the controller's state after the costs of the requests before it
    ctrl = BudgetController(budget / 4, cfg)
    for k in range(len(u)):
        assert float(low.lam_factor[k]) == ctrl.factor
        ctrl.observe(float(low.result.cost[k]))
    # concurrency: request k saw only the costs of requests < k - 2, completed in reverse pairs
    n = len(u)
    completion = []
    for k in range(0, n, 2):
        completion += [k + 1, k] if k + 1 < n else [k]
    seen = [max(0, k - 2 - (k % 2)) for k in range(n)]
    conc = simulate_controlled(policy, qe, ce, test.quality, test.cost, fitted, budget / 4, cfg, uniforms=u,
                               observed_before=seen, completion=completion)
    assert conc.version.tolist() == seen
    with pytest.raises(PolicyError, match="had not been served"):
        simulate_controlled(policy, qe, ce, test.quality, test.cost, fitted, budget, cfg, uniforms=u,
                            observed_before=[0, 2] + list(range(2, n)))


def test_scale_fitted(fitted_setup):
    _, fitted, _, _ = fitted_setup
    s = scale_fitted(fitted, 2.5)
    assert torch.allclose(s.lam_low, fitted.lam_low * 2.5) and torch.allclose(s.lam_high, fitted.lam_high * 2.5)
    assert s.gamma == fitted.gamma and scale_fitted(fitted, 1.0) is fitted
