"""The online λ controller in the live server equals its offline simulation on the same stream:
sequential requests, and concurrent micro-batched ones (replayed from the versions and observation
order the server reports)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from cascade_routing.evaluation.online import simulate_controlled
from cascade_routing.policies import CascadeRouting, query_uniforms
from cascade_routing.policies.controller import ControllerConfig
from cascade_routing.serving import CascadeRouter
from tests.serving_helpers import (
    FEATURE_NAMES,
    ServingStack,
    bind,
    offline_features,
    split_and_fit,
    synthetic_dataset,
)

NAME = "cascade-routing"
CONFIG = ControllerConfig(window=4, k_p=0.5, k_i=0.4, max_factor=50.0)


@pytest.fixture(scope="module")
def setup():
    ds = synthetic_dataset(80, seed=7)
    policy = CascadeRouting(num_samples=64)
    # tight: the cheapest model plus a little
    fitted, budget, test = split_and_fit(ds, policy, lambda mean_cost: mean_cost[0] * 1.5)
    router = CascadeRouter(policy, bind, {budget: fitted}, ds.models, budget=budget, feature_names=FEATURE_NAMES)
    # a shifted stream: the queries whose fixed-λ runs spend most first
    order = np.argsort(-test.cost.sum(1), kind="stable")
    stream = test.subset(order.tolist())
    return policy, fitted, budget, router, stream


def _offline(setup, observed_before=None, completion=None):
    policy, fitted, budget, _, stream = setup
    qe, ce = bind(stream.queries, stream.responses, offline_features(stream))
    return simulate_controlled(policy, qe, ce, stream.quality, stream.cost, fitted, budget, CONFIG,
                               uniforms=query_uniforms(stream.queries), observed_before=observed_before,
                               completion=completion)


def _body(q):
    return {"model": NAME, "messages": [{"role": "user", "content": q}]}


def test_sequential_stream_equals_offline_simulation(setup):
    _, _, budget, router, stream = setup
    off = _offline(setup)
    with ServingStack(stream, router, budget=budget, controller=CONFIG) as s, httpx.Client(timeout=30) as c:
        traces = [c.post(s.url + "/v1/chat/completions", json=_body(q)).json()["routing"] for q in stream.queries]
        stats = c.get(s.url + "/v1/routing/stats").json()
    factors = [t["controller"]["lam_factor"] for t in traces]
    assert len(set(np.round(factors, 9))) > 3  # the controller moved λ
    for i, t in enumerate(traces):
        assert t["controller"]["lam_factor"] == pytest.approx(float(off.lam_factor[i]), rel=1e-9), i
        assert t["controller"]["version"] == i
        expected = [stream.models[j] for j in off.result.order[i].tolist() if j >= 0]
        assert t["models_run"] == expected, i
        assert t["total_cost"] == pytest.approx(float(off.result.cost[i]), rel=1e-9)
    ctrl = stats["controller"][f"{budget:.6g}"]
    assert ctrl["observed"] == len(traces)
    assert ctrl["mean_cost"] == pytest.approx(np.mean([t["total_cost"] for t in traces]), rel=1e-9)


def test_concurrent_stream_replays_from_reported_order(setup):
    _, _, budget, router, stream = setup

    async def send():
        async with httpx.AsyncClient(timeout=60) as c:
            out = []
            for start in range(0, stream.num_queries, 8):  # waves of 8 concurrent requests
                wave = await asyncio.gather(*(c.post(s.url + "/v1/chat/completions", json=_body(q))
                                              for q in stream.queries[start:start + 8]))
                out += [r.json()["routing"] for r in wave]
            return out

    with ServingStack(stream, router, budget=budget, controller=CONFIG) as s:
        traces = asyncio.run(send())
    versions = [t["controller"]["version"] for t in traces]
    assert max(versions) > 0 and len(set(versions)) < len(versions)  # batched: several saw the same state
    arrival = sorted(range(len(traces)), key=lambda k: versions[k])
    position = {k: p for p, k in enumerate(arrival)}
    completion = [position[k] for k in sorted(range(len(traces)), key=lambda k: traces[k]["controller"]["observed_as"])]
    reordered = setup[:4] + (stream.subset(arrival),)
    off = _offline(reordered, observed_before=[versions[k] for k in arrival], completion=completion)
    for p, k in enumerate(arrival):
        assert traces[k]["controller"]["lam_factor"] == pytest.approx(float(off.lam_factor[p]), rel=1e-9)
        expected = [stream.models[j] for j in off.result.order[p].tolist() if j >= 0]
        assert traces[k]["models_run"] == expected
