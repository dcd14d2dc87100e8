"""The server through the official ``openai`` client (sync and async) on a live loopback server
with replay backends: non-streaming, streaming (buffered cascade and pass-through routing),
forwarded parameters (tools, response_format, n, user, ...), rejected parameters, models.retrieve,
the cost header and /metrics."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cascade_routing.policies import CascadeRouting, Routing
from tests.serving_helpers import ServingStack, fitted_router

NAME = "cascade-routing"
TOOLS = [{"type": "function", "function": {
    "name": "submit_answer", "description": "Submit the final answer.",
    "parameters": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}}]


SERVING_ROWS = 30  # queries of the conftest's ``ds``
SERVING_SEED = 2


@pytest.fixture(scope="module")
def cascade(ds):
    with ServingStack(ds, fitted_router(ds, CascadeRouting(num_samples=64)), latency_ms=5) as s:
        yield s


@pytest.fixture(scope="module")
def routing(ds):
    with ServingStack(ds, fitted_router(ds, Routing()), latency_ms=5) as s:
        yield s


def _client(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _ask(ds, i):
    return [{"role": "user", "content": ds.queries[i]}]


def _collect(chunks):
    """(content, tool calls by index, finish reasons, the last chunk, number of content chunks)."""
    content, calls, finish, last, pieces = [], {}, {}, None, 0
    for chunk in chunks:
        last = chunk
        for choice in chunk.choices:
            if choice.delta.content:
                content.append(choice.delta.content)
                pieces += 1
            for call in choice.delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"name": "", "arguments": ""})
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return "".join(content), calls, finish, last, pieces


def test_non_streaming_with_cost_header(cascade, ds):
    client = _client(cascade)
    raw = client.chat.completions.with_raw_response.create(model=NAME, messages=_ask(ds, 0), temperature=0)
    completion = raw.parse()
    routing = completion.model_extra["routing"]
    assert completion.choices[0].message.content == ds.responses[0, ds.model_index(routing["model"])]
    assert float(raw.headers["x-cascade-routing-cost-usd"]) == pytest.approx(routing["total_cost"], rel=1e-9)
    assert raw.headers["x-cascade-routing-models-run"] == ",".join(routing["models_run"])
    assert completion.usage.total_tokens > 0


@pytest.mark.parametrize("which", ["cascade", "routing"])
def test_stream_reassembles_to_the_non_streamed_answer(which, request, ds):
    stack = request.getfixturevalue(which)
    client = _client(stack)
    for i in (1, 2, 3):
        full = client.chat.completions.create(model=NAME, messages=_ask(ds, i))
        raw = client.chat.completions.with_raw_response.create(
            model=NAME, messages=_ask(ds, i), stream=True, stream_options={"include_usage": True})
        content, calls, finish, last, pieces = _collect(raw.parse())
        assert content == full.choices[0].message.content and not calls
        assert finish == {0: full.choices[0].finish_reason}
        assert last.choices == [] and last.usage is not None
        assert last.usage.model_dump() == full.usage.model_dump()
        trace, full_trace = last.model_extra["routing"], full.model_extra["routing"]
        assert trace["models_run"] == full_trace["models_run"] and trace["total_cost"] == full_trace["total_cost"]
        streamed = [s["streamed"] for s in trace["steps"] if s["model"]]
        if which == "routing":  # one model, known up front: its tokens went straight through
            assert streamed == [True] and pieces > 1
            assert raw.headers["x-cascade-routing-model"] == trace["model"]
        else:
            assert not any(streamed) or trace["models_run"] == [trace["model"]]
            if not any(streamed):  # buffered: the whole trace is in the headers as well
                assert float(raw.headers["x-cascade-routing-cost-usd"]) == pytest.approx(trace["total_cost"])


def test_stream_without_usage_and_async_client(routing, ds):
    async def go():
        client = openai.AsyncOpenAI(base_url=routing.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        async def one(i):
            stream = await client.chat.completions.create(model=NAME, messages=_ask(ds, i), stream=True)
            return [chunk async for chunk in stream]
        out = await asyncio.gather(*(one(i) for i in range(8)))
        await client.close()
        return out

    for i, chunks in enumerate(asyncio.run(go())):
        content, _, finish, last, _ = _collect(chunks)
        assert content == ds.responses[i, ds.model_index(last.model_extra["routing"]["model"])]
        assert last.usage is None and finish == {0: "stop"}


@pytest.mark.parametrize("stream", [False, True])
def test_tools_are_forwarded_and_the_tool_call_returned(routing, ds, stream):
    client = _client(routing)
    routing.replay_app.state.received.clear()
    kwargs = dict(model=NAME, messages=_ask(ds, 4), tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)
    if stream:
        _, calls, finish, last, _ = _collect(client.chat.completions.create(stream=True, **kwargs))
        model = last.model_extra["routing"]["model"]
        call = calls[0]
        assert finish == {0: "tool_calls"}
    else:
        completion = client.chat.completions.create(**kwargs)
        model = completion.model_extra["routing"]["model"]
        assert completion.choices[0].finish_reason == "tool_calls"
        assert completion.choices[0].message.content is None
        tc = completion.choices[0].message.tool_calls[0]
        call = {"name": tc.function.name, "arguments": tc.function.arguments}
    assert call["name"] == "submit_answer"
    assert json.loads(call["arguments"]) == {"answer": ds.responses[4, ds.model_index(model)]}
    received = list(routing.replay_app.state.received)
    assert received and all(r["tools"] == TOOLS and r["tool_choice"] == "auto" for r in received)
    assert all(r["parallel_tool_calls"] is False for r in received)


def test_other_parameters_are_forwarded(routing, ds):
    client = _client(routing)
    routing.replay_app.state.received.clear()
    completion = client.chat.completions.create(
        model=NAME, messages=_ask(ds, 5), n=2, response_format={"type": "json_object"}, user="u-42",
        logprobs=True, top_logprobs=2, seed=7, presence_penalty=0.5, metadata={"k": "v"})
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[0].message.content == completion.choices[1].message.content
    (got,) = list(routing.replay_app.state.received)
    for key, value in {"n": 2, "response_format": {"type": "json_object"}, "user": "u-42", "logprobs": True,
                       "top_logprobs": 2, "seed": 7, "presence_penalty": 0.5, "metadata": {"k": "v"}}.items():
        assert got[key] == value, key


def test_rejected_parameters_are_bad_requests(cascade, ds):
    client = _client(cascade)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=_ask(ds, 0), modalities=["text", "audio"],
                                       audio={"voice": "alloy", "format": "wav"})
    assert err.value.body["param"] in ("audio", "modalities")
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        client.chat.completions.create(model=NAME, messages=_ask(ds, 0), extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.chat.completions.create(model=NAME, messages=_ask(ds, 0), n=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=_ask(ds, 0), stream=True)


def test_models_retrieve(cascade, ds):
    client = _client(cascade)
    card = client.models.retrieve(NAME)
    assert card.id == NAME and card.model_extra["models"] == ds.models
    assert [m.id for m in client.models.list()] == [NAME]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_metrics_count_requests_and_spend(ds):
    with ServingStack(ds, fitted_router(ds, CascadeRouting(num_samples=64))) as stack:
        client = _client(stack)
        for i in range(4):
            client.chat.completions.create(model=NAME, messages=_ask(ds, i))
        list(client.chat.completions.create(model=NAME, messages=_ask(ds, 4), stream=True))
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=NAME, messages=_ask(ds, 0), extra_body={"bad": 1})
        text = httpx.get(stack.url + "/metrics", timeout=10).text
        stats = httpx.get(stack.url + "/v1/routing/stats", timeout=10).json()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("cascade_routing_requests_total", (("status", "200"), ("stream", "false")))] == 4
    assert samples[("cascade_routing_requests_total", (("status", "200"), ("stream", "true")))] == 1
    assert samples[("cascade_routing_errors_total", (("kind", "bad_request"),))] == 1
    spend = sum(v for (n, _), v in samples.items() if n == "cascade_routing_spend_usd_total")
    assert spend == pytest.approx(stats["total_cost"], rel=1e-9)
    runs = {dict(k)["model"]: v for (n, k), v in samples.items() if n == "cascade_routing_models_run_total"}
    assert runs == {m: float(c) for m, c in stats["runs"].items()}
    assert samples[("cascade_routing_key_spend_usd_total", (("key", "anonymous"),))] == pytest.approx(spend)
    assert samples[("cascade_routing_request_latency_seconds_count", (("stream", "false"),))] == 4
    lam = [v for (n, _), v in samples.items() if n == "cascade_routing_lambda"]
    assert lam and lam[0] > 0
    assert samples[("cascade_routing_budget_usd", ())] == pytest.approx(stats["budget"])
    assert samples[("cascade_routing_time_to_first_token_seconds_count", (("mode", "buffered"),))] == 1
