"""The OpenAI-compatible server over real HTTP on loopback, with replay backends behind it.

Covers: 4xx JSON errors in OpenAI's shape; /v1/models, /health, the spend account; fallback when a
backend is down, slow past its timeout, or returns 500; 502 when no model can answer; and (with
stand-in estimators) per-query equality of realised quality and cost with the offline simulation.
"""

from __future__ import annotations

import httpx
import pytest

from cascade_routing.serving import CascadeRouter
from tests.serving_helpers import ServingStack

NAME = "cascade-routing"


SERVING_ROWS = 30  # queries of the conftest's ``ds``


@pytest.fixture(scope="module")
def stack(ds, stand_in):
    with ServingStack(ds, stand_in[0], budget=stand_in[2]) as s:
        yield s


def _chat(url, query, timeout=20.0, **extra):
    body = {"model": NAME, "messages": [{"role": "user", "content": query}], **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def _assert_error(resp, status, *words):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"]
    return err


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, ["malformed JSON"]),
    (b"[1, 2]", 400, ["JSON object"]),
    (b'{"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}', 404, ["unknown model", "gpt-5"]),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, ["'model' is required"]),
    (b'{"model": "cascade-routing"}', 400, ["'messages'"]),
    (b'{"model": "cascade-routing", "messages": []}', 400, ["'messages'", "at least 1"]),
    (b'{"model": "cascade-routing", "messages": [{"role": "system", "content": "x"}]}', 400, ["user message"]),
    (b'{"model": "cascade-routing", "messages": ["hi"]}', 400, ["messages[0]"]),
    (b'{"model": "cascade-routing", "audio": {"voice": "alloy"}, "messages": [{"role": "user", "content": "hi"}]}',
     400, ["audio"]),
    (b'{"model": "cascade-routing", "frobnicate": 1, "messages": [{"role": "user", "content": "hi"}]}', 400,
     ["frobnicate"]),
    (b'{"model": "cascade-routing", "n": 0, "messages": [{"role": "user", "content": "hi"}]}', 400, ["'n'"]),
    (b'{"model": "cascade-routing", "stream_options": {"include_usage": true}, '
     b'"messages": [{"role": "user", "content": "hi"}]}', 400, ["stream_options"]),
    (b'{"model": "cascade-routing", "routing": {"budget": -1}, "messages": [{"role": "user", "content": "hi"}]}',
     400, ["routing.budget"]),
    (b'{"model": "cascade-routing", "routing": {"budget": 1e-12}, "messages": [{"role": "user", "content": "hi"}]}',
     400, ["smallest fitted budget"]),
])
def test_bad_requests_get_clear_json_errors(stack, body, status, words):
    resp = httpx.post(stack.url + "/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json"}, timeout=10)
    _assert_error(resp, status, *words)


def test_unknown_route_is_json_404(stack):
    _assert_error(httpx.get(stack.url + "/v1/nothing", timeout=10), 404)


def test_models_health_and_answer_shape(stack, ds, stand_in):
    router, sim, budget = stand_in
    models = httpx.get(stack.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == NAME
    assert models["data"][0]["models"] == ds.models
    resp = _chat(stack.url, ds.queries[0], temperature=0)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == NAME
    assert body["choices"][0]["message"]["role"] == "assistant"
    r = body["routing"]
    assert r["models_run"] and r["model"] in r["models_run"]
    assert body["choices"][0]["message"]["content"] == ds.responses[0, ds.model_index(r["model"])]
    assert r["total_cost"] == pytest.approx(sum(r["costs"].values()))
    assert r["steps"][0]["estimate_mean"].keys() == set(ds.models)
    assert resp.headers["x-request-id"] == r["request_id"]
    rid = httpx.post(stack.url + "/v1/chat/completions", headers={"X-Request-ID": "abc-123"}, timeout=10,
                     json={"model": NAME, "messages": [{"role": "user", "content": ds.queries[1]}]})
    assert rid.headers["x-request-id"] == "abc-123" and rid.json()["routing"]["request_id"] == "abc-123"
    health = httpx.get(stack.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["budget"] == budget
    assert health["spend"]["requests"] >= 2 and health["spend"]["total_cost"] > 0
    stats = httpx.get(stack.url + "/v1/routing/stats", timeout=10).json()
    assert stats["mean_cost"] == pytest.approx(stats["total_cost"] / stats["requests"])


def test_request_ids_are_echoed_only_when_short_printable_ascii(stack, ds):
    """A client's X-Request-ID of 1..MAX_REQUEST_ID_CHARS printable ASCII characters is echoed; a longer
    one (20 KB was echoed whole, in the header, the trace and the logs) or one with other characters is
    replaced by a fresh id, as an absent one is (the request is still served)."""
    from cascade_routing.serving.server import MAX_REQUEST_ID_CHARS

    body = {"model": NAME, "messages": [{"role": "user", "content": ds.queries[2]}]}
    longest = "r" * (MAX_REQUEST_ID_CHARS - 2) + " ~"
    for sent, echoed in ((longest, True), ("x" * (MAX_REQUEST_ID_CHARS + 1), False), ("y" * 20_000, False),
                         (b"caf\xe9", False), ("a\tb", False)):
        resp = httpx.post(stack.url + "/v1/chat/completions", headers={"X-Request-ID": sent}, json=body, timeout=10)
        assert resp.status_code == 200, resp.text
        rid = resp.headers["x-request-id"]
        assert rid == resp.json()["routing"]["request_id"]
        if echoed:
            assert rid == sent
        else:
            assert len(rid) == 32 and int(rid, 16) >= 0, rid  # a fresh uuid4().hex
    assert MAX_REQUEST_ID_CHARS == 128


def test_end_to_end_equals_offline_simulation(stack, ds, stand_in):
    """Per query: same models run in the same order, same answer model, realised quality and cost."""
    router, sim, budget = stand_in
    for i, q in enumerate(ds.queries):
        r = _chat(stack.url, q).json()["routing"]
        expected = [ds.models[j] for j in sim.order[i].tolist() if j >= 0]
        assert r["models_run"] == expected, f"query {i}"
        answer = ds.model_index(r["model"])
        assert answer == int(sim.answer[i])
        assert ds.quality[i, answer] == float(sim.quality[i])
        assert r["total_cost"] == pytest.approx(float(sim.cost[i]), rel=1e-12, abs=0)


@pytest.mark.parametrize("mode", ["down", "500", "slow"])
def test_failing_backend_falls_back(ds, stand_in, mode):
    router, sim, budget = stand_in
    query = ds.queries[2]
    first = router.next_model(query, {})
    with ServingStack(ds, router, failures={first: mode}, timeout_s=0.3, slow_ms=2000) as s:
        resp = _chat(s.url, query)
        assert resp.status_code == 200, resp.text
        r = resp.json()["routing"]
        assert r["failures"][0]["model"] == first
        assert r["failures"][0]["reason"] == {"down": "connection_error", "500": "http_500", "slow": "timeout"}[mode]
        assert r["failures"][0]["attempts"] == 2  # one retry
        assert first not in r["models_run"] and r["models_run"] and r["attempted"][0] == first
        assert httpx.get(s.url + "/health", timeout=10).json()["spend"]["failures"] == {first: 1}


def test_502_when_no_model_can_answer(ds, stand_in):
    router, sim, budget = stand_in
    failures = {ds.models[0]: "down", ds.models[1]: "500", ds.models[2]: "500"}
    with ServingStack(ds, router, failures=failures, timeout_s=0.3) as s:
        resp = _chat(s.url, ds.queries[0])
        err = _assert_error(resp, 502, "no model could answer")
        assert {f["model"] for f in err["failures"]} == set(ds.models)
        assert httpx.get(s.url + "/health", timeout=10).json()["spend"]["errors"] == 1


def test_estimator_fault_is_a_json_500(ds, stand_in):
    router, sim, budget = stand_in

    def broken_binder(*args, **kwargs):
        raise RuntimeError("estimator exploded")

    broken = CascadeRouter(router.policy, broken_binder, router.fitted_table, ds.models, budget=budget)
    with ServingStack(ds, broken) as s:
        err = _assert_error(_chat(s.url, ds.queries[0]), 500, "estimator exploded")
        assert err["type"] == "server_error"
        assert _chat(s.url, ds.queries[1]).status_code == 500  # the server keeps serving
