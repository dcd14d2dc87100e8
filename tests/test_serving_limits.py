"""Server limits over loopback HTTP: body size (413), slow bodies (408, without holding a slot),
prompt length (400), concurrent requests (429 with Retry-After instead of unbounded queueing),
upstream attempts per request, the server's settings refused when out of range."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from cascade_routing.serving.limits import ServerLimits
from tests.serving_helpers import ServingStack

NAME = "cascade-routing"


SERVING_ROWS = 20  # queries of the conftest's ``ds``


@pytest.fixture(scope="module")
def router(stand_in):
    return stand_in[0]


def _body(query):
    return {"model": NAME, "messages": [{"role": "user", "content": query}]}


def test_body_over_the_limit_is_413_and_never_forwarded(ds, router):
    limits = ServerLimits(max_body_bytes=2000)
    with ServingStack(ds, router, limits=limits) as s:
        big = _body("x" * 5000)
        resp = httpx.post(s.url + "/v1/chat/completions", json=big, timeout=10)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit applies while streaming
            for _ in range(10):
                yield b" " * 500

        resp = httpx.post(s.url + "/v1/chat/completions", content=chunks(), timeout=10,
                          headers={"Content-Type": "application/json"})
        assert resp.status_code == 413
        assert sum(s.replay_app.state.requests.values()) == 0  # nothing reached a backend
        assert httpx.post(s.url + "/v1/chat/completions", json=_body(ds.queries[0]), timeout=10).status_code == 200


def test_a_slow_body_gets_408_and_never_holds_a_slot(ds, router):
    """Clients that send their body slowly (slowloris): none of them holds one of the server's
    concurrency slots meanwhile (one slot here; a normal request is served), and each gets 408
    ``request_timeout`` once ``body_timeout_s`` passed, counted in /metrics."""
    import socket

    limits = ServerLimits(max_concurrent=1, body_timeout_s=1.0)
    with ServingStack(ds, router, limits=limits) as s:
        slow = []
        for _ in range(3):
            sock = socket.create_connection((s.server.host, s.server.port), timeout=10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\":")
            slow.append(sock)
        resp = httpx.post(s.url + "/v1/chat/completions", json=_body(ds.queries[0]), timeout=10)
        assert resp.status_code == 200  # the only slot was free
        answers = []
        for sock in slow:
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            sock.close()
            answers.append(data)
        assert all(a.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in a for a in answers), answers
        metrics = httpx.get(s.url + "/metrics", timeout=10).text
        assert 'cascade_routing_requests_total{status="408",stream="unknown"} 3.0' in metrics
        assert httpx.get(s.url + "/v1/routing/stats", timeout=10).json()["rejected_busy"] == 0


def test_a_client_that_leaves_while_sending_its_body_is_499_not_a_server_fault(ds, router):
    """A client that closes its connection before its whole body arrived is counted as a client that
    left (499 ``client_closed``), not as a server fault (500 ``internal_error``), and the server goes on."""
    import socket

    with ServingStack(ds, router) as s:
        for _ in range(2):
            with socket.create_connection((s.server.host, s.server.port), timeout=10) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n{\"model\":")
        metrics = ""
        for _ in range(100):  # the server sees the disconnects shortly after
            metrics = httpx.get(s.url + "/metrics", timeout=10).text
            if 'cascade_routing_requests_total{status="499",stream="unknown"} 2.0' in metrics:
                break
            time.sleep(0.05)
        assert 'cascade_routing_requests_total{status="499",stream="unknown"} 2.0' in metrics, metrics
        assert 'cascade_routing_errors_total{kind="client_closed"} 2.0' in metrics
        assert "internal_error" not in metrics
        assert httpx.post(s.url + "/v1/chat/completions", json=_body(ds.queries[0]), timeout=10).status_code == 200


@pytest.mark.parametrize("settings, words", [
    ({"body_timeout_s": 0}, "body_timeout_s"), ({"deadline_s": float("inf")}, "deadline_s"),
    ({"shutdown_timeout_s": -5}, "shutdown_timeout_s"),
])
def test_limits_out_of_range_are_refused(settings, words):
    with pytest.raises(ValueError, match=words):
        ServerLimits(**settings)


@pytest.mark.parametrize("settings, words", [({"keep_alive_s": -1}, "keep_alive_s"),
                                             ({"shutdown_timeout_s": -5}, "shutdown_timeout_s")])
def test_serve_refuses_negative_timeouts_before_loading_anything(tmp_path, settings, words):
    """``serve --keep-alive-s -1`` / ``--shutdown-timeout-s -5``: a ValueError naming the setting (the
    CLI prints it), before the checkpoint is even looked for."""
    from cascade_routing.serving.server import serve

    with pytest.raises(ValueError, match=words):
        serve(tmp_path / "missing.safetensors", tmp_path / "missing.yaml", 0.001, **settings)


def test_prompt_over_the_limit_is_400_naming_the_limit(ds, router):
    with ServingStack(ds, router, limits=ServerLimits(max_prompt_chars=100)) as s:
        body = {"model": NAME, "messages": [{"role": "system", "content": "s" * 60},
                                            {"role": "user", "content": "u" * 60}]}
        resp = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=10)
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["code"] == "context_length_exceeded" and "100" in err["message"]
        assert sum(s.replay_app.state.requests.values()) == 0


def test_saturated_server_answers_429_with_retry_after(ds, router):
    """2 slots, backends 600 ms: of 6 simultaneous requests 2 are served, 4 refused at once."""
    limits = ServerLimits(max_concurrent=2, retry_after_s=3)
    with ServingStack(ds, router, limits=limits, latency_ms=600) as s:
        async def main():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(s.url + "/v1/chat/completions", json=_body(q))
                                              for q in ds.queries[:6]))

        responses = asyncio.run(main())
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 429, 429, 429, 429]
        busy = [r for r in responses if r.status_code == 429]
        assert all(r.headers["retry-after"] == "3" and r.json()["error"]["code"] == "server_busy" for r in busy)
        stats = httpx.get(s.url + "/v1/routing/stats", timeout=10).json()
        assert stats["rejected_busy"] == 4 and stats["in_flight"] == 0 and stats["requests"] == 2


def test_upstream_attempts_per_request_are_bounded(ds, router):
    """Every model answers 500 and each allows 5 retries: the request still makes only 4 attempts."""
    failures = {m: "500" for m in ds.models}
    limits = ServerLimits(max_upstream_attempts=4)
    with ServingStack(ds, router, failures=failures, max_retries=5, limits=limits,
                      backend_settings={"breaker_failures": 100}) as s:
        resp = httpx.post(s.url + "/v1/chat/completions", json=_body(ds.queries[0]), timeout=30)
        assert resp.status_code == 502
        fails = resp.json()["error"]["failures"]
        assert sum(f["attempts"] for f in fails) == 4
        assert sum(s.replay_app.state.requests.values()) == 4
        assert {f["reason"] for f in fails} <= {"http_500", "attempt_limit"}


def test_idle_keep_alive_connection_outlives_the_clients_expiry(ds, router):
    """The server keeps an idle client connection open past httpx's 5 s keep-alive expiry (and
    uvicorn's 5 s default), so a client never sends on a connection the server is closing: the
    second request on the same socket after 6 s idle is answered."""
    import http.client
    import json
    import time

    from cascade_routing.serving.server import KEEP_ALIVE_S

    assert KEEP_ALIVE_S > 5.0
    with ServingStack(ds, router) as s:
        conn = http.client.HTTPConnection(s.server.host, s.server.port, timeout=30)
        body = json.dumps(_body(ds.queries[0]))
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        assert conn.getresponse().read() and conn.sock is not None
        sock = conn.sock
        time.sleep(6.0)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and conn.sock is sock  # same connection, not a reconnect
        conn.close()
