"""An OpenAI-compatible HTTP server in front of a :class:`CascadeRouter` (FastAPI + uvicorn).

Endpoints:

- ``POST /v1/chat/completions``: ``model`` must be the router's name. The query the estimators see
  is the text of the LAST user message (string content, or the text parts of a content list
  joined by newlines); the full ``messages`` list is forwarded to each backend, together with the
  sampling parameters ``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``. Optional
  extension: ``"routing": {"budget": B, "task": "..."}``: use the fitted λ of another budget (the
  largest fitted budget <= B) and/or give the query's task label to estimators that use one. The answer is a
  standard ``chat.completion`` body plus ``routing`` (models run, per-model and total cost,
  estimates at each step, failures, timing). The header ``X-Request-ID`` is echoed (generated if
  absent) in the response header and in ``routing.request_id``.
- ``GET /v1/models``: the router's name (and the models behind it).
- ``GET /health`` and ``GET /v1/routing/stats``: status and the running spend account (requests
  served, total and mean spend vs the configured mean budget, per-model runs and failures).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: malformed JSON, a
body that is not an object, missing/empty ``messages``, no user message, ``stream: true`` or a bad
``routing.budget`` -> 400; unknown ``model`` -> 404; every model failed -> 502; a fault in the
estimators or the policy -> 500 (logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cascade_routing.serving.backends import BackendPool
from cascade_routing.serving.batching import RequestBatcher
from cascade_routing.serving.router import CascadeRouter, NoModelAvailableError, RouteRequest, RouterError

log = logging.getLogger(__name__)

FORWARDED_PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed")


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   extra: dict[str, Any] | None = None) -> JSONResponse:
    """A JSON error in OpenAI's shape."""
    body: dict[str, Any] = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    if extra:
        body["error"].update(extra)
    return JSONResponse(body, status_code=status)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass
class SpendAccount:
    """Running account of spend against the configured mean budget (thread-safe)."""

    budget: float | None
    requests: int = 0
    errors: int = 0
    total_cost: float = 0.0
    runs: dict[str, int] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, models_run: list[str], answer_model: str, cost: float, failed: list[str]) -> None:
        with self._lock:
            self.requests += 1
            self.total_cost += cost
            for m in models_run:
                self.runs[m] = self.runs.get(m, 0) + 1
            self.answers[answer_model] = self.answers.get(answer_model, 0) + 1
            for m in failed:
                self.failures[m] = self.failures.get(m, 0) + 1

    def add_error(self, failed: list[str]) -> None:
        with self._lock:
            self.errors += 1
            for m in failed:
                self.failures[m] = self.failures.get(m, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            mean = self.total_cost / self.requests if self.requests else 0.0
            return {
                "budget": self.budget,
                "requests": self.requests,
                "errors": self.errors,
                "total_cost": self.total_cost,
                "mean_cost": mean,
                "within_budget": None if self.budget is None else mean <= self.budget * (1 + 1e-9),
                "budget_used_fraction": None if not self.budget else mean / self.budget,
                "runs": dict(self.runs),
                "answers": dict(self.answers),
                "failures": dict(self.failures),
                "uptime_s": time.time() - self.started,
            }


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        parts = [p for p in parts if isinstance(p, str)]
        return "\n".join(parts) if parts else None
    return None


def parse_chat_request(body: Any, router_name: str
                       ) -> tuple[str, list[dict[str, Any]], dict[str, Any], float | None, str | None]:
    """Validate a chat-completions body: (query, messages, forwarded params, budget, task)."""
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("'model' is required (a string)", "model")
    if model != router_name:
        raise _BadRequest(f"unknown model {model!r}; this server serves {router_name!r}", "model", 404,
                          "model_not_found")
    if body.get("stream"):
        raise _BadRequest("streaming is not supported by the cascade-routing server", "stream")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list", "messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or "content" not in msg:
            raise _BadRequest(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
    query = None
    for msg in reversed(messages):
        if msg["role"] == "user":
            query = _text_of(msg["content"])
            break
    if not query:
        raise _BadRequest("'messages' must contain a user message with non-empty text", "messages")
    params = {k: body[k] for k in FORWARDED_PARAMS if k in body}
    budget, task = None, None
    routing = body.get("routing")
    if routing is not None:
        if not isinstance(routing, dict):
            raise _BadRequest("'routing' must be an object, e.g. {\"budget\": 0.001}", "routing")
        if "budget" in routing:
            b = routing["budget"]
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not b >= 0 or b == float("inf"):
                raise _BadRequest(f"routing.budget must be a finite number >= 0, got {b!r}", "routing.budget")
            budget = float(b)
        if "task" in routing:
            if not isinstance(routing["task"], str):
                raise _BadRequest("routing.task must be a string", "routing.task")
            task = routing["task"]
    return query, messages, params, budget, task


def create_app(router: CascadeRouter, backends: BackendPool, budget: float | None = None,
               max_batch: int = 64, batch_window_ms: float = 2.0) -> FastAPI:
    """The FastAPI app; ``backends`` is closed when the app shuts down.

    Concurrent requests are routed in micro-batches (:class:`RequestBatcher`, at most ``max_batch``
    queries, formed within ``batch_window_ms``); ``max_batch=1`` routes each request alone.
    """
    batcher = RequestBatcher(router, backends, max_batch=max_batch, window_ms=batch_window_ms)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await batcher.aclose()
            await backends.aclose()

    app = FastAPI(title="cascade-routing", lifespan=lifespan)
    app.state.router = router
    app.state.backends = backends
    app.state.batcher = batcher
    app.state.account = SpendAccount(budget if budget is not None else router.default_budget)
    missing = [m for m in router.models if m not in backends]
    if missing:
        raise RouterError(f"no backend configured for model(s) {missing} of the checkpoint")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error",
                              code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"invalid request: {exc.errors()}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": router.name, "models": router.models,
                "budget": app.state.account.budget, "spend": app.state.account.snapshot()}

    @app.get("/v1/routing/stats")
    async def stats() -> dict[str, Any]:
        return {**app.state.account.snapshot(), "batching": batcher.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": router.name, "object": "model", "created": int(app.state.account.started),
            "owned_by": "cascade-routing", "models": router.models, "budgets": router.budgets,
        }]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        headers = {"X-Request-ID": request_id}
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            resp = error_response(400, f"malformed JSON body: {err}")
            resp.headers.update(headers)
            return resp
        try:
            query, messages, params, budget_req, task = parse_chat_request(body, router.name)
            router.fitted_for(budget_req)
        except _BadRequest as err:
            resp = error_response(err.status, err.message, param=err.param, code=err.code)
            resp.headers.update(headers)
            return resp
        except RouterError as err:
            resp = error_response(400, str(err), param="routing.budget")
            resp.headers.update(headers)
            return resp
        try:
            result = await batcher.submit(RouteRequest(query, messages, task, params), budget_req)
        except NoModelAvailableError as err:
            app.state.account.add_error([f["model"] for f in err.failures])
            resp = error_response(502, str(err), "upstream_error", code="no_model_available",
                                  extra={"failures": err.failures, "request_id": request_id})
            resp.headers.update(headers)
            return resp
        except Exception as err:  # noqa: BLE001 - an estimator/policy fault: a JSON 500, logged
            log.exception("routing failed for request %s", request_id)
            app.state.account.add_error([])
            resp = error_response(500, f"routing failed: {type(err).__name__}: {err}", "server_error",
                                  extra={"request_id": request_id})
            resp.headers.update(headers)
            return resp
        app.state.account.add(result.models_run, result.model, result.total_cost,
                              [f["model"] for f in result.failures])
        answer = result.answers[result.model]
        usage_in = sum(a.usage.get("prompt_tokens", 0) for a in result.answers.values())
        usage_out = sum(a.usage.get("completion_tokens", 0) for a in result.answers.values())
        routing = result.to_dict()
        routing["request_id"] = request_id
        body_out = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": router.name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": _finish_reason(answer.raw),
            }],
            "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                      "total_tokens": usage_in + usage_out},
            "routing": routing,
        }
        return JSONResponse(body_out, headers=headers)

    return app


def _finish_reason(raw: dict[str, Any] | None) -> str:
    try:
        reason = raw["choices"][0].get("finish_reason")  # type: ignore[index]
    except (TypeError, KeyError, IndexError, AttributeError):
        return "stop"
    return reason if isinstance(reason, str) else "stop"


def serve(
    checkpoint: "str | os.PathLike[str]",
    backends: "str | os.PathLike[str]",
    budget: float,
    strategy: str = "cascade_routing",
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "cascade-routing",
    log_level: str = "info",
    compute_threads: int = 1,
    max_batch: int = 64,
    batch_window_ms: float = 2.0,
    torch_threads: int | None = 1,
) -> None:
    """Load the checkpoint and the backends YAML and serve until interrupted (blocking).

    ``torch_threads`` sets ``torch.set_num_threads`` for the process (default 1: the estimator's
    small per-batch ops are fastest single-threaded, and intra-op threads fight the HTTP work and
    other processes for the cores; measured 30 ms vs 1,050 ms per batch of 50 on a loaded 2-core
    machine); None leaves torch's default.

    The router's CPU work (estimators, policy) runs on ``compute_threads`` worker threads (default
    1: the work is serialised, the event loop stays free for HTTP I/O; Hugging Face fast
    tokenizers are not safe to share between threads, keep 1 unless the estimator allows more).
    """
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    executor = ThreadPoolExecutor(max_workers=compute_threads, thread_name_prefix="routing")
    router = CascadeRouter.from_checkpoint(checkpoint, budget=budget, strategy=strategy, name=name,
                                           executor=executor)
    pool = BackendPool.from_yaml(backends)
    app = create_app(router, pool, budget, max_batch=max_batch, batch_window_ms=batch_window_ms)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


class BackgroundServer:
    """Run an ASGI app with uvicorn in a daemon thread on 127.0.0.1 and a free port (tests, demos).

    ``with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")``; startup and shutdown are
    bounded by ``timeout_s``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0,
                 log_level: str = "warning") -> None:
        import socket

        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=1,
                                backlog=4096)
        self.server = uvicorn.Server(config)
        self.timeout_s = timeout_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self._sock]))

    def start(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url} within {self.timeout_s}s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(self.timeout_s)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
