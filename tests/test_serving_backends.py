"""Backends YAML validation, cost from real usage, retries/backoff, timeouts, concurrency limit."""

from __future__ import annotations

import asyncio
import httpx
import pytest
import yaml

from cascade_routing.serving.backends import (
    BackendConfigError,
    BackendError,
    BackendPool,
    RequestRejectedError,
    _StreamedAnswer,
    load_backend_configs,
    parse_backends,
    parse_usage,
    rejection,
)


def _doc(**entry):
    base = {"name": "m", "base_url": "http://upstream/v1", "price_per_input_token": 1e-6,
            "price_per_output_token": 2e-6}
    base.update(entry)
    return {"defaults": {"timeout_s": 1, "max_retries": 2, "backoff_s": 0.001}, "models": [base]}


def _ok(content="hi", prompt=10, completion=20, **extra):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop", **extra.pop("choice", {})}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion}, **extra}


def _pool(doc, handler):
    return BackendPool(parse_backends(doc), client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


def test_example_config_parses():
    from pathlib import Path

    configs = load_backend_configs(Path(__file__).resolve().parents[1] / "configs" / "backends.example.yaml")
    assert configs and all(c.price_out >= 0 for c in configs.values())


@pytest.mark.parametrize("change, message", [
    ({"price_per_input_token": None}, "exactly one of price_per_input_token"),
    ({"price_per_1m_input_tokens": 1.0}, "exactly one of price_per_input_token"),
    ({"price_per_output_token": -1}, "must be a finite number >= 0"),
    ({"base_url": "ftp://x"}, "must be an http"),
    ({"colour": "red"}, "unknown key"),
    ({"name": ""}, "'name' must be a non-empty string"),
    ({"timeout_s": 0}, "timeout_s > 0"),
])
def test_bad_config_names_the_problem(change, message):
    doc = _doc(**change)
    doc["models"][0] = {k: v for k, v in doc["models"][0].items() if v is not None}
    with pytest.raises(BackendConfigError, match=message):
        parse_backends(doc, "b.yaml")


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_backend_configs(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(BackendConfigError, match="not valid YAML"):
        load_backend_configs(bad)
    dup = tmp_path / "dup.yaml"
    doc = _doc()
    doc["models"].append(dict(doc["models"][0]))
    dup.write_text(yaml.safe_dump(doc))
    with pytest.raises(BackendConfigError, match="duplicate"):
        load_backend_configs(dup)


def test_per_million_prices_and_cost_from_usage(monkeypatch):
    seen = {}

    def handler(request):
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = request.read()
        return httpx.Response(200, json=_ok(prompt=1000, completion=500, x_cost_usd=123.0))

    monkeypatch.setenv("TEST_KEY", "sk-test")
    doc = _doc(price_per_input_token=None, price_per_output_token=None, price_per_1m_input_tokens=3.0,
               price_per_1m_output_tokens=15.0, api_key_env="TEST_KEY", model_id="upstream-name")
    doc["models"][0] = {k: v for k, v in doc["models"][0].items() if v is not None}

    async def go():
        async with _pool(doc, handler) as pool:
            return await pool.complete("m", [{"role": "user", "content": "q"}], temperature=0)

    ans = asyncio.run(go())
    assert ans.cost == pytest.approx(1000 * 3e-6 + 500 * 15e-6)  # reported cost not trusted by default
    assert ans.features["tokens_in"] == 1000 and ans.features["tokens_out"] == 500
    assert seen["auth"] == "Bearer sk-test"
    assert b'"model":"upstream-name"' in seen["body"].replace(b" ", b"")


def test_trusted_reported_cost_recorded_features_and_logprobs():
    body = _ok(x_cost_usd=0.5, x_recorded_features={"latency_ms": 42.0},
               choice={"logprobs": {"content": [{"logprob": -0.5}, {"logprob": -1.5}]}})

    async def go(trust):
        async with _pool(_doc(trust_reported_cost=trust), lambda r: httpx.Response(200, json=body)) as pool:
            return await pool.complete("m", [])

    ans = asyncio.run(go(True))
    assert ans.cost == 0.5
    assert ans.features["latency_ms"] == 42.0
    assert ans.features["logprob_confidence"] == pytest.approx(-1.0)  # mean token log-prob
    assert asyncio.run(go(False)).cost == pytest.approx(10 * 1e-6 + 20 * 2e-6)


def test_retries_5xx_then_succeeds_but_not_4xx():
    calls = {"n": 0}

    def flaky(request):
        calls["n"] += 1
        return httpx.Response(503 if calls["n"] < 3 else 200, json=_ok() if calls["n"] >= 3 else {"error": "busy"})

    async def go(handler, retries=2):
        async with _pool(_doc(max_retries=retries), handler) as pool:
            return await pool.complete("m", [])

    assert asyncio.run(go(flaky)).attempts == 3
    calls["n"] = 0
    with pytest.raises(BackendError) as err:
        asyncio.run(go(flaky, retries=1))
    assert err.value.reason == "http_503" and err.value.attempts == 2
    calls["n"] = 0

    def bad_request(request):
        calls["n"] += 1
        return httpx.Response(400, json={"error": {"message": "bad"}})

    with pytest.raises(BackendError) as err:
        asyncio.run(go(bad_request))
    assert err.value.reason == "http_400" and calls["n"] == 1


@pytest.mark.parametrize("usage, words", [
    ({"prompt_tokens": -1000000, "completion_tokens": 1}, "usage.prompt_tokens"),
    ({"prompt_tokens": "abc"}, "usage.prompt_tokens"), ({"prompt_tokens": 1.5}, "usage.prompt_tokens"),
    ({"completion_tokens": float("inf")}, "usage.completion_tokens"), ({"completion_tokens": True}, "usage.completion_tokens"),
    ({"completion_tokens": 2**60}, "usage.completion_tokens"), ([1], "usage must be an object"), ("12", "usage must be an object"),
])
def test_invalid_usage_is_that_backends_failure(usage, words):
    """Token counts must be integers in [0, 2**53]: anything else is a ``bad_response`` naming the field,
    never a negative or infinite cost (and no retry: the endpoint answered)."""
    calls = {"n": 0}

    def handler(request):
        import json

        calls["n"] += 1  # json.dumps writes Infinity as Python's JSON reader accepts it
        return httpx.Response(200, content=json.dumps({**_ok(), "usage": usage}).encode(),
                              headers={"content-type": "application/json"})

    async def go():
        async with _pool(_doc(), handler) as pool:
            return await pool.complete("m", [])

    with pytest.raises(BackendError) as err:
        asyncio.run(go())
    assert err.value.reason == "bad_response" and words in err.value.detail and calls["n"] == 1


def test_valid_usage_forms_and_reported_cost():
    assert parse_usage(None) == (0, 0) and parse_usage({}) == (0, 0)
    assert parse_usage({"prompt_tokens": 3, "completion_tokens": 4.0, "total_tokens": 7}) == (3, 4)
    assert parse_usage({"prompt_tokens": None, "completion_tokens": 2**53}) == (0, 2**53)

    async def go(reported):
        handler = lambda r: httpx.Response(200, json=_ok(x_cost_usd=reported))  # noqa: E731
        async with _pool(_doc(trust_reported_cost=True), handler) as pool:
            return await pool.complete("m", [])

    assert asyncio.run(go(0.25)).cost == 0.25
    with pytest.raises(BackendError, match="x_cost_usd"):
        asyncio.run(go(-0.25))


@pytest.mark.parametrize("event, words", [
    ({"choices": [{"index": "x", "delta": {"content": "z"}}]}, "choices[].index"),
    ({"choices": [{"index": -1, "delta": {"content": "z"}}]}, "choices[].index"),
    ({"choices": [{"index": 0, "delta": "z"}]}, "delta must be an object"),
    ({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "a"}]}}]}, "tool_calls[].index"),
    ({"choices": [{"index": 0, "delta": {"tool_calls": ["f"]}}]}, "tool_calls[] must be objects"),
    ({"choices": {"index": 0}}, "choices must be a list"),
])
def test_malformed_stream_chunks_name_the_field(event, words):
    with pytest.raises(ValueError) as err:
        _StreamedAnswer().add(event)
    assert words in str(err.value)


def test_a_malformed_stream_chunk_is_a_bad_response():
    def handler(request):
        body = (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
                b'data: {"choices":[{"index":"x","delta":{"content":"z"}}]}\n\n')
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with _pool(_doc(), handler) as pool:
            return await pool.stream("m", [], lambda choice: asyncio.sleep(0))

    with pytest.raises(BackendError) as err:
        asyncio.run(go())
    assert err.value.reason == "bad_response" and "choices[].index" in err.value.detail


@pytest.mark.parametrize("status, body, rejected", [
    (400, {"error": {"message": "max_tokens is too large", "param": "max_tokens", "code": "invalid_value"}}, True),
    (413, {"error": {"message": "too big"}}, True), (422, "unprocessable", True),
    (400, {"error": {"message": "too long", "code": "context_length_exceeded"}}, False),
    (401, {"error": {"message": "bad key"}}, False), (404, {"error": {"message": "no such model"}}, False),
])
def test_which_4xx_refuse_the_request_itself(status, body, rejected):
    """400/413/422 are the request's fault (every model would refuse it); a context-length 400 is
    that model's limit and 401/403/404 its endpoint's configuration: those fall back."""
    import json

    text = json.dumps(body) if isinstance(body, dict) else body
    err = rejection("m", status, text, 1)
    assert isinstance(err, RequestRejectedError) == rejected and err.reason == f"http_{status}"
    if rejected and isinstance(body, dict):
        assert err.status == status and err.message == body["error"]["message"]
        assert (err.param, err.code) == (body["error"].get("param"), body["error"].get("code"))


def test_timeouts_and_connection_errors_are_retried_then_reported():
    calls = {"n": 0}

    def timeout(request):
        calls["n"] += 1
        raise httpx.ReadTimeout("slow", request=request)

    async def go(handler):
        async with _pool(_doc(max_retries=1), handler) as pool:
            return await pool.complete("m", [])

    with pytest.raises(BackendError) as err:
        asyncio.run(go(timeout))
    assert err.value.reason == "timeout" and calls["n"] == 2

    def refused(request):
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(BackendError) as err:
        asyncio.run(go(refused))
    assert err.value.reason == "connection_error"

    with pytest.raises(BackendError, match="bad_response"):
        asyncio.run(go(lambda r: httpx.Response(200, json={"nothing": 1})))


def test_concurrency_limit_is_respected():
    state = {"now": 0, "max": 0}

    async def handler(request):
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        return httpx.Response(200, json=_ok())

    async def go():
        async with _pool(_doc(max_concurrency=3), handler) as pool:
            return await asyncio.gather(*(pool.complete("m", []) for _ in range(20)))

    assert len(asyncio.run(go())) == 20
    assert state["max"] == 3


def test_unknown_model_in_pool():
    pool = BackendPool(parse_backends(_doc()))
    with pytest.raises(KeyError, match="no backend configured for model 'x'"):
        pool["x"]
    asyncio.run(pool.aclose())


def test_calls_take_the_connection_pools_in_turn_and_all_are_closed():
    """The default client spreads its connections over several pools; calls (plain and streamed)
    go to each pool in turn, and closing the backends closes every pool."""
    from cascade_routing.serving.backends import ShardedClient, pooled_client

    client = pooled_client(max_connections=10, connection_pools=4)
    assert len(client.clients) == 4
    assert all(c._transport._pool._max_connections == 3 for c in client.clients)  # ceil(10 / 4)
    asyncio.run(client.aclose())
    assert all(c.is_closed for c in client.clients)
    for bad in [(0, 1), (4, 5), (4, 0)]:
        with pytest.raises(ValueError, match="connection_pools"):
            pooled_client(*bad)
    with pytest.raises(ValueError, match="at least one client"):
        ShardedClient([])

    seen: list[int] = []

    def handler_for(k):
        def handler(request):
            seen.append(k)
            return httpx.Response(200, json=_ok())
        return handler

    clients = [httpx.AsyncClient(transport=httpx.MockTransport(handler_for(k))) for k in range(3)]

    async def go():
        async with BackendPool(parse_backends(_doc()), client=ShardedClient(clients)) as pool:
            for _ in range(7):
                assert (await pool.complete("m", [])).text == "hi"

    asyncio.run(go())
    assert seen == [1, 2, 0, 1, 2, 0, 1]
    # a pool given by the caller is the caller's to close
    assert not any(c.is_closed for c in clients)
    owned = BackendPool(parse_backends(_doc()), max_connections=8, connection_pools=2)
    asyncio.run(owned.aclose())
    assert all(c.is_closed for c in owned._client.clients)
