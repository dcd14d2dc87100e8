"""Bad arguments to the public Python API that the README's snippets use (an audit of the README's
``python`` blocks): each is refused with an error naming the problem, where before it gave a silent
wrong result or an obscure numpy/torch error. Valid inputs behave as before.

- ``synthetic_estimators(ds, noise, fit_rows)``: a bool mask was read as the row ids 0 and 1 (σ = 0),
  a negative id indexed from the end, a [K, 2] array made σ a matrix;
- ``simulate`` / ``fit_lambda``: fractional row ids were truncated to other rows, NaN uniforms put
  every query on ``lam_high``, a [2, 2] λ was flattened into four per-step λ, a strategy name or
  swapped estimators ended in an ``AttributeError``, an empty λ shape in a raw torch error;
- ``max_depth=2.5`` / ``True`` was accepted as a depth;
- ``auc`` / ``bootstrap_auc`` / ``sweep_budgets``: NaN points gave a number or NaN, mismatched
  lengths an ``IndexError``, ``per_pair=0`` an empty budget list;
- ``budget_sweep``: a bool mask of test rows gave AUC 100, a negative budget was silently raised to
  the floor, no budgets ended in ``np.stack``;
- the artifact's bound estimators: the cost estimator read negative row ids from the end and ignored
  a ``ran`` of the wrong shape, the learned one truncated fractional ids; NaN query embeddings were
  bound without complaint.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.evaluation import auc, bootstrap_auc, budget_sweep, nondominated_models, simulate, sweep_budgets
from cascade_routing.evaluation.synthetic import synthetic_estimators
from cascade_routing.policies import CascadeRouting, OptimalCascade, PolicyError, Routing, ThresholdCascade, fit_lambda

from engine_helpers import make_data, synthetic_pair


class _Data:
    """The minimum of a RoutingDataset that ``synthetic_estimators`` reads."""

    def __init__(self, quality, cost):
        self.quality, self.cost = quality, cost
        self.models = [f"m{i}" for i in range(quality.shape[1])]


@pytest.fixture(scope="module")
def data():
    quality, cost = make_data(80, 3, seed=2)
    qe, ce = synthetic_pair(quality, cost, "medium", 40)
    return quality, cost, qe, ce


# ----------------------------------------------------------------------------- synthetic estimators
def test_synthetic_estimators_refuse_bad_fit_rows():
    quality, cost = make_data(50, 3, seed=0)
    ds = _Data(quality, cost)
    mask = np.zeros(50, dtype=bool)
    mask[:30] = True
    for rows, words in ((mask, "bool mask"), (torch.as_tensor(mask), "bool mask"),
                        ([-1, -2, -3], r"in \[0, 50\).*got -1"), ([0, 1, 50], r"in \[0, 50\).*got 50"),
                        (np.array([0.5, 1.7, 2.2]), "integer row ids"), (np.arange(6).reshape(3, 2), "1-D")):
        with pytest.raises(ValueError, match=words):
            synthetic_estimators(ds, "medium", rows)
    # the README's form (a long tensor of ids) and integral floats still work; σ is one per model
    qe, _ = synthetic_estimators(ds, "medium", torch.arange(30), seed=0)
    qe_f, _ = synthetic_estimators(ds, "medium", np.arange(30, dtype=np.float64), seed=0)
    assert qe.sigma.shape == (3,) and torch.equal(qe.sigma, qe_f.sigma)
    assert torch.equal(qe.sigma, synthetic_estimators(ds, "medium", np.nonzero(mask)[0], seed=0)[0].sigma)


def test_synthetic_cost_estimator_refuses_non_finite_cost():
    quality, cost = make_data(20, 2, seed=0)
    cost[3, 1] = np.nan
    with pytest.raises(ValueError, match="cost has non-finite values"):
        synthetic_estimators(_Data(quality, cost), "low")


# ----------------------------------------------------------------------------- simulate / fit_lambda
def test_simulate_refuses_fractional_rows_bad_uniforms_and_lambda(data):
    quality, cost, qe, ce = data
    rows = torch.arange(40, 80)
    policy = Routing()
    base = simulate(policy, qe, ce, quality[40:], cost[40:], 50.0, rows=rows)
    with pytest.raises(PolicyError, match=r"rows must be integer row ids, got 40.5 at position 0"):
        simulate(policy, qe, ce, quality[40:], cost[40:], 50.0, rows=rows.double() + 0.5)
    # integral floats name the same rows
    same = simulate(policy, qe, ce, quality[40:], cost[40:], 50.0, rows=rows.double())
    assert torch.equal(same.answer, base.answer)
    for u, words in ((torch.full((40,), float("nan")), "query 0 has nan"), (torch.full((40,), 2.0), "query 0 has 2.0")):
        with pytest.raises(PolicyError, match=f"uniforms must lie in \\[0, 1\\]; {words}"):
            simulate(policy, qe, ce, quality[40:], cost[40:], 50.0, uniforms=u, rows=rows)
    with pytest.raises(PolicyError, match=r"scalar or a per-step vector \[T\], got shape \(2, 2\)"):
        simulate(policy, qe, ce, quality[40:], cost[40:], torch.ones(2, 2), rows=rows)
    with pytest.raises(PolicyError, match="got 'abc'"):
        simulate(policy, qe, ce, quality[40:], cost[40:], "abc", rows=rows)


def test_a_strategy_name_or_swapped_estimators_are_named(data):
    quality, cost, qe, ce = data
    budget = float(cost[:40].mean())
    with pytest.raises(PolicyError, match=r"policy must be a Policy.*make_policy\('cascade_routing'\)"):
        fit_lambda("cascade_routing", qe, ce, quality[:40], cost[:40], budget)
    with pytest.raises(PolicyError, match="policy must be a Policy"):
        simulate("routing", qe, ce, quality[40:], cost[40:], 1.0, rows=torch.arange(40, 80))
    with pytest.raises(PolicyError, match="quality estimator returned Tensor, expected a QualityEstimate"):
        simulate(Routing(), ce, qe, quality[40:], cost[40:], 1.0, rows=torch.arange(40, 80))


def test_fit_lambda_refuses_bad_uniforms_shape_max_iter_and_a_single_query_string(data):
    quality, cost, qe, ce = data
    q, c = quality[:40], cost[:40]
    budget = float(c.mean())
    policy = CascadeRouting(num_samples=16)
    with pytest.raises(PolicyError, match="uniforms must lie in"):
        fit_lambda(policy, qe, ce, q, c, budget, uniforms=torch.full((40,), float("nan")))
    with pytest.raises(PolicyError, match=r"λ shape must be non-empty"):
        fit_lambda(policy, qe, ce, q, c, budget, shape=torch.tensor([]))
    with pytest.raises(PolicyError, match="max_iter must be an integer >= 0, got -1"):
        fit_lambda(policy, qe, ce, q, c, budget, max_iter=-1)
    with pytest.raises(TypeError, match="single str"):
        fit_lambda(policy, qe, ce, q, c, budget, queries="one query")
    fitted = fit_lambda(policy, qe, ce, q, c, budget, queries=[f"query {i}" for i in range(40)])
    assert fitted.calibration_cost <= budget * (1 + 1e-9)


@pytest.mark.parametrize("make", [CascadeRouting, OptimalCascade, ThresholdCascade], ids=["cr", "optimal", "threshold"])
def test_max_depth_must_be_an_integer(make):
    for depth in (2.5, True, "2"):
        with pytest.raises(PolicyError, match="max_depth must be an integer >= 1 or None"):
            make(max_depth=depth)
    assert make(max_depth=np.int64(2)).max_steps(3) == 2


# ----------------------------------------------------------------------------- metrics
def test_auc_and_bootstrap_refuse_bad_points():
    assert auc([0.5, 1.0], [0.5, 0.6], 0.0, 2.0, 0.4) == pytest.approx(auc(np.array([0.5, 1.0]), [0.5, 0.6], 0, 2, 0.4))
    for costs, quals, words in (([np.nan, 1.0], [0.5, 0.6], "cost of point 0 is nan"),
                                ([0.5, 1.0], [0.5, np.inf], "quality of point 1 is inf"),
                                ([0.5, 1.0], [0.5], "same length")):
        with pytest.raises(ValueError, match=words):
            auc(costs, quals, 0.0, 2.0, 0.4)
    with pytest.raises(ValueError, match="finite c_min, c_max and q_lowest"):
        auc([0.5, 1.0], [0.5, 0.6], float("nan"), 2.0, 0.4)
    pc, pq = np.ones((3, 5)), np.full((3, 5), 0.5)
    lo, hi = bootstrap_auc(pc, pq, 0.0, 2.0, 0.4, 10)
    assert lo <= hi
    for kwargs, words in (({"per_query_quality": np.ones((3, 4))}, "same shape"),
                          ({"per_query_cost": np.ones(5), "per_query_quality": np.ones(5)}, "same shape"),
                          ({"num_resamples": 0}, "num_resamples must be an integer >= 1"),
                          ({"level": 2}, r"level must be in \(0, 1\)")):
        args = {"per_query_cost": pc, "per_query_quality": pq, "c_min": 0.0, "c_max": 2.0, "q_lowest": 0.4,
                "num_resamples": 10, **kwargs}
        with pytest.raises(ValueError, match=words):
            bootstrap_auc(**args)


def test_sweep_budgets_and_nondominated_models_refuse_bad_inputs():
    c, q = np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.6, 0.8])
    assert len(sweep_budgets(c, q, 10)) == 19  # 10 per pair, the shared endpoint once
    with pytest.raises(ValueError, match="per_pair must be an integer >= 1, got 0"):
        sweep_budgets(c, q, 0)
    with pytest.raises(ValueError, match="same length"):
        sweep_budgets(c, q[:2])
    with pytest.raises(ValueError, match="cost of point 1 is nan"):
        sweep_budgets(np.array([1.0, np.nan, 3.0]), q)
    with pytest.raises(PolicyError, match="NaN in mean_cost or mean_quality"):
        nondominated_models(c, np.array([0.5, np.nan, 0.8]))


# ----------------------------------------------------------------------------- budget_sweep
def test_budget_sweep_refuses_bad_budgets_and_rows(data):
    quality, cost, qe, ce = data
    fit, test = np.arange(40), np.arange(40, 80)
    budgets = sweep_budgets(cost[test].mean(0), quality[test].mean(0), 2)
    ok = budget_sweep(Routing(), qe, ce, quality, cost, fit, test, budgets, num_resamples=5)
    assert ok.per_query_cost.shape == (len(budgets), 40) and ok.auc < 100
    mask = np.zeros(80, dtype=bool)
    mask[40:] = True
    for kwargs, words in (({"budgets": [-1.0, budgets[-1]]}, "budget must be a finite number >= 0, got -1.0"),
                          ({"budgets": [np.nan]}, "got nan"),
                          ({"budgets": []}, "non-empty 1-D sequence of budgets"),
                          ({"budgets": budgets[-1]}, "non-empty 1-D sequence of budgets"),
                          ({"test_rows": mask}, "test_rows must be integer row ids, got a bool mask"),
                          ({"test_rows": test + 40}, r"test_rows must lie in \[0, 80\)"),
                          ({"fit_rows": -fit - 1}, r"fit_rows must lie in \[0, 80\).*got -1"),
                          ({"texts": ["a"]}, "one text per row")):
        args = {"fit_rows": fit, "test_rows": test, "budgets": budgets, **kwargs}
        with pytest.raises(ValueError, match=words):
            budget_sweep(Routing(), qe, ce, quality, cost, num_resamples=5, **args)


# ----------------------------------------------------------------------------- the artifact's estimators
@pytest.fixture(scope="module")
def tiny_artifact():
    from cascade_routing.estimators.artifact import EstimatorArtifact
    from cascade_routing.estimators.cost import CostModel
    from cascade_routing.estimators.network import NetworkConfig, QualityNetwork

    torch.manual_seed(0)
    cfg = NetworkConfig(num_models=2, embed_dim=4, hidden=8)
    return EstimatorArtifact(models=["a", "b"], network_config=cfg.to_dict(), state_dict=QualityNetwork(cfg).state_dict(),
                             cost_model=CostModel(["a", "b"], "mean", [1e-4, 1e-3]),
                             encoder={"path": "default", "fingerprint": "test"}, uncertainty="none")


def test_bound_estimators_check_row_ids_and_ran(tiny_artifact):
    from cascade_routing.estimators.artifact import ArtifactError

    qe, ce = tiny_artifact.bind(["q0", "q1", "q2"], query_embeddings=np.eye(3, 4))
    none = torch.zeros(3, 2, dtype=torch.bool)
    assert ce.estimate(torch.arange(3), none).shape == (3, 2)
    assert qe.estimate(torch.arange(3), none).mean.shape == (3, 2)
    for est in (qe, ce):
        with pytest.raises(IndexError, match=r"row ids must lie in \[0, 3\), got -1"):
            est.estimate(torch.tensor([-1, -2, -3]), none)
        with pytest.raises(ValueError, match="must be integer row ids"):
            est.estimate(torch.tensor([0.5, 1.5, 2.0]), none)
        with pytest.raises(ValueError, match="must be a 1-D sequence of row ids"):
            est.estimate(torch.arange(3)[:, None], none)
    with pytest.raises(ValueError, match=r"ran must be \[3, 2\], got \(3, 3\)"):
        ce.estimate(torch.arange(3), torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ArtifactError, match="query embeddings must be finite; row 1"):
        tiny_artifact.bind(["q0", "q1", "q2"], query_embeddings=np.array([[0.0] * 4, [np.nan] * 4, [0.0] * 4]))
