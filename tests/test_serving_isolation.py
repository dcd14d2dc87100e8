"""Each request succeeds or fails on its own: field validation before any work (400 naming the
field), and per-request isolation in the estimators, the compute batching and the backends, with
whatever a request spent always recorded in the spend account."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cascade_routing.serving import CascadeRouter
from cascade_routing.serving.router import RouteRequest
from cascade_routing.serving.schema import ChatCompletionRequest, RequestError, parse_chat_request
from tests.serving_helpers import FEATURE_NAMES, ServingStack, bind, stand_in_router

NAME = "cascade-routing"
POISON = "POISON"


SERVING_ROWS = 40  # queries of the conftest's ``ds``


@pytest.fixture(scope="module")
def parts(ds):
    router, _, budget = stand_in_router(ds)
    return router.policy, router.fitted_table, budget


def poisoned_bind(queries, responses=None, features=None, tasks=None):
    """The stand-in binder, but a query containing POISON breaks it (like the tokenizer on a bad text)."""
    if any(POISON in q for q in queries):
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
    return bind(queries, responses, features, tasks)


def _body(query: str, **extra) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": query}], **extra}


@pytest.mark.parametrize("raw, param, words", [
    ('{"model": "cascade-routing", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content", ["lone surrogate"]),
    ('{"model": "cascade-routing", "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}',
     "temperature", ["finite"]),
    ('{"model": "cascade-routing", "top_p": Infinity, "messages": [{"role": "user", "content": "hi"}]}',
     "top_p", ["finite"]),
    ('{"model": "cascade-routing", "routing": {"budget": 1e999}, "messages": [{"role": "user", "content": "hi"}]}',
     "routing.budget", ["finite"]),
    ('{"model": "cascade-routing", "temperature": "hot", "messages": [{"role": "user", "content": "hi"}]}',
     "temperature", ["valid number"]),
    ('{"model": "cascade-routing", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}',
     "max_tokens", ["greater than or equal to 1"]),
    ('{"model": "cascade-routing", "messages": [{"role": "wizard", "content": "hi"}]}',
     "messages[0].role", ["'messages[0].role'"]),
    ('{"model": "cascade-routing", "messages": [{"role": "user", "content": 5}]}',
     "messages[0].content", ["'messages[0].content'"]),
    ('{"model": "cascade-routing", "frobnicate": 1, "messages": [{"role": "user", "content": "hi"}]}',
     "frobnicate", ["unknown field"]),
    ('{"model": "cascade-routing", "routing": {"budget": 0.1, "lambda": 3}, "messages": [{"role": "user", "content": "hi"}]}',
     "routing.lambda", ["unknown field"]),
    ('{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', "model", ["'model'"]),
])
def test_every_field_is_validated_naming_it(raw, param, words):
    with pytest.raises(RequestError) as info:
        parse_chat_request(raw.encode())
    assert info.value.status == 400 and info.value.param == param, info.value.message
    for w in words:
        assert w in info.value.message


@pytest.mark.parametrize("field, value", [
    ("stream", "yes"), ("stream", 1), ("logprobs", "true"), ("store", 0), ("parallel_tool_calls", "no"),
    ("max_tokens", "5"), ("max_tokens", 5.0), ("max_tokens", True), ("n", 2.0), ("seed", "7"),
    ("top_logprobs", 1.5), ("max_completion_tokens", "10"),
    ("temperature", "0.5"), ("temperature", True), ("top_p", "1"), ("presence_penalty", "0"),
    ("logit_bias", {"50256": "-100"}), ("stream_options", {"include_usage": "yes"}), ("routing", {"budget": "0.1"}),
])
def test_wrong_types_are_refused_not_coerced(field, value):
    """As in OpenAI's API: a boolean must be true/false, an integer a JSON integer, a number never a string."""
    body = _body("hi", **{field: value})
    if field == "stream_options":
        body["stream"] = True
    with pytest.raises(RequestError) as info:
        parse_chat_request(json.dumps(body).encode())
    assert info.value.status == 400 and info.value.param.split(".")[0] == field, info.value.message


def test_numbers_keep_their_accepted_forms():
    """A number field takes an integer; the strict fields take their own type."""
    req = parse_chat_request(json.dumps(_body("hi", temperature=1, top_p=1, max_tokens=5, n=1, stream=False,
                                              logit_bias={"1": -100}, routing={"budget": 1})).encode())
    assert req.temperature == 1.0 and req.max_tokens == 5 and req.logit_bias == {"1": -100.0}
    assert req.routing.budget == 1.0


def test_an_integer_past_the_digit_limit_is_a_400():
    """json.loads refuses integers of more than 4,300 digits with a ValueError: a 400, not a 500."""
    raw = b'{"model": "cascade-routing", "max_tokens": ' + b"9" * 5000 + b', "messages": [{"role": "user", "content": "hi"}]}'
    with pytest.raises(RequestError) as info:
        parse_chat_request(raw)
    assert info.value.status == 400 and "malformed JSON" in info.value.message and "digits" in info.value.message


def test_invalid_utf8_bytes_are_a_400():
    with pytest.raises(RequestError, match="malformed JSON"):
        parse_chat_request(b'{"model": "x", "messages": [{"role": "user", "content": "\xff\xfe"}]}')


def test_forwarded_params_are_only_those_the_client_set():
    req = parse_chat_request(json.dumps(_body("hi", temperature=0, stop=["\n"])).encode())
    assert req.forwarded_params() == {"temperature": 0.0, "stop": ["\n"]}
    assert req.query() == "hi" and req.messages_payload() == [{"role": "user", "content": "hi"}]

    class Extended(ChatCompletionRequest):  # how a new OpenAI parameter is added
        FORWARDED = (*ChatCompletionRequest.FORWARDED, "user")
        user: str | None = None

    req = parse_chat_request(json.dumps(_body("hi", user="u-1")).encode(), Extended)
    assert req.forwarded_params() == {"user": "u-1"}


def test_route_batch_isolates_a_query_that_breaks_the_estimators(ds, parts):
    """Router level: the poisoned query gets its exception, the others their answers."""
    policy, table, budget = parts
    router = CascadeRouter(policy, poisoned_bind, table, ds.models, budget=budget, feature_names=FEATURE_NAMES)

    async def backend(model):
        async def call(messages, **params):
            return f"{model} says CORRECT"
        return call

    async def main():
        backends = {m: await backend(m) for m in ds.models}
        items = [RouteRequest(q) for q in ds.queries[:9]] + [RouteRequest(f"{POISON} {ds.queries[9]}")]
        return await router.route_batch(items, backends)

    out = asyncio.run(main())
    assert all(not isinstance(r, BaseException) for r in out[:9])
    assert isinstance(out[9], TypeError)


async def _post_all(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*(client.post(url, content=b, headers={"Content-Type": "application/json"})
                                      for b in bodies))


@pytest.mark.parametrize("poison", ["surrogate", "nan", "estimator"])
def test_one_poisoned_request_among_40_leaves_39_answered_and_billed(ds, parts, poison):
    """Over loopback HTTP: 40 concurrent requests, one of them poisoned; the other 39 get 200 and
    their cost reaches the spend account (sum of the delivered costs = the account's total)."""
    policy, table, budget = parts
    router = CascadeRouter(policy, poisoned_bind, table, ds.models, budget=budget, feature_names=FEATURE_NAMES)
    bodies = [json.dumps(_body(q)).encode() for q in ds.queries[:39]]
    bad = {
        "surrogate": b'{"model": "cascade-routing", "messages": [{"role": "user", "content": "\\ud800"}]}',
        "nan": b'{"model": "cascade-routing", "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}',
        "estimator": json.dumps(_body(f"{POISON} {ds.queries[39]}")).encode(),
    }[poison]
    bodies.insert(17, bad)
    with ServingStack(ds, router, budget=budget, batch_window_ms=20) as stack:
        responses = asyncio.run(_post_all(stack.url + "/v1/chat/completions", bodies))
        stats = httpx.get(stack.url + "/v1/routing/stats", timeout=10).json()
    assert [r.status_code for k, r in enumerate(responses) if k != 17] == [200] * 39
    assert responses[17].status_code == (500 if poison == "estimator" else 400), responses[17].text
    delivered = sum(r.json()["routing"]["total_cost"] for k, r in enumerate(responses) if k != 17)
    assert stats["answered"] == 39
    assert stats["total_cost"] == pytest.approx(delivered, rel=1e-12)
    if poison == "estimator":
        assert stats["errors"] == 1 and stats["requests"] == 40
        assert stats["batching"]["mean_batch"] > 1  # the 40 were computed in shared batches
    else:
        assert stats["requests"] == 39  # rejected before any work


def test_a_backend_fault_fails_only_its_request_and_its_spend_is_recorded(ds, parts):
    """A non-HTTP fault inside one request's backend call, after an answer was paid for: that
    request gets 500 with ``spent``, the account holds the paid answer, the others are unaffected."""
    policy, table, budget = parts
    router = CascadeRouter(policy, bind, table, ds.models, budget=budget, feature_names=FEATURE_NAMES)
    url_bodies = [json.dumps(_body(q)).encode() for q in ds.queries[:10]]
    with ServingStack(ds, router, budget=budget) as stack:
        first = asyncio.run(_post_all(stack.url + "/v1/chat/completions", url_bodies))
        runs = [len(r.json()["routing"]["models_run"]) for r in first]
        victim = next(i for i, n in enumerate(runs) if n >= 2)  # a query that runs a second model
        pool = stack.pool
        original = pool.complete
        calls: dict[str, int] = {}

        async def faulty(model, messages, **params):
            text = messages[-1]["content"]
            calls[text] = calls.get(text, 0) + 1
            if text == ds.queries[victim] and calls[text] == 2:
                raise ValueError("Out of range float values are not JSON compliant")
            return await original(model, messages, **params)

        pool.complete = faulty
        before = httpx.get(stack.url + "/v1/routing/stats", timeout=10).json()
        responses = asyncio.run(_post_all(stack.url + "/v1/chat/completions", url_bodies))
        stats = httpx.get(stack.url + "/v1/routing/stats", timeout=10).json()
    codes = [r.status_code for r in responses]
    assert codes[victim] == 500 and "Out of range float" in responses[victim].text
    assert [c for i, c in enumerate(codes) if i != victim] == [200] * 9
    spent = responses[victim].json()["error"]["spent"]
    assert spent == pytest.approx(first[victim].json()["routing"]["steps"][0]["cost"])
    delivered = sum(r.json()["routing"]["total_cost"] for r in responses if r.status_code == 200)
    assert stats["total_cost"] - before["total_cost"] == pytest.approx(delivered + spent, rel=1e-9)
    assert stats["errors"] - before["errors"] == 1
