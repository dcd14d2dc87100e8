"""SSE chunk formatting, the chat-parameter table, and streaming when the streamed backend fails."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from cascade_routing.policies import CascadeRouting, FittedLambda, Routing, fit_lambda
from cascade_routing.serving import CascadeRouter
from cascade_routing.serving.backends import _StreamedAnswer, answer_text
from cascade_routing.serving.params import FORWARDED
from cascade_routing.serving.schema import ChatCompletionRequest, RequestError, parse_chat_request
from cascade_routing.serving.streaming import DONE, ChunkWriter, completion_chunks, split_text, sse, sse_data
from tests.serving_helpers import FEATURE_NAMES, ServingStack, bind, offline_features, synthetic_dataset

CHOICES = [
    {"index": 0, "message": {"role": "assistant", "content": "The answer is 42, obviously."}, "finish_reason": "stop",
     "logprobs": None},
    {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
     "finish_reason": "tool_calls", "logprobs": None},
]


def test_completion_chunks_rebuild_the_completion():
    writer = ChunkWriter("m", include_usage=True, completion_id="chatcmpl-1", created=5)
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    chunks = completion_chunks(writer, CHOICES, usage, {"model": "x"}, piece_chars=5)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)
    assert all("usage" in c for c in chunks)  # include_usage: null on all but the last
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage and chunks[-1]["routing"] == {"model": "x"}
    acc = _StreamedAnswer()
    for c in chunks:  # the backend-side accumulator reads what the server writes
        acc.add(json.loads(sse(c)[6:]))
    body = acc.body()
    assert body["choices"][0]["message"]["content"] == CHOICES[0]["message"]["content"]
    assert body["choices"][1]["message"]["tool_calls"] == CHOICES[1]["message"]["tool_calls"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "tool_calls"]
    assert body["usage"] == usage
    no_usage = completion_chunks(ChunkWriter("m"), CHOICES[:1], usage, None)
    assert all("usage" not in c for c in no_usage) and no_usage[-1]["choices"][0]["finish_reason"] == "stop"


def test_sse_wire_format():
    assert sse({"a": 1}) == b'data: {"a":1}\n\n' and DONE == b"data: [DONE]\n\n"
    assert sse_data('data: {"a": 1}') == {"a": 1} and sse_data("data: [DONE]") == "[DONE]"
    assert sse_data(": keep-alive") is None and sse_data("") is None
    with pytest.raises(ValueError):
        sse_data("data: [1, 2]")
    assert split_text("abcdefg", 3) == ["abc", "def", "g"] and split_text("", 3) == [""]


def test_answer_text_of_tool_calls():
    assert answer_text(CHOICES[0]["message"]) == "The answer is 42, obviously."
    assert answer_text(CHOICES[1]["message"]) == 'tool_call f {"x": 1}'
    assert answer_text({"role": "assistant", "content": None}) is None


def _parse(body):
    return parse_chat_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                          **body}).encode())


def test_parameter_table():
    """Every FORWARDED name is a request field; set values reach forwarded_params as given; the
    refused ones name themselves; types are checked."""
    assert set(FORWARDED) <= set(ChatCompletionRequest.model_fields) and len(set(FORWARDED)) == len(FORWARDED)
    chat = _parse({"tools": [{"type": "function"}], "n": 2, "user": "u", "temperature": None})
    assert chat.forwarded_params() == {"tools": [{"type": "function"}], "n": 2, "user": "u"}
    assert chat.unsupported() is None and _parse({"modalities": ["text"]}).unsupported() is None
    for body, name in [({"audio": {}}, "audio"), ({"modalities": ["audio"]}, "modalities"),
                       ({"web_search_options": {}}, "web_search_options"),
                       ({"stream_options": {"include_usage": True}}, "stream_options")]:
        assert _parse(body).unsupported()[0] == name
    for body, name in [({"xyz": 1}, "xyz"), ({"tools": "f"}, "tools"), ({"response_format": {"type": "yaml"}},
                       "response_format.type"), ({"logprobs": "maybe"}, "logprobs"), ({"top_logprobs": 50},
                       "top_logprobs"), ({"stream_options": {"include_usage": True, "x": 2}}, "stream_options.x")]:
        with pytest.raises(RequestError) as err:
            _parse(body)
        assert err.value.param == name, (body, err.value.message)


def _routing_stack_parts():
    """A synthetic dataset and a routing router (one model per query: streams pass through)."""
    ds = synthetic_dataset(20, seed=4)
    budget = float(ds.cost.mean(0)[1])
    qe, ce = bind(ds.queries, ds.responses, offline_features(ds))
    fitted = fit_lambda(Routing(), qe, ce, ds.quality, ds.cost, budget, queries=ds.queries)
    return ds, CascadeRouter(Routing(), bind, {budget: fitted}, ds.models, budget=budget, feature_names=FEATURE_NAMES)


def test_cascade_routing_under_a_depth_one_fit_streams_its_model_through():
    """A budget where a guard fired (routing: depth 1; the single model: depth 1 and one model; a cascade
    that can run one model only): the first model is certain to give the answer, so its tokens pass
    through as for routing."""
    ds = synthetic_dataset(20, seed=4)
    budget = float(ds.cost.mean(0)[1])
    # the third: a cascade-guard fit over a one-model pool, whose cascade runs that model alone
    for policy, fitted in ((CascadeRouting(num_samples=16), FittedLambda(torch.zeros(1), torch.zeros(1), max_depth=1)),
                           (CascadeRouting(num_samples=16),
                            FittedLambda(torch.zeros(1), torch.zeros(1), max_depth=1, models=(1,))),
                           (CascadeRouting(num_samples=16, pool=(1,)),
                            FittedLambda(torch.zeros(1), torch.zeros(1), cascade=True))):
        router = CascadeRouter(policy, bind, {budget: fitted}, ds.models, budget=budget, feature_names=FEATURE_NAMES)
        with ServingStack(ds, router, timeout_s=5) as s:
            body = {"model": "cascade-routing", "stream": True,
                    "messages": [{"role": "user", "content": ds.queries[0]}]}
            with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as resp:
                assert resp.status_code == 200
                events = [e for e in map(sse_data, resp.iter_lines()) if e is not None]
        trace = events[-2]["routing"]
        assert [st["streamed"] for st in trace["steps"] if st["model"]] == [True]
        if fitted.models is not None or fitted.cascade:
            assert trace["model"] == ds.models[1]


def test_streamed_backend_failing_before_tokens_falls_back():
    """Routing streams its model through; when that endpoint answers 500, the model is dropped and
    the next choice streams instead; the client sees one clean answer and the failure in the trace."""
    ds, router = _routing_stack_parts()
    first = router.next_model(ds.queries[0], {})
    with ServingStack(ds, router, failures={first: "500"}, timeout_s=2) as s:
        body = {"model": "cascade-routing", "stream": True,
                "messages": [{"role": "user", "content": ds.queries[0]}]}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as resp:
            assert resp.status_code == 200
            events = [e for e in map(sse_data, resp.iter_lines()) if e is not None]
    assert events[-1] == "[DONE]"
    trace = events[-2]["routing"]
    assert trace["failures"][0]["model"] == first and trace["model"] != first
    text = "".join(c["delta"].get("content", "") for e in events[:-1] for c in e["choices"])
    assert text == ds.responses[0, ds.model_index(trace["model"])]
    assert [s["streamed"] for s in trace["steps"] if s["model"]] == [True, True]


def test_stream_holds_its_concurrency_slot_until_it_ends():
    """A streamed request counts as in flight (ServerLimits.max_concurrent) until its last chunk."""
    ds, router = _routing_stack_parts()
    with ServingStack(ds, router, latency_ms=3000, timeout_s=30) as s:
        body = {"model": "cascade-routing", "stream": True, "messages": [{"role": "user", "content": ds.queries[1]}]}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            while not (event := sse_data(next(lines))) or not event["choices"][0]["delta"].get("content"):
                pass  # up to the first token (after ~3000 / 8 ms); the rest takes ~2.6 s more
            assert httpx.get(s.url + "/v1/routing/stats", timeout=10).json()["in_flight"] == 1
            rest = [e for e in map(sse_data, lines) if e is not None]
        assert rest[-1] == "[DONE]"
        assert httpx.get(s.url + "/v1/routing/stats", timeout=10).json()["in_flight"] == 0


def test_stream_that_fails_before_any_token_is_a_json_error():
    """No model can answer: the client gets the usual 502 JSON error, not a broken event stream."""
    ds, router = _routing_stack_parts()
    with ServingStack(ds, router, failures={m: "500" for m in ds.models}, timeout_s=2) as s:
        body = {"model": "cascade-routing", "stream": True, "messages": [{"role": "user", "content": ds.queries[0]}]}
        resp = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
        assert resp.status_code == 502 and resp.headers["content-type"].startswith("application/json")
        err = resp.json()["error"]
        assert err["code"] == "no_model_available" and {f["model"] for f in err["failures"]} == set(ds.models)
        assert err["spent"] == 0.0


def test_client_leaving_mid_stream_stops_the_route_and_records_a_disconnect():
    """The client closes the stream after the first token: the route is cancelled with its backend
    call (no fallback model is called or paid for), the request is recorded as a disconnect with the
    cut call in ``cancelled_calls``, and the slot is released."""
    import time

    ds, router = _routing_stack_parts()
    with ServingStack(ds, router, latency_ms=1600, timeout_s=30) as s:
        body = {"model": "cascade-routing", "stream": True, "messages": [{"role": "user", "content": ds.queries[2]}]}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as resp:
            for line in resp.iter_lines():
                event = sse_data(line)
                if isinstance(event, dict) and event["choices"] and event["choices"][0]["delta"].get("content"):
                    break  # leave after the first token
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            stats = httpx.get(s.url + "/v1/routing/stats", timeout=10).json()
            if stats["requests"] == 1:
                break
            time.sleep(0.1)
        received = len(s.replay_app.state.received)
    model = router.next_model(ds.queries[2], {})
    assert stats["requests"] == 1 and stats["disconnects"] == 1 and stats["answered"] == 0
    assert stats["cancelled_calls"] == {model: 1} and stats["total_cost"] == 0 and stats["in_flight"] == 0
    assert received == 1  # the streamed model only


def test_tokens_of_one_model_are_never_followed_by_another_models_answer():
    """The last guard of the stream's tail: if the route returned model B after model A's tokens went
    out (the router stops before that; this checks the response side alone), the stream ends with
    ``stream_aborted`` instead of B's finish chunk."""
    import asyncio

    from cascade_routing.serving.chat_stream import _tail, _TokenSink, default_error_event
    from cascade_routing.serving.router import RouteResult, StepTrace

    async def run():
        sink = _TokenSink(None)
        await sink.on_delta({"index": 0, "delta": {"content": "A's tok"}, "model": "a"})
        steps = [StepTrace(0, 1.0, {}, None, {}, model="a", status="failed", streamed=True),
                 StepTrace(1, 1.0, {}, None, {}, model="b", status="ok", streamed=True)]
        sink.outcome.result = RouteResult("q", "B's answer", "b", ["b"], ["a", "b"], {"b": 0.1}, 0.1, steps, [],
                                          None, {})
        aborted = []
        build = lambda r: ([{"index": 0, "message": {"content": r.text}}], {}, {"model": r.model}, {})  # noqa: E731
        events = _tail(sink, True, ChunkWriter("m"), build, 16, default_error_event, aborted.append)
        return events, aborted, sink.outcome.aborted

    events, aborted, flagged = asyncio.run(run())
    assert events[-1] == DONE and json.loads(events[0][6:])["error"]["code"] == "stream_aborted"
    assert b"B's answer" not in b"".join(events) and aborted == ["stream_aborted"] and flagged
