"""Robustness of the server against odd but legal input and backends (in-process scripted endpoints,
``ScriptedBackends``): a lone surrogate in a request's key, a backend answer with ``NaN``, a lone
surrogate, a malformed extra choice, an answer over ``max_response_bytes`` or trickled past
``timeout_s``, a backend refusal whose message has a lone surrogate, a huge ``max_tokens``, an
answer that cannot be built or a store that fails (always OpenAI-shaped JSON, counted once), the
``Content-Type`` rule, queued compute of a request that went away, the header timeout of idle or
slowloris connections, and the settings ``serve`` refuses before loading anything."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cascade_routing.policies import CascadeRouting, Routing
from cascade_routing.serving import CascadeRouter, RouterError
from cascade_routing.serving.batching import ComputeBatcher
from cascade_routing.serving.keys import parse_keys
from cascade_routing.serving.runner import BackgroundServer, serve
from cascade_routing.serving.streaming import sse_data
from tests.serving_helpers import (
    ScriptedBackends,
    bind,
    fitted_router,
    scripted_server,
)

NAME = "cascade-routing"
COST = "x-cascade-routing-cost-usd"
JSON = {"Content-Type": "application/json"}


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


def _chat(url, body, **kw):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30, **kw)


def _samples(url, **kw):
    text = httpx.get(url + "/metrics", timeout=10, **kw).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _requests(samples):
    return {tuple(v for _, v in k): n for (name, k), n in samples.items() if name == "cascade_routing_requests_total"}


# ---------------------------------------------------------------------- D1: a lone surrogate in a key
@pytest.mark.parametrize("raw, param", [
    (b'{"model": "cascade-routing", "metadata": {"\\ud800": "x"}, "messages": [{"role": "user", "content": "hi"}]}',
     "metadata.\\ud800"),
    (b'{"model": "cascade-routing", "messages": [{"role": "user", "content": "hi", "\\udfff": 1}]}',
     "messages[0].\\udfff"),
    (b'{"\\ud800": 1, "model": "cascade-routing", "messages": [{"role": "user", "content": "hi"}]}', "\\ud800"),
])
def test_a_lone_surrogate_in_a_key_is_a_json_400_naming_it_escaped(routing, raw, param):
    with scripted_server(routing, ScriptedBackends()) as srv:
        resp = httpx.post(srv.url + "/v1/chat/completions", content=raw, headers=JSON, timeout=10)
        samples = _samples(srv.url)
    assert resp.status_code == 400 and resp.headers["content-type"] == "application/json", resp.text
    err = resp.json()["error"]
    assert err["param"] == param and param in err["message"] and "lone surrogate" in err["message"]
    assert resp.headers[COST] == "0" and _requests(samples) == {("400", "unknown"): 1}


# ---------------------------------------------------------------------- D2, D3: odd backend answers
@pytest.mark.parametrize("mode, words", [
    ("nan", "choices[0].logprobs.content[0].logprob must be a finite number"),
    ("surrogate", "choices[0].message.content contains an invalid Unicode code point"),
    ("badchoice", "choices[1].message.content must be a string or null"),
    ("giant", "larger than max_response_bytes = 4000 bytes"),
    ("badgzip", "DecodingError"),
])
def test_an_odd_backend_answer_is_that_models_bad_response(ds, cascade, mode, words):
    """NaN, a lone surrogate, a choice the response schema cannot hold, or an answer over
    ``max_response_bytes``: that model fails (``bad_response``), the next one answers, and the answer,
    the cost header, the account and /metrics agree."""
    query = ds.queries[1]
    first = cascade.next_model(query, {})
    settings = {"max_response_bytes": 4000} if mode == "giant" else None
    backends = ScriptedBackends(modes={first: mode}, settings=settings)
    with scripted_server(cascade, backends) as srv:
        resp = _chat(srv.url, _body(query))
        stats = httpx.get(srv.url + "/v1/routing/stats", timeout=10).json()
        samples = _samples(srv.url)
    assert resp.status_code == 200, resp.text
    routing = resp.json()["routing"]
    failure = routing["failures"][0]
    assert failure["model"] == first and failure["reason"] == "bad_response" and words in failure["detail"]
    assert first not in routing["models_run"] and b"NaN" not in resp.content
    assert float(resp.headers[COST]) == pytest.approx(routing["total_cost"])
    assert stats["answered"] == 1 and stats["total_cost"] == pytest.approx(routing["total_cost"])
    assert _requests(samples) == {("200", "false"): 1}


@pytest.mark.parametrize("mode", ["nan", "surrogate", "giant", "stream_toolname"])
def test_an_odd_streamed_chunk_fails_its_model_before_its_first_token(ds, routing, mode):
    """The first content chunk of the streamed model has a NaN or a lone surrogate, or passes
    ``max_response_bytes``: nothing of it goes out; the model fails before its first token and the
    next one streams the answer."""
    query = ds.queries[0]
    first = routing.next_model(query, {})
    backends = ScriptedBackends(modes={first: mode}, settings={"max_response_bytes": 4000} if mode == "giant" else None)
    with scripted_server(routing, backends) as srv:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=_body(query, stream=True),
                          timeout=30) as resp:
            raw = resp.read().decode()
    events = [e for e in map(sse_data, raw.splitlines()) if isinstance(e, dict)]
    assert resp.status_code == 200 and "NaN" not in raw and "\\ud800" not in raw, raw[:500]
    routing_trace = events[-1]["routing"]
    assert routing_trace["failures"][0]["model"] == first and routing_trace["failures"][0]["reason"] == "bad_response"
    text = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    assert text == ScriptedBackends.answer(routing_trace["model"], query) and routing_trace["model"] != first


def test_a_backend_refusal_with_a_lone_surrogate_is_a_json_400(ds, cascade):
    """Every model refuses the request with a 400 whose message holds a lone surrogate escape: the
    client gets that 400 in OpenAI's shape (the surrogate escaped), counted in /metrics."""
    backends = ScriptedBackends(modes={m: "surrogate400" for m in ds.models})
    with scripted_server(cascade, backends) as srv:
        resp = _chat(srv.url, _body(ds.queries[2]))
        samples = _samples(srv.url)
    assert resp.status_code == 400 and resp.headers["content-type"] == "application/json", resp.text
    err = resp.json()["error"]
    assert "bad \\ud800 input" in err["message"] and err["param"] == "messages" and err["code"] == "invalid_value"
    assert resp.headers[COST] == "0" and _requests(samples) == {("400", "false"): 1}


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_that_cannot_be_built_is_a_json_500_recorded_as_an_error(ds, cascade, monkeypatch, stream):
    """A fault while building the answer (here: a broken ``completion_parts``) is this request's 500
    in OpenAI's shape with what it spent; the account records an error, not an answered request,
    and /metrics counts the 500 once."""
    import cascade_routing.serving.server as server

    def broken(*args, **kwargs):
        raise RuntimeError("cannot build the answer")

    monkeypatch.setattr(server, "completion_parts", broken)
    with scripted_server(cascade, ScriptedBackends()) as srv:
        resp = _chat(srv.url, _body(ds.queries[3], stream=stream))
        snap = srv.server.config.app.state.ledger.snapshot()
        samples = _samples(srv.url)
    assert resp.status_code == 500 and resp.headers["content-type"] == "application/json", resp.text
    err = resp.json()["error"]
    assert "cannot build the answer" in err["message"] and err["spent"] > 0
    assert float(resp.headers[COST]) == pytest.approx(err["spent"])
    assert snap["answered"] == 0 and snap["errors"] == 1 and snap["total_cost"] == pytest.approx(err["spent"])
    assert _requests(samples) == {("500", str(stream).lower()): 1}


def test_an_unexpected_fault_in_a_request_is_a_json_500_with_the_cost_header(ds, cascade):
    """What no other path handles (here the spend store fails while recording): 500
    ``internal_error`` in OpenAI's shape with ``spent`` and the cost header, counted in /metrics."""
    with scripted_server(cascade, ScriptedBackends()) as srv:
        store = srv.server.config.app.state.ledger.store

        def failing_add(account, increments):
            raise OSError("disk full")

        store.add = failing_add
        resp = _chat(srv.url, _body(ds.queries[4]))
        samples = _samples(srv.url)
    assert resp.status_code == 500 and resp.headers["content-type"] == "application/json", resp.text
    err = resp.json()["error"]
    assert err["code"] == "internal_error" and "OSError" in err["message"] and err["spent"] > 0
    assert float(resp.headers[COST]) == pytest.approx(err["spent"])
    assert _requests(samples) == {("500", "unknown"): 1}
    assert samples[("cascade_routing_errors_total", (("kind", "internal_error"),))] == 1


# ---------------------------------------------------------------------- D3: compute of a request gone away
def test_queued_compute_of_a_request_that_went_away_is_skipped():
    """Two groups formed in one batch; while the first runs on the compute thread, the caller of the
    second goes away (its deadline passed): the second group is never computed."""
    started, release = threading.Event(), threading.Event()

    class Router:
        executor, bind_executor = ThreadPoolExecutor(1), None
        bound: list[list[str]] = []

        def _state(self, queries, answers, tasks):
            self.bound.append(list(queries))
            started.set()
            release.wait(10)
            return object()

    router = Router()
    batcher = ComputeBatcher(router, max_batch=8, window_ms=0.0)  # type: ignore[arg-type]

    async def main():
        first = asyncio.create_task(batcher.bind("a", None, "fitted-1"))
        second = asyncio.create_task(batcher.bind("b", None, "fitted-2"))  # another λ: another group
        while not started.is_set():
            await asyncio.sleep(0.01)
        second.cancel()
        release.set()
        slot = await first
        await asyncio.sleep(0.05)  # the worker would run the second group now
        await batcher.aclose()
        return slot, second

    try:
        slot, second = asyncio.run(main())
    finally:
        release.set()
        router.executor.shutdown()
    assert second.cancelled() and slot.row == 0
    assert router.bound == [["a"]]


# ---------------------------------------------------------------------- D4: a trickling backend
def test_a_backend_trickling_its_answer_fails_at_timeout_s_and_the_next_model_answers(ds, cascade):
    """Each byte of the answer arrives well within any read timeout, the whole does not arrive within
    ``timeout_s``: that model fails with ``timeout`` like a silent one, and the next one answers."""
    query = ds.queries[5]
    first = cascade.next_model(query, {})
    backends = ScriptedBackends(modes={first: "trickle"}, timeout_s=0.3)
    with scripted_server(cascade, backends) as srv:
        resp = _chat(srv.url, _body(query))
    assert resp.status_code == 200, resp.text
    routing = resp.json()["routing"]
    assert routing["failures"][0]["model"] == first and routing["failures"][0]["reason"] == "timeout"
    assert "did not finish within" in routing["failures"][0]["detail"] and first not in routing["models_run"]


def test_a_healthy_stream_longer_than_timeout_s_is_not_cut(ds, routing):
    """Once its tokens are passing to the client, a stream is bounded by each read's timeout and the
    request's deadline, not by ``timeout_s`` as a whole: an answer that keeps coming for longer than
    ``timeout_s`` arrives whole, the model is not failed and its circuit breaker records no failure."""
    query = ds.queries[2]
    first = routing.next_model(query, {})
    backends = ScriptedBackends(modes={first: "stream_long"}, timeout_s=0.3)
    with scripted_server(routing, backends) as srv:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=_body(query, stream=True),
                          timeout=30) as resp:
            raw = resp.read().decode()
    events = [e for e in map(sse_data, raw.splitlines()) if isinstance(e, dict)]
    trace = events[-1]["routing"]
    text = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    assert resp.status_code == 200 and "stream_aborted" not in raw and not trace["failures"], raw[-500:]
    assert trace["model"] == first and text == ScriptedBackends.answer(first, query)
    assert backends.pool.backends[first].breaker.consecutive == 0


# ---------------------------------------------------------------------- D5: a huge max_tokens
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_huge_output_token_cap_is_a_400_naming_it(routing, field):
    keys = parse_keys({"keys": [{"name": "a", "key": "sk-test-aaaa", "max_spend": 1.0}]}, "test")
    raw = (b'{"model": "cascade-routing", "' + field.encode() + b'": 1' + b"0" * 400
           + b', "messages": [{"role": "user", "content": "hi"}]}')
    backends = ScriptedBackends()
    with scripted_server(routing, backends, keys=keys) as srv:
        resp = httpx.post(srv.url + "/v1/chat/completions", content=raw, timeout=10,
                          headers={**JSON, "Authorization": "Bearer sk-test-aaaa"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == field, resp.text
    assert "less than or equal to 2147483647" in resp.json()["error"]["message"] and not backends.calls


# ---------------------------------------------------------------------- D6: connections without headers
def _hello_app():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request):
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/x", hello)])


def test_a_connection_that_does_not_send_its_headers_in_time_is_closed():
    """Silent, and sending its headers a byte at a time (slowloris): closed once ``header_timeout_s``
    passed. A kept-alive connection idle between requests is not (that is the keep-alive's job)."""
    head = b"GET /x HTTP/1.1\r\nHost: x\r\nUser-Agent: a-very-slow-client\r\nAccept: */*\r\n\r\n"
    with BackgroundServer(_hello_app(), header_timeout_s=0.3) as srv:
        with socket.create_connection((srv.host, srv.port), timeout=10) as idle:
            assert idle.recv(100) == b""  # closed by the server (a socket timeout would raise)
        sent = 0
        with socket.create_connection((srv.host, srv.port), timeout=10) as slow:
            try:
                while sent < len(head):
                    slow.sendall(head[sent:sent + 1])
                    sent += 1
                    time.sleep(0.05)
                answer = slow.recv(100)
            except OSError:  # reset by the closed peer
                answer = b""
        assert answer == b"" and sent < len(head)
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
        conn.request("GET", "/x")
        assert conn.getresponse().read() == b"ok"
        time.sleep(0.6)  # idle past the header timeout between two requests
        conn.request("GET", "/x")
        assert conn.getresponse().read() == b"ok"
        conn.close()


def test_a_request_refused_before_its_body_is_read_closes_the_connection(ds, routing):
    """A 415 (or 401, 413, 429) answered before the body was read says ``Connection: close`` and
    closes: the rest of that body can neither be taken for a next request nor hold an idle socket
    (uvicorn's keep-alive timer is cancelled by the body's bytes, the header timer never re-armed)."""
    raw = httpx.Request("POST", "http://x", json=_body(ds.queries[0])).read()
    backends = ScriptedBackends()
    with scripted_server(routing, backends) as srv:
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(raw))
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 415") and b"connection: close" in answer.lower()
            sock.settimeout(3)
            try:
                sock.sendall(raw[:1])
                while sock.recv(4096):  # the rest of the 415's body, then the server's close
                    pass
                closed = True
            except TimeoutError:  # still open
                closed = False
            except OSError:  # reset by the closed peer
                closed = True
        assert closed
        ok = httpx.post(srv.url + "/v1/chat/completions", json=_body(ds.queries[0]), timeout=10)
    assert ok.status_code == 200 and ok.headers.get("connection") != "close"


# ---------------------------------------------------------------------- Content-Type
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_not_declared_json_is_refused_with_415(ds, routing, content_type):
    """A page in a browser can POST ``text/plain`` or a form to a local server without a CORS
    preflight: such a body is refused unread (no backend called), in OpenAI's error shape."""
    raw = httpx.Request("POST", "http://x", json=_body(ds.queries[0])).read()
    backends = ScriptedBackends()
    with scripted_server(routing, backends) as srv:
        resp = httpx.post(srv.url + "/v1/chat/completions", content=raw, timeout=10,
                          headers={"Content-Type": content_type} if content_type else {})
        good = httpx.post(srv.url + "/v1/chat/completions", content=raw, timeout=10,
                          headers={"Content-Type": "application/json; charset=utf-8"})
        samples = _samples(srv.url)
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type", resp.text
    assert "application/json" in resp.json()["error"]["message"] and resp.headers[COST] == "0"
    assert good.status_code == 200 and sum(backends.calls.values()) == 1
    assert _requests(samples) == {("415", "unknown"): 1, ("200", "false"): 1}


# ---------------------------------------------------------------------- settings refused up front
@pytest.mark.parametrize("kwargs, words", [
    ({"budget": float("nan")}, "--budget: budget must be a finite number >= 0, got nan"),
    ({"budget": float("inf")}, "--budget: budget must be a finite number >= 0, got inf"),
    ({"budget": -1.0}, "--budget: budget must be a finite number >= 0, got -1.0"),
    ({"budget": 1.0, "batch_window_ms": float("nan")}, r"batch_window_ms \(--batch-window-ms\) must be a finite"),
    ({"budget": 1.0, "workers": 0}, r"workers \(--workers\) must be an integer >= 1, got 0"),
    ({"budget": 1.0, "header_timeout_s": 0.0}, r"header_timeout_s \(--header-timeout-s\) must be a finite"),
    ({"budget": 1.0, "compute_threads": 0}, r"compute_threads \(--compute-threads\) must be an integer >= 1"),
    ({"budget": 1.0, "upstream_pools": 0}, r"upstream_pools \(--upstream-pools\) must be an integer >= 1"),
    ({"budget": 1.0, "torch_threads": -1}, r"torch_threads \(--torch-threads\) must be an integer >= 1"),
])
def test_serve_refuses_bad_settings_before_loading_anything(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        serve(tmp_path / "missing.safetensors", tmp_path / "missing.yaml", **kwargs)


def test_the_cli_names_a_bad_budget(tmp_path, capsys):
    from cascade_routing.cli import main

    code = main(["serve", "--checkpoint", str(tmp_path / "x"), "--backends", str(tmp_path / "y"), "--budget", "nan"])
    assert code != 0 and "budget must be a finite number >= 0, got nan" in capsys.readouterr().err


def test_serve_on_a_taken_port_fails_before_loading_the_artifact(tmp_path, capsys):
    """``serve`` on a port already listened on loaded the whole artifact, then exited 3 with uvicorn's
    "address already in use"; it is refused first (the checkpoint here does not exist, so an error
    about the port shows nothing was loaded), naming host:port, with one worker or several."""
    from cascade_routing.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for workers in (1, 2):
            with pytest.raises(RuntimeError, match=f"serve cannot listen on 127.0.0.1:{port}: Address already in use"):
                serve(tmp_path / "missing.safetensors", tmp_path / "missing.yaml", 1.0, port=port, workers=workers,
                      store=f"sqlite:///{tmp_path / 'spend.sqlite'}")
        code = main(["serve", "--checkpoint", str(tmp_path / "missing.safetensors"), "--backends",
                     str(tmp_path / "missing.yaml"), "--budget", "1", "--port", str(port)])
        err = capsys.readouterr().err
        assert code == 2 and f"error: serve cannot listen on 127.0.0.1:{port}" in err, err
    assert not (tmp_path / "spend.sqlite").exists()


def test_the_router_and_batcher_refuse_non_finite_settings(ds, routing):
    fitted = next(iter(routing.fitted_table.values()))
    with pytest.raises(RouterError, match="budget must be a finite number >= 0, got nan"):
        CascadeRouter(routing.policy, bind, {1.0: fitted}, ds.models, budget=float("nan"))
    with pytest.raises(RouterError, match="budget must be a finite number >= 0, got inf"):
        routing.fitted_for(float("inf"))
    with pytest.raises(ValueError, match="finite window_ms"):
        ComputeBatcher(routing, window_ms=float("nan"))


def test_the_stream_line_splitter_ends_lines_only_where_sse_does_for_any_chunking():
    """The capped SSE reader ends a line at CRLF, CR or LF only (the SSE format's line ends), whatever
    the chunk boundaries: CRLF split across chunks, multi-byte characters cut in two; U+2028 and
    U+0085, which JSON may carry unescaped (``JSON.stringify`` does), stay inside their line."""
    import random
    import re

    from cascade_routing.serving.backends import _lines

    text = 'data: {"a": "é€\u2028b\x85c"}\r\n\r\ndata: x\rdata: y\n\ndata: ü\u2028z\r\n' * 3 + "tail"
    expected = re.split(r"\r\n|\r|\n", text)
    assert len(expected) == 19 and expected[0] == 'data: {"a": "é€\u2028b\x85c"}' and expected[-1] == "tail"
    raw = text.encode()
    rng = random.Random(0)

    async def split(cuts):
        async def chunks():
            start = 0
            for end in [*cuts, len(raw)]:
                yield raw[start:end]
                start = end
        return [line async for line in _lines(chunks())]

    assert asyncio.run(split([])) == expected
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 20)))
        assert asyncio.run(split(cuts)) == expected
    for ending, lines in (("a\n", ["a"]), ("a\r", ["a"]), ("a\r\n", ["a"]), ("\n", [""]), ("", [])):
        assert asyncio.run(_collect(_lines(_one(ending.encode())))) == lines, ending


async def _one(data: bytes):
    yield data


async def _collect(agen):
    return [x async for x in agen]


def test_max_response_bytes_is_checked_in_the_backends_file():
    from cascade_routing.serving.backends import BackendConfigError, parse_backends

    doc = {"models": [{"name": "m", "base_url": "http://x/v1", "price_per_input_token": 0,
                       "price_per_output_token": 0, "max_response_bytes": 0}]}
    with pytest.raises(BackendConfigError, match="max_response_bytes >= 1"):
        parse_backends(doc, "test")
    doc["models"][0]["max_response_bytes"] = 1000
    assert parse_backends(doc, "test")["m"].max_response_bytes == 1000
    del doc["models"][0]["max_response_bytes"]
    assert parse_backends(doc, "test")["m"].max_response_bytes == 8 << 20


def test_requests_no_model_answered_and_nothing_was_billed_are_not_fed_to_the_budget_controller(ds, cascade):
    """During an outage every request fails (502) at no cost: observing those as cheap requests
    would wind λ down to its floor and overspend once the backends are back. They are not
    observed; the first answered request is."""
    from cascade_routing.policies.controller import ControllerConfig

    backends = ScriptedBackends(modes={m: "500" for m in ds.models})
    with scripted_server(cascade, backends, controller=ControllerConfig()) as srv:
        for q in ds.queries[:4]:
            assert _chat(srv.url, _body(q)).status_code == 502
        before = httpx.get(srv.url + "/v1/routing/stats", timeout=10).json()["controller"]
        backends.modes.clear()
        ok = _chat(srv.url, _body(ds.queries[5]))
        after = httpx.get(srv.url + "/v1/routing/stats", timeout=10).json()["controller"]
    assert ok.status_code == 200 and ok.json()["routing"]["controller"]["observed_as"] == 0
    assert all(state["observed"] == 0 and state["lam_factor"] == 1.0 for state in before.values()), before
    (state,) = after.values()
    assert state["observed"] == 1 and state["mean_cost"] == pytest.approx(ok.json()["routing"]["total_cost"])


def test_a_budget_whose_fitted_lambda_is_zero_cannot_be_controlled():
    """λ₀ = 0 (the policy spends without a price): every multiple is 0, so serve warns that the
    controller cannot act there; any positive λ can be scaled."""
    import torch

    from cascade_routing.policies import FittedLambda
    from cascade_routing.policies.controller import lambda_is_zero, scale_fitted

    zero = FittedLambda(torch.zeros(2), torch.zeros(2))
    assert lambda_is_zero(zero) and lambda_is_zero(scale_fitted(zero, 30.0))
    assert not lambda_is_zero(FittedLambda(torch.tensor([0.0, 2.0]), torch.zeros(2)))
