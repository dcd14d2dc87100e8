"""End to end over real HTTP on loopback with a REAL estimator artifact (safetensors checkpoint):
``CascadeRouter.from_checkpoint`` -> server -> replay backends of the test split, compared per query
with ``simulate`` of the same checkpoint (``artifact.bind`` on the whole split) and budget.

The default test builds a tiny artifact (random tiny encoder, untrained network, λ fitted on the
calibration split) so it runs in seconds; the serving path is the same for a trained one. Set
``CASCADE_ROUTING_E2E_CHECKPOINT`` (and ``CASCADE_ROUTING_E2E_DATASET``) to run the slow test on a
trained checkpoint and its dataset's test split.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from cascade_routing.estimators.artifact import load_artifact
from cascade_routing.policies.registry import make_policy
from cascade_routing.evaluation import simulate
from cascade_routing.policies import query_uniforms
from cascade_routing.serving import CascadeRouter
from tests.serving_helpers import ServingStack, make_tiny_artifact, offline_features, synthetic_dataset


def _unique_rows(ds) -> list[int]:
    """Rows whose query text is unique (the replay answers a repeated text from its first row)."""
    seen: dict[str, int] = {}
    for q in ds.queries:
        seen[q] = seen.get(q, 0) + 1
    return [i for i, q in enumerate(ds.queries) if seen[q] == 1]


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(url, json=b) for b in bodies))


def check_server_equals_simulation(path, test, strategy: str, budget: float, rows=None,
                                   concurrent: bool = False) -> dict:
    """Route every (unique) test query through server + replay; assert per-query equality.

    ``concurrent``: send all requests at once, so the server routes them in micro-batches."""
    artifact = load_artifact(path)
    policy = make_policy(strategy)
    fitted = artifact.fitted_lambda(strategy, budget)
    qe, ce = artifact.bind(test.queries, test.responses, offline_features(test), test.tasks)
    sim = simulate(policy, qe, ce, test.quality, test.cost, fitted, query_uniforms(test.queries))
    executor = ThreadPoolExecutor(1)  # as `cascade-routing serve` runs it
    router = CascadeRouter.from_checkpoint(path, budget=budget, strategy=strategy, executor=executor)
    rows = _unique_rows(test) if rows is None else rows
    quality, cost = [], []
    bodies = []
    for i in rows:
        body = {"model": "cascade-routing", "messages": [{"role": "user", "content": test.queries[i]}]}
        if test.tasks is not None:
            body["routing"] = {"task": test.tasks[i]}
        bodies.append(body)
    with ServingStack(test, router, budget=budget) as stack, httpx.Client(timeout=60) as client:
        url = stack.url + "/v1/chat/completions"
        if concurrent:
            responses = asyncio.run(_post_all(url, bodies))
        else:
            responses = [client.post(url, json=b) for b in bodies]
        for i, resp in zip(rows, responses):
            assert resp.status_code == 200, resp.text
            r = resp.json()["routing"]
            expected = [test.models[j] for j in sim.order[i].tolist() if j >= 0]
            assert r["models_run"] == expected, f"row {i}: server ran {r['models_run']}, simulation {expected}"
            j = test.model_index(r["model"])
            assert j == int(sim.answer[i]), f"row {i}"
            assert resp.json()["choices"][0]["message"]["content"] == test.responses[i, j]
            quality.append(test.quality[i, j])
            cost.append(r["total_cost"])
            assert quality[-1] == float(sim.quality[i])
            assert cost[-1] == pytest.approx(float(sim.cost[i]), rel=1e-9, abs=1e-15)
        stats = client.get(stack.url + "/v1/routing/stats").json()
    executor.shutdown()
    assert stats["requests"] == len(rows)
    assert stats["mean_cost"] == pytest.approx(float(np.mean(cost)), rel=1e-9)
    return {"rows": len(rows), "num_run": sim.num_run[rows].float().mean().item(),
            "mean_quality": float(np.mean(quality)), "mean_cost": float(np.mean(cost))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ds = synthetic_dataset(120, seed=3)
    return make_tiny_artifact(ds, tmp_path_factory.mktemp("artifact"))


@pytest.mark.parametrize("strategy, concurrent", [("cascade_routing", False), ("cascade_routing", True),
                                                  ("routing", True)])
def test_server_equals_simulation_tiny_artifact(tiny, strategy, concurrent):
    path, splits = tiny
    test = splits["test"]
    budgets = sorted(load_artifact(path).fitted[strategy])
    budget = budgets[len(budgets) // 2]
    out = check_server_equals_simulation(path, test, strategy, budget, concurrent=concurrent)
    assert out["rows"] == test.num_queries
    if strategy == "cascade_routing":
        assert out["num_run"] > 1.0  # the check is not vacuous: some queries run several models


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CASCADE_ROUTING_E2E_CHECKPOINT"),
                    reason="set CASCADE_ROUTING_E2E_CHECKPOINT to a trained artifact")
@pytest.mark.parametrize("budget_index", [3, -2])
def test_server_equals_simulation_trained_checkpoint(budget_index):
    """On the checkpoint's own test split (up to CASCADE_ROUTING_E2E_LIMIT unique queries, default
    200), at a middle and a high fitted budget, requests sent concurrently (micro-batched)."""
    from cascade_routing.data import load_dataset

    path = os.environ["CASCADE_ROUTING_E2E_CHECKPOINT"]
    artifact = load_artifact(path)
    cfg = artifact.data_config
    ds = load_dataset(os.environ.get("CASCADE_ROUTING_E2E_DATASET", cfg["dataset"]))
    test = ds.split(cfg["split"], seed=cfg.get("split_seed", 0))["test"]
    limit = int(os.environ.get("CASCADE_ROUTING_E2E_LIMIT", "200"))
    rows = _unique_rows(test)[:limit]
    strategy = "cascade_routing"
    budgets = sorted(artifact.fitted[strategy])
    budget = budgets[budget_index if -len(budgets) <= budget_index < len(budgets) else -1]
    out = check_server_equals_simulation(path, test, strategy, budget, rows, concurrent=True)
    print(f"budget {budget:.6g}: {out}")
