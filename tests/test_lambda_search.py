"""Batched λ fitting (policies/lambda_search.py): the same fits as one simulation per scale, fewer calls;
the caches and thread limits the Table 1 protocol relies on."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from cascade_routing.data import load_dataset
from cascade_routing.data.splits import partition_indices
from cascade_routing.evaluation.synthetic import synthetic_estimators
from cascade_routing.evaluation.metrics import sweep_budgets
from cascade_routing.evaluation.simulate import simulate
from cascade_routing.policies import PolicyError, query_uniforms
from cascade_routing.policies import cascade_routing as cr
from cascade_routing.policies import lambda_search
from cascade_routing.policies.cascades import OptimalCascade
from cascade_routing.policies.fitting import fit_lambdas
from cascade_routing.policies.registry import make_policy

simulate_module = importlib.import_module("cascade_routing.policies.rollout")  # where λ fitting finds it


@pytest.fixture(scope="module")
def table1():
    """RouterBench subset, 11 models, the Table 1 split (5% fit rows), medium-noise synthetic estimators."""
    ds = load_dataset("routerbench-subset")
    split = partition_indices(ds.num_queries, {"fit": 0.05, "test": 0.95}, groups=ds.tasks, seed=0)
    fit_rows = split["fit"]
    qe, ce = synthetic_estimators(ds, "medium", fit_rows, 0)
    budgets = sweep_budgets(ds.cost.mean(0), ds.quality.mean(0), 3)  # 7 budgets
    return ds, fit_rows, qe, ce, budgets


def _fit(table1, policy, mode, monkeypatch, budgets=None):
    ds, fit_rows, qe, ce, all_budgets = table1
    budgets = all_budgets if budgets is None else budgets
    monkeypatch.setenv("CASCADE_ROUTING_LAMBDA_FIT", mode)
    calls = []
    real = simulate_module.simulate

    def counting(*args, **kwargs):
        calls.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(simulate_module, "simulate", counting)
    fits = fit_lambdas(policy, qe, ce, ds.quality[fit_rows], ds.cost[fit_rows], budgets,
                       uniforms=query_uniforms(ds.queries)[fit_rows], rows=torch.as_tensor(fit_rows), cache={})
    return fits, calls


def _same(a, b) -> None:
    assert torch.equal(a.lam_low, b.lam_low) and torch.equal(a.lam_high, b.lam_high)
    assert a.gamma == b.gamma and a.max_depth == b.max_depth
    assert a.calibration_cost == b.calibration_cost and a.calibration_quality == b.calibration_quality
    assert a.info["iterations"] == b.info["iterations"] and a.info["shape"] == b.info["shape"]
    assert a.info.get("shape_scores") == b.info.get("shape_scores")


@pytest.mark.parametrize("strategy", ["routing", "threshold_cascade", "optimal_cascade", "cascade_routing"])
def test_batched_fits_equal_one_simulation_per_scale(table1, strategy, monkeypatch):
    # cascade_routing: the export's policy (five λ shapes and the routing guard: 6 fits per budget)
    policy = make_policy(strategy)
    budgets = table1[4][::3] if strategy == "cascade_routing" else table1[4]  # 3 budgets x 6 fits for CR
    seq, seq_calls = _fit(table1, policy, "sequential", monkeypatch, budgets)
    bat, bat_calls = _fit(table1, policy, "batched", monkeypatch, budgets)
    assert len(seq) == len(bat) == len(budgets)
    for a, b in zip(seq, bat):
        _same(a, b)
    assert all(f.calibration_cost <= f.budget * (1 + 1e-9) + 1e-15 for f in bat)
    # one simulation per bisection round (per depth limit) for all budgets, not one per scale and budget
    assert len(table1[4]) == 7 and len(bat_calls) * 3 < len(seq_calls)
    assert max(bat_calls) > len(table1[1])  # the rows of several scales in one call


def test_batches_split_at_the_row_limit_with_the_same_fits(table1, monkeypatch):
    policy = make_policy("cascade_routing", step_ratios=None, routing_guard=False)
    ref, _ = _fit(table1, policy, "batched", monkeypatch, table1[4][::3])
    n = len(table1[1])
    monkeypatch.setattr(lambda_search, "MAX_BATCH_ROWS", 2 * n)
    small, calls = _fit(table1, policy, "batched", monkeypatch, table1[4][::3])
    assert max(calls) <= 2 * n
    for a, b in zip(ref, small):
        _same(a, b)


def test_unreachable_budget_still_names_the_policy(table1, monkeypatch):
    ds, fit_rows, qe, ce, _ = table1
    zero_lambda_cost = float(ds.cost[fit_rows].mean(0).min())
    with pytest.raises(PolicyError, match="below the mean cost of the cheapest model"):
        fit_lambdas(make_policy("routing"), qe, ce, ds.quality[fit_rows], ds.cost[fit_rows],
                    [zero_lambda_cost * 2, zero_lambda_cost / 2], rows=torch.as_tensor(fit_rows))


def test_cached_emax_computes_each_distinct_missing_pair_once():
    calls = []

    def compute(sel):
        calls.append(sel.tolist())
        return torch.stack([torch.full((3,), float(k)) for k in keys[sel]])

    cache: dict = {}
    states = torch.tensor([1, 0, 1, 0, 2])
    rows = torch.tensor([4, 4, 4, 7, 4])
    keys = states * 10 + rows
    out = cr._cached_emax(cache, 3, states, rows, compute)
    assert calls == [[0, 1, 3, 4]]  # position 2 repeats (state 1, row 4)
    assert torch.equal(out[:, 0], keys.float())
    assert cache[("emax", 3)][0].numel() == 4 and cache[("emax", 3)][3] == 4  # pairs, buffer rows used
    again = cr._cached_emax(cache, 3, states.flip(0), rows.flip(0), compute)
    assert len(calls) == 1 and torch.equal(again[:, 0], keys.flip(0).float())


def test_optimal_cascade_cache_changes_no_decision(table1):
    ds, fit_rows, qe, ce, budgets = table1
    policy = OptimalCascade()
    rows = torch.as_tensor(fit_rows)
    for lam in (0.0, 30.0, 300.0):
        plain = simulate(policy, qe, ce, ds.quality[fit_rows], ds.cost[fit_rows], lam, rows=rows)
        cache: dict = {}
        cached = simulate(policy, qe, ce, ds.quality[fit_rows], ds.cost[fit_rows], lam, rows=rows, cache=cache)
        assert torch.equal(plain.order, cached.order) and torch.equal(plain.answer, cached.answer)
        assert ("prefix_emax", len(ds.models)) in cache


def test_simulate_rejects_lambda_rows_of_the_wrong_shape(table1):
    ds, fit_rows, qe, ce, _ = table1
    n = len(fit_rows)
    with pytest.raises(PolicyError, match=r"lam_rows must be \[N=%d" % n):
        simulate(make_policy("routing"), qe, ce, ds.quality[fit_rows], ds.cost[fit_rows], 1.0,
                 rows=torch.as_tensor(fit_rows), lam_rows=torch.ones(n - 1, 1, dtype=torch.float64))


def test_per_query_lambda_rows_equal_separate_runs(table1):
    ds, fit_rows, qe, ce, _ = table1
    policy = make_policy("cascade_routing", step_ratios=None, routing_guard=False)
    q, c, rows = ds.quality[fit_rows], ds.cost[fit_rows], torch.as_tensor(fit_rows)
    lams = (5.0, 80.0)
    alone = [simulate(policy, qe, ce, q, c, lam, rows=rows) for lam in lams]
    lam_rows = torch.cat([torch.full((len(rows), 1), lam, dtype=torch.float64) for lam in lams])
    both = simulate(policy, qe, ce, np.tile(q, (2, 1)), np.tile(c, (2, 1)), 0.0, rows=rows.repeat(2),
                    lam_rows=lam_rows)
    n = len(rows)
    for k, res in enumerate(alone):
        assert torch.equal(both.order[k * n:(k + 1) * n], res.order)
        assert torch.equal(both.cost[k * n:(k + 1) * n], res.cost)


def test_reproduce_threads_limit_numpy_blas_as_well_as_torch():
    from threadpoolctl import threadpool_info, threadpool_limits

    from cascade_routing.cli.engine_commands import limit_threads

    torch_before = torch.get_num_threads()
    blas_before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    try:
        limit_threads(1)
        assert torch.get_num_threads() == 1
        assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == [1] * len(blas_before)
    finally:
        torch.set_num_threads(torch_before)
        if blas_before:
            threadpool_limits(max(blas_before), user_api="blas")
