"""The compute batcher's two lanes: binding (encoding new queries) on its own thread never holds up
the decisions of requests already bound, and routing through both lanes gives the offline decisions."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cascade_routing.serving import CascadeRouter
from cascade_routing.serving.backends import Answer
from cascade_routing.serving.batching import ComputeBatcher
from cascade_routing.serving.router import RouteRequest
from tests.serving_helpers import FEATURE_NAMES, bind, stand_in_router

SLOW = "SLOW-TO-ENCODE"


@pytest.fixture()
def threads():
    pools = [ThreadPoolExecutor(1, thread_name_prefix="routing"), ThreadPoolExecutor(1, thread_name_prefix="binding")]
    yield pools
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def test_a_slow_bind_does_not_delay_decisions_of_bound_requests(ds, threads):
    """A bind blocked in the encoder (here: until released) leaves the step lane free: a request
    bound earlier gets its decision while the slow bind is still running, and the slow one
    completes once released."""
    router, _, budget = stand_in_router(ds)
    release = threading.Event()
    entered = threading.Event()

    def gated_bind(queries, responses=None, features=None, tasks=None):
        if any(SLOW in q for q in queries):
            entered.set()
            assert release.wait(30), "the test never released the slow bind"
        return bind(queries, responses, features, tasks)

    executor, bind_executor = threads
    router = CascadeRouter(router.policy, gated_bind, router.fitted_table, ds.models, budget=budget,
                           feature_names=FEATURE_NAMES, executor=executor, bind_executor=bind_executor)
    fitted = router.fitted_for(None)[1]

    async def main():
        batcher = ComputeBatcher(router, max_batch=8, window_ms=0.0)
        try:
            slot = await batcher.bind(ds.queries[0], None, fitted)
            slow = asyncio.create_task(batcher.bind(f"{SLOW} {ds.queries[1]}", None, fitted))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            decision = await asyncio.wait_for(batcher.decide(slot, fitted), timeout=10)
            blocked_meanwhile = not slow.done()
            release.set()
            slow_slot = await asyncio.wait_for(slow, timeout=10)
            return decision, blocked_meanwhile, slow_slot
        finally:
            release.set()
            await batcher.aclose()

    decision, blocked_meanwhile, slow_slot = asyncio.run(main())
    assert blocked_meanwhile, "the decision had to wait for the slow bind"
    assert -1 <= decision.model < len(ds.models)
    assert slow_slot.state.queries == [f"{SLOW} {ds.queries[1]}"]


def test_routing_through_two_lanes_equals_the_offline_simulation(ds, threads):
    """Every query of the batch, bound on the binding thread and decided on the routing thread,
    runs exactly the models the offline simulation runs and returns the one it selects."""
    router, sim, budget = stand_in_router(ds)
    executor, bind_executor = threads
    router = CascadeRouter(router.policy, bind, router.fitted_table, ds.models, budget=budget,
                           feature_names=FEATURE_NAMES, executor=executor, bind_executor=bind_executor)

    rows = {q: i for i, q in enumerate(ds.queries)}

    def backend(j):
        async def call(messages, **params):
            i = rows[messages[-1]["content"]]
            return Answer(model=ds.models[j], text=ds.responses[i, j], cost=float(ds.cost[i, j]),
                          features={k: float(v[i, j]) for k, v in ds.features.items()})
        return call

    async def main():
        return await router.route_batch([RouteRequest(q) for q in ds.queries], {m: backend(j) for j, m in enumerate(ds.models)})

    out = asyncio.run(main())
    assert not [r for r in out if isinstance(r, BaseException)]
    assert len({r.model for r in out}) > 1 and max(len(r.models_run) for r in out) > 1
    for i, result in enumerate(out):
        assert result.models_run == [ds.models[j] for j in sim.order[i].tolist() if j >= 0], i
        assert result.model == ds.models[int(sim.answer[i])], i
        assert result.total_cost == pytest.approx(float(sim.cost[i]), rel=1e-12), i
