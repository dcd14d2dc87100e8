"""Deadlines and cancellation: 504 past the deadline with the backend call cancelled and the spend
recorded; a client disconnect cancels the backend calls; a slow model for one request never delays
another; the circuit breaker; retries with jitter honouring Retry-After; graceful shutdown."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from cascade_routing.serving import backends as backends_module
from cascade_routing.serving.backends import (
    REQUEST_LIMITS,
    Backend,
    BackendConfig,
    BackendError,
    CircuitBreaker,
    RequestLimits,
    retry_after_s,
)
from cascade_routing.serving.limits import ServerLimits
from tests.serving_helpers import ServingStack

NAME = "cascade-routing"


SERVING_ROWS = 30  # queries of the conftest's ``ds``


def _body(query):
    return {"model": NAME, "messages": [{"role": "user", "content": query}]}


def _first_run_by(sim, ds, model, second=False):
    """A row whose simulated run order has ``model`` first (or, with ``second``, second)."""
    j = ds.model_index(model)
    for i in range(len(ds.queries)):
        order = [m for m in sim.order[i].tolist() if m >= 0]
        if len(order) > int(second) and order[int(second)] == j:
            return i
    raise AssertionError(f"no query runs {model} at that position")


def _wait_for(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_deadline_gives_504_cancels_the_call_and_records_what_was_spent(ds, stand_in):
    router, sim, budget = stand_in
    slow = ds.models[1]
    row = _first_run_by(sim, ds, slow, second=True)  # a paid answer first, then the slow model
    with ServingStack(ds, router, budget=budget, failures={slow: "slow"}, slow_ms=20_000, timeout_s=60,
                      limits=ServerLimits(deadline_s=1.5)) as s:
        resp = httpx.post(s.url + "/v1/chat/completions", json=_body(ds.queries[row]), timeout=30)
        err = resp.json()["error"]
        assert resp.status_code == 504 and err["code"] == "deadline_exceeded"
        assert "deadline of 1.5s" in err["message"] and err["type"] == "timeout_error"
        first = ds.models[int(sim.order[row][0])]
        assert err["models_run"] == [first]
        assert err["spent"] == pytest.approx(float(ds.cost[row, ds.model_index(first)]))
        stats = httpx.get(s.url + "/v1/routing/stats", timeout=10).json()
        assert stats["timeouts"] == 1 and stats["cancelled_calls"] == {slow: 1}
        assert stats["total_cost"] == pytest.approx(err["spent"])


def test_client_disconnect_cancels_the_backend_calls(ds, stand_in):
    router, sim, budget = stand_in
    slow = ds.models[int(sim.order[0][0])]
    with ServingStack(ds, router, budget=budget, failures={slow: "slow"}, slow_ms=20_000, timeout_s=60) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/chat/completions", json=_body(ds.queries[0]), timeout=0.5)
        ledger = s.app.state.ledger
        _wait_for(lambda: ledger.snapshot()["disconnects"] == 1, timeout_s=10)  # long before the 20 s answer
        assert ledger.snapshot()["cancelled_calls"] == {slow: 1}
        assert s.app.state.gate.in_flight == 0


def test_a_slow_model_for_one_request_never_delays_another(ds, stand_in):
    """Request A's first model is slow (3 s); request B never uses it: B is answered while A waits."""
    router, sim, budget = stand_in
    slow = ds.models[1]
    a = _first_run_by(sim, ds, slow)
    b = next(i for i in range(len(ds.queries))
             if ds.model_index(slow) not in sim.order[i].tolist() and i != a)
    with ServingStack(ds, router, budget=budget, failures={slow: "slow"}, slow_ms=3000, timeout_s=60,
                      batch_window_ms=5) as s:
        async def main():
            async with httpx.AsyncClient(timeout=30) as client:
                ta = asyncio.create_task(client.post(s.url + "/v1/chat/completions", json=_body(ds.queries[a])))
                await asyncio.sleep(0.05)
                rb = await client.post(s.url + "/v1/chat/completions", json=_body(ds.queries[b]))
                a_done_when_b_answered = ta.done()
                ra = await ta
                return ra, rb, a_done_when_b_answered

        ra, rb, a_done = asyncio.run(main())
        assert rb.status_code == 200 and ra.status_code == 200
        assert not a_done  # B did not wait for A's slow backend (lockstep batches would have)


def test_circuit_breaker_opens_probes_and_closes():
    now = [0.0]
    br = CircuitBreaker(failures=3, reset_s=10.0, clock=lambda: now[0])
    for _ in range(2):
        assert br.allow()
        br.failure()
    assert br.state == "closed"
    br.failure()
    assert br.state == "open" and not br.allow()
    now[0] = 10.5
    assert br.state == "half_open"
    assert br.allow() and not br.allow()  # exactly one probe
    br.failure()  # the probe failed: open again
    assert br.state == "open" and not br.allow()
    now[0] = 21.0
    assert br.allow()
    br.success()
    assert br.state == "closed" and br.allow() and br.opened == 2


def test_breaker_stops_calls_to_a_model_that_is_down(ds, stand_in):
    router, sim, budget = stand_in
    failures = {m: "500" for m in ds.models}
    with ServingStack(ds, router, budget=budget, failures=failures, max_retries=2,
                      backend_settings={"breaker_failures": 2, "breaker_reset_s": 60}) as s:
        for q in ds.queries[:5]:
            assert httpx.post(s.url + "/v1/chat/completions", json=_body(q), timeout=30).status_code == 502
        upstream = sum(s.replay_app.state.requests.values())
        assert upstream == 2 * len(ds.models)  # then every call failed fast with circuit_open
        resp = httpx.post(s.url + "/v1/chat/completions", json=_body(ds.queries[5]), timeout=30)
        assert {f["reason"] for f in resp.json()["error"]["failures"]} == {"circuit_open"}
        assert httpx.get(s.url + "/v1/routing/stats", timeout=10).json()["breakers"] == {m: "open" for m in ds.models}


def _backend(handler, **cfg):
    config = BackendConfig(name="m", base_url="http://upstream/v1", model_id="m", price_in=1e-6, price_out=1e-6,
                           **{"max_retries": 3, "backoff_s": 1.0, "breaker_failures": 100, **cfg})
    return Backend(config, httpx.AsyncClient(transport=httpx.MockTransport(handler)))


OK = {"choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
      "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def test_retries_use_jitter_and_honour_retry_after(monkeypatch):
    waits: list[float] = []

    async def record(delay):
        waits.append(delay)

    monkeypatch.setattr(backends_module, "_sleep", record)
    replies = iter([httpx.Response(429, headers={"Retry-After": "7"}), httpx.Response(503), httpx.Response(200, json=OK)])
    backend = _backend(lambda request: next(replies))
    answer = asyncio.run(backend.complete([{"role": "user", "content": "hi"}]))
    assert answer.text == "fine" and answer.attempts == 3
    assert waits[0] == 7.0  # Retry-After wins over the 1 s backoff
    assert 1.0 <= waits[1] <= 3.0  # backoff_s * 2 * U(0.5, 1.5)

    spread = set()
    for _ in range(5):
        waits.clear()
        replies = iter([httpx.Response(500), httpx.Response(200, json=OK)])
        asyncio.run(_backend(lambda request: next(replies)).complete([{"role": "user", "content": "hi"}]))
        spread.add(waits[0])
        assert 0.5 <= waits[0] <= 1.5
    assert len(spread) > 1  # jittered
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0 and retry_after_s("junk") is None


def test_no_retry_past_the_request_deadline(monkeypatch):
    async def record(delay):  # pragma: no cover - must not be reached
        raise AssertionError("slept past the deadline")

    monkeypatch.setattr(backends_module, "_sleep", record)
    backend = _backend(lambda request: httpx.Response(503, headers={"Retry-After": "30"}))

    async def main():
        REQUEST_LIMITS.set(RequestLimits(attempts_left=10, deadline=time.monotonic() + 5))
        return await backend.complete([{"role": "user", "content": "hi"}])

    with pytest.raises(BackendError) as info:
        asyncio.run(main())
    assert info.value.reason == "deadline" and info.value.attempts == 1


@pytest.mark.parametrize("stream", [False, True])
def test_graceful_shutdown_answers_503_within_the_grace_period(ds, stand_in, stream):
    """A request stuck on a 30 s backend when the server stops: the server gives it the grace
    period (2 s here), then cancels its backend call, answers 503 ``server_shutting_down`` in JSON
    (not a cut connection, nor a plain-text 500 for a stream that had not sent its first byte),
    records it, and exits."""
    router, sim, budget = stand_in
    slow = ds.models[int(sim.order[0][0])]
    s = ServingStack(ds, router, budget=budget, failures={slow: "slow"}, slow_ms=30_000, timeout_s=60,
                     limits=ServerLimits(shutdown_timeout_s=2))
    try:
        async def main():
            async with httpx.AsyncClient(timeout=60) as client:
                task = asyncio.create_task(client.post(s.url + "/v1/chat/completions",
                                                       json={**_body(ds.queries[0]), "stream": stream}))
                while s.app.state.gate.in_flight < 1:
                    await asyncio.sleep(0.02)
                await asyncio.to_thread(s.server.stop)
                return await task

        resp = asyncio.run(main())
        assert not s.server._thread.is_alive()
        assert resp.status_code == 503 and resp.headers["content-type"] == "application/json"
        assert resp.json()["error"]["code"] == "server_shutting_down" and resp.headers["retry-after"] == "1"
        snap = s.app.state.ledger.snapshot()
        assert snap["requests"] == 1 and snap["shutdowns"] == 1 and snap["cancelled_calls"] == {slow: 1}
    finally:
        s.replay.stop()
