"""Faulty backends and clients end to end (in-process scripted endpoints, ``ScriptedBackends``): a
streamed model failing after its first tokens ends the stream (no second model), invalid ``usage``
fails only that model, a request the backend refuses comes back as its 4xx, streams during a
shutdown, the cost header on errors, what the metrics count, and the keys' spend reservations."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cascade_routing.policies import CascadeRouting, Routing
from cascade_routing.policies.controller import ControllerConfig
from cascade_routing.serving.keys import parse_keys
from cascade_routing.serving.limits import ServerLimits
from cascade_routing.serving.streaming import sse_data
from tests.serving_helpers import (
    PRICE_IN,
    PRICE_OUT,
    ScriptedBackends,
    fitted_router,
    scripted_server,
)

NAME = "cascade-routing"
COST = "x-cascade-routing-cost-usd"


SERVING_ROWS = 20  # queries of the conftest's ``ds``
SERVING_SEED = 4


@pytest.fixture(scope="module")
def routing(ds):
    """Routing: one model per query, its tokens passed through to a streaming client."""
    return fitted_router(ds, Routing())


@pytest.fixture(scope="module")
def cascade(ds):
    return fitted_router(ds, CascadeRouting(num_samples=64))


def _body(query, **extra):
    return {"model": NAME, "messages": [{"role": "user", "content": query}], **extra}


def _stream(url, body, timeout=30.0):
    """(status, events) of a streamed request (``[DONE]`` kept as the string)."""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, resp.json()
        return 200, [e for e in map(sse_data, resp.iter_lines()) if e is not None]


def _text(events):
    return "".join(c["delta"].get("content") or "" for e in events if isinstance(e, dict) and "choices" in e
                   for c in e["choices"])


def _samples(url, **kw):
    text = httpx.get(url + "/metrics", timeout=10, **kw).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.parametrize("mode", ["stream_break", "stream_stall", "stream_garbage", "stream_badindex", "stream_error"])
def test_a_streamed_model_failing_after_its_first_tokens_ends_the_stream(ds, routing, mode):
    """The client has part of model A's answer: A's failure ends the stream with ``stream_aborted``
    (no finish chunk), and no other model is called or paid for. What A bills for the part it sent
    is estimated (prompt and received text at ceil(chars / 4) tokens) and charged."""
    query = ds.queries[0]
    first = routing.next_model(query, {})
    backends = ScriptedBackends(modes={first: mode})
    with scripted_server(routing, backends) as srv:
        status, events = _stream(srv.url, _body(query, stream=True))
        snap = srv.server.config.app.state.ledger.snapshot()
        samples = _samples(srv.url)
    assert status == 200 and events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "stream_aborted" and error["failures"][0]["model"] == first
    sent = json.dumps([{"role": "user", "content": query}], ensure_ascii=False)
    received = 2 * (len(ScriptedBackends.answer(first, query)) // 3)  # the two pieces sent before the fault
    estimate = -(-len(sent) // 4) * PRICE_IN[first] + -(-received // 4) * PRICE_OUT[first]
    assert error["spent"] == pytest.approx(estimate) and error["failures"][0]["cost_estimate"] == pytest.approx(estimate)
    assert not any(c.get("finish_reason") for e in events[:-2] for c in e.get("choices", []))
    assert ScriptedBackends.answer(first, query).startswith(_text(events)) and _text(events)  # A's tokens only
    assert dict(backends.calls) == {first: 1}
    assert snap["requests"] == 1 and snap["errors"] == 1 and snap["answered"] == 0
    assert snap["total_cost"] == pytest.approx(estimate) and snap["runs"] == {} and snap["failures"] == {first: 1}
    assert samples[("cascade_routing_spend_usd_total", (("model", first),))] == pytest.approx(estimate)
    assert not any(n == "cascade_routing_models_run_total" for n, _ in samples)
    assert samples[("cascade_routing_errors_total", (("kind", "stream_aborted"),))] == 1
    assert samples[("cascade_routing_requests_total", (("status", "200"), ("stream", "true")))] == 1


@pytest.mark.parametrize("mode, words", [("negusage", "usage.prompt_tokens"), ("strusage", "usage.prompt_tokens"),
                                         ("listusage", "usage must be an object"),
                                         ("infusage", "usage.completion_tokens")])
def test_invalid_usage_fails_only_that_model(ds, cascade, mode, words):
    """A backend's invalid ``usage`` is its failure (``bad_response`` naming the field): the router
    falls back, the answer, the cost header, the account and /metrics agree, and the budget
    controller (which refuses negative costs) is never handed one."""
    query = ds.queries[1]
    first = cascade.next_model(query, {})
    backends = ScriptedBackends(modes={first: mode})
    with scripted_server(cascade, backends, controller=ControllerConfig()) as srv:
        resp = httpx.post(srv.url + "/v1/chat/completions", json=_body(query), timeout=30)
        stats = httpx.get(srv.url + "/v1/routing/stats", timeout=10).json()
        samples = _samples(srv.url)
    assert resp.status_code == 200, resp.text
    routing = resp.json()["routing"]
    assert routing["failures"][0]["model"] == first and routing["failures"][0]["reason"] == "bad_response"
    assert words in routing["failures"][0]["detail"] and first not in routing["models_run"]
    assert routing["total_cost"] == pytest.approx(sum(ScriptedBackends.cost(m) for m in routing["models_run"]))
    assert float(resp.headers[COST]) == pytest.approx(routing["total_cost"])
    assert stats["total_cost"] == pytest.approx(routing["total_cost"]) and stats["failures"] == {first: 1}
    spend = sum(v for (n, _), v in samples.items() if n == "cascade_routing_spend_usd_total")
    assert spend == pytest.approx(stats["total_cost"])


def test_a_request_the_backend_refuses_comes_back_as_its_4xx(ds, cascade):
    """A 400 for the request itself (here max_tokens) from every model is the client's error: returned
    as the first model's 400 in OpenAI's shape, not a 502; a refusal by one model alone falls back."""
    query = ds.queries[2]
    backends = ScriptedBackends(modes={m: "400" for m in ds.models})
    with scripted_server(cascade, backends) as srv:
        resp = httpx.post(srv.url + "/v1/chat/completions", json=_body(query, max_tokens=10**9), timeout=30)
        streamed, error = _stream(srv.url, _body(query, max_tokens=10**9, stream=True))
        samples = _samples(srv.url)
    first = cascade.next_model(query, {})
    err = resp.json()["error"]
    assert resp.status_code == 400 and err["param"] == "max_tokens" and err["code"] == "invalid_value"
    assert first in err["message"] and err["type"] == "invalid_request_error" and err["spent"] == 0
    assert resp.headers[COST] == "0"
    assert streamed == 400 and error["error"]["code"] == "invalid_value"
    assert backends.calls[first] == 2 and len(err["failures"]) == len(backends.calls) > 1  # the others tried too
    assert samples[("cascade_routing_requests_total", (("status", "400"), ("stream", "false")))] == 1
    # models the attempt limit left uncalled do not turn the refusal into a 502
    one = ScriptedBackends(modes={m: "400" for m in ds.models})
    with scripted_server(cascade, one, limits=ServerLimits(max_upstream_attempts=1)) as srv:
        resp = httpx.post(srv.url + "/v1/chat/completions", json=_body(query, max_tokens=10**9), timeout=30)
    assert resp.status_code == 400 and dict(one.calls) == {first: 1}


@pytest.mark.parametrize("mode", ["400", "context_400", "404", "500"])
def test_model_specific_4xx_and_5xx_still_fall_back(ds, cascade, mode):
    """A 400 from one model only (that provider's rule), a 400 ``context_length_exceeded`` (that
    model's limit), a 404 (its configuration) or a 5xx removes only that model."""
    query = ds.queries[2]
    first = cascade.next_model(query, {})
    with scripted_server(cascade, ScriptedBackends(modes={first: mode})) as srv:
        resp = httpx.post(srv.url + "/v1/chat/completions", json=_body(query), timeout=30)
    assert resp.status_code == 200 and resp.json()["routing"]["failures"][0]["model"] == first


def test_error_answers_carry_the_cost_header(ds, cascade):
    """A 504 after one model answered (the next one never does) carries what it spent in the cost
    header, as the body's ``spent``; a request refused before any work carries 0."""
    query = ds.queries[3]
    first = cascade.next_model(query, {})
    backends = ScriptedBackends(modes={m: "wrong" if m == first else "hold" for m in ds.models})
    with scripted_server(cascade, backends, limits=ServerLimits(deadline_s=1.0)) as srv:
        resp = httpx.post(srv.url + "/v1/chat/completions", json=_body(query), timeout=30)
        bad = httpx.post(srv.url + "/v1/chat/completions", json=_body(query, stream="yes"), timeout=30)
    err = resp.json()["error"]
    assert resp.status_code == 504 and err["models_run"] == [first]
    assert err["spent"] > 0 and err["spent"] == pytest.approx(ScriptedBackends.cost(first))
    assert float(resp.headers[COST]) == pytest.approx(err["spent"])
    assert bad.status_code == 400 and bad.headers[COST] == "0" and bad.json()["error"]["param"] == "stream"


def test_metrics_count_chat_requests_and_called_models_only(ds, cascade):
    """401s of the other endpoints are not chat-completion requests; a model the request never
    called (its upstream attempts were spent) is not a model failure."""
    keys = parse_keys({"keys": [{"name": "a", "key": "sk-test-aaaa"}]}, "test")
    auth = {"Authorization": "Bearer sk-test-aaaa"}
    query = ds.queries[4]
    first = cascade.next_model(query, {})
    backends = ScriptedBackends(modes={m: "500" for m in ds.models})
    with scripted_server(cascade, backends, keys=keys, limits=ServerLimits(max_upstream_attempts=1)) as srv:
        for path in ("/metrics", "/v1/models", "/docs", "/v1/routing/stats"):
            assert httpx.get(srv.url + path, timeout=10).status_code == 401
        resp = httpx.post(srv.url + "/v1/chat/completions", json=_body(query), headers=auth, timeout=30)
        stats = httpx.get(srv.url + "/v1/routing/stats", headers=auth, timeout=10).json()
        samples = _samples(srv.url, headers=auth)
    assert resp.status_code == 502
    reasons = {f["model"]: f["reason"] for f in resp.json()["error"]["failures"]}
    assert reasons[first] == "http_500" and set(reasons.values()) - {"http_500"} == {"attempt_limit"}
    requests = {k: v for (n, k), v in samples.items() if n == "cascade_routing_requests_total"}
    assert requests == {(("status", "502"), ("stream", "false")): 1.0}
    failures = {dict(k)["model"]: v for (n, k), v in samples.items() if n == "cascade_routing_model_failures_total"}
    assert failures == {first: 1.0} and stats["failures"] == {first: 1}


def test_unknown_task_is_refused_naming_the_known_ones(ds):
    router = fitted_router(ds, Routing(), tasks=["arith", "geometry"])
    with scripted_server(router, ScriptedBackends()) as srv:
        bad = httpx.post(srv.url + "/v1/chat/completions", json=_body(ds.queries[0], routing={"task": "poetry"}),
                         timeout=30)
        good = httpx.post(srv.url + "/v1/chat/completions", json=_body(ds.queries[0], routing={"task": "arith"}),
                          timeout=30)
    err = bad.json()["error"]
    assert bad.status_code == 400 and err["param"] == "routing.task"
    assert "'poetry'" in err["message"] and "['arith', 'geometry']" in err["message"]
    assert good.status_code == 200


def test_stream_cut_by_a_shutdown_after_its_first_tokens_ends_with_an_error_event(ds, routing):
    """SIGTERM while a model is streaming: after the grace period the stream ends with a
    ``server_shutting_down`` error event (not a cut connection); the request is a shutdown."""
    query = ds.queries[5]
    first = routing.next_model(query, {})
    backends = ScriptedBackends(modes={first: "stream_hold"})
    srv = scripted_server(routing, backends, limits=ServerLimits(shutdown_timeout_s=2)).start()
    app = srv.server.config.app

    async def main():
        events = []
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", srv.url + "/v1/chat/completions",
                                     json=_body(query, stream=True)) as resp:
                lines = resp.aiter_lines()
                async for line in lines:  # up to the first content
                    event = sse_data(line)
                    if isinstance(event, dict) and event.get("choices") and event["choices"][0]["delta"].get("content"):
                        break
                stopping = asyncio.create_task(asyncio.to_thread(srv.stop))
                events = [sse_data(x) async for x in lines]
                await stopping
        return resp.status_code, [e for e in events if e is not None]

    try:
        status, events = asyncio.run(main())
    finally:
        backends.release.set()
        srv.stop()
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "server_shutting_down"
    assert "grace period of" in events[-2]["error"]["message"]  # the words of the JSON 503
    snap = app.state.ledger.snapshot()
    assert snap["shutdowns"] == 1 and snap["cancelled_calls"] == {first: 1}


def test_concurrent_requests_of_a_key_cannot_overshoot_its_max_spend(ds, routing):
    """30 requests of one key at once, each held at the backend: only as many are admitted as their
    worst-case reservations fit in ``max_spend``; the rest get 429 at once. Once all finished, the
    spend exceeds ``max_spend`` by less than one request's cost."""
    max_spend = 0.01
    keys = parse_keys({"keys": [{"name": "a", "key": "sk-test-aaaa", "max_spend": max_spend}]}, "test")
    auth = {"Authorization": "Bearer sk-test-aaaa"}
    backends = ScriptedBackends(modes={m: "hold" for m in ds.models})
    with scripted_server(routing, backends, keys=keys) as srv:
        gate = srv.server.config.app.state.gate

        async def main():
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=40)) as client:
                tasks = [asyncio.create_task(client.post(srv.url + "/v1/chat/completions", headers=auth,
                                                         json=_body(ds.queries[k % 20], max_tokens=20)))
                         for k in range(30)]
                deadline = time.monotonic() + 20
                while sum(t.done() for t in tasks) + gate.in_flight < 30:  # each refused or held
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                admitted = gate.in_flight
                backends.release.set()
                return admitted, await asyncio.gather(*tasks)

        admitted, responses = asyncio.run(main())
        spent = srv.server.config.app.state.ledger.spent("a")
    codes = [r.json()["error"]["code"] for r in responses if r.status_code != 200]
    assert all(r.status_code in (200, 429) for r in responses)
    assert 2 <= admitted < 30 and sum(r.status_code == 200 for r in responses) == admitted
    assert set(codes) <= {"quota_reserved", "insufficient_quota"} and "quota_reserved" in codes
    assert spent < max_spend + max(ScriptedBackends.cost(m) for m in ds.models)
