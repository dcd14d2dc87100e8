"""An OpenAI-compatible HTTP server in front of a :class:`CascadeRouter` (FastAPI + uvicorn).

Endpoints:

- ``POST /v1/chat/completions``: the body is validated by :mod:`cascade_routing.serving.schema`
  (pydantic) before any work. ``model`` must be the router's name. The query the estimators see
  is the text of the LAST user message; the full ``messages`` list is forwarded to each backend,
  together with the sampling parameters the client set (``ChatCompletionRequest.FORWARDED``).
  Optional extension ``"routing": {"budget": B, "task": "..."}``: a budget can only LOWER the
  caller's cap (``min(server budget, key budget, B)``, then the largest fitted budget <= that);
  ``task`` is the query's task label. The answer is a ``chat.completion`` plus ``routing`` (models
  run, per-model and total cost, estimates at each step, failures, timing). ``X-Request-ID`` is
  echoed in the response header and in ``routing.request_id`` when it is 1 to
  :data:`MAX_REQUEST_ID_CHARS` printable ASCII characters; absent or otherwise, a fresh id is
  generated (:func:`request_id_of`).
  Every OpenAI chat parameter is forwarded or refused with 400 naming it
  (:mod:`cascade_routing.serving.params`); the answer's choices are the selected backend's own
  (tool calls, ``n`` choices, logprobs). ``stream: true`` answers with server-sent events
  (:mod:`cascade_routing.serving.chat_stream`). Headers ``X-Cascade-Routing-Cost-USD`` (the
  request's real cost), ``X-Cascade-Routing-Model`` and ``X-Cascade-Routing-Models-Run``.
- ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /v1/routing/stats`` (spend accounts:
  server-wide and per API key, from the store; this process's id, batching, breakers and online λ
  controller: per worker with ``serve --workers N``), ``GET /health``
  (liveness; with a valid key or without keys, the account), ``GET /metrics`` (Prometheus,
  :mod:`cascade_routing.serving.metrics`), ``GET /docs`` and ``GET /openapi.json``. With API keys
  configured every endpoint but a bare ``/health`` needs ``Authorization: Bearer <key>``.
- With ``controller`` settings, λ is adjusted online from the realised spend so the mean spend of
  each budget meets it on live traffic (:mod:`cascade_routing.policies.controller`); every
  request's trace says which λ multiplier it used (``routing.controller``).

Each request succeeds or fails on its own: it runs its own decide/call loop
(:meth:`CascadeRouter.route_one`); only the estimator/policy calls are micro-batched
(:class:`ComputeBatcher`, which isolates a failing job); whatever a request spent is recorded in
the spend ledger, also when it fails, times out or its client disconnects.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:

====  ==========================================================================================
400   malformed JSON, invalid or unsupported field (named in ``param``), no user text, budget
      below every fitted one, a ``routing.task`` the checkpoint does not know, prompt longer than
      ``max_prompt_chars`` (``context_length_exceeded``); also, when every model tried refused
      the request itself, the first backend's 400/413/422 (its status, message, ``param``, ``code``)
401   missing or unknown API key (``invalid_api_key``)
404   unknown ``model`` (``model_not_found``) or route
408   the body did not arrive within ``body_timeout_s`` (``request_timeout``)
413   body larger than ``max_body_bytes`` (``request_too_large``)
415   the body is not declared ``Content-Type: application/json`` (``unsupported_media_type``)
429   ``max_concurrent`` requests in flight (``server_busy``, with ``Retry-After``), the key's
      ``max_spend`` is used up (``insufficient_quota``) or held by its requests in flight
      (``quota_reserved``, with ``Retry-After``)
499   the client closed the connection (logged; the client never reads it)
500   a fault in the estimators or the policy for this request (logged), with ``spent``; any other
      unexpected fault of the server in a request: ``internal_error`` (logged), with ``spent``
502   every model the policy tried failed (``no_model_available``, with ``failures``, ``spent``)
503   shutting down and the request could not finish in the grace period (``server_shutting_down``)
504   the request's deadline passed (``deadline_exceeded``); backend calls cancelled, ``spent``
====  ==========================================================================================

Every chat-completion answer carries ``X-Cascade-Routing-Cost-USD``: the real cost of an answer,
``spent`` of an error after routing started, 0 for a request refused before any work. Every body is
strict JSON (:class:`StrictJSONResponse`): a backend answer that is not (``NaN``, a lone surrogate)
is that model's ``bad_response`` (:mod:`cascade_routing.serving.backend_responses`), anything else
non-finite in a trace is sent as null.
Errors of the other endpoints (401) are not counted in the chat-completion metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cascade_routing.policies.controller import BudgetControllers, ControllerConfig, lam_in_use
from cascade_routing.serving.accounts import ALL, Reservation, SpendLedger, SpendReservations
from cascade_routing.serving.backend_config import check_backends_match
from cascade_routing.serving.backends import REQUEST_LIMITS, BackendPool, RequestLimits, RequestRejectedError
from cascade_routing.serving.batching import ComputeBatcher
from cascade_routing.serving.chat_stream import StreamOutcome, default_error_event, start_stream
from cascade_routing.serving.keys import ApiKey, lookup
from cascade_routing.serving.limits import ConcurrencyGate, ServerLimits, read_body
from cascade_routing.serving.metrics import ServerMetrics
from cascade_routing.serving.router import (
    CascadeRouter,
    NoModelAvailableError,
    RouteProgress,
    RouteRequest,
    RouteResult,
    RouterError,
)
from cascade_routing.serving.schema import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorBody,
    ErrorResponse,
    RequestError,
    parse_chat_request,
    strict_json,
)
from cascade_routing.serving.store import CounterStore
from cascade_routing.serving.streaming import ChunkWriter, error_event

log = logging.getLogger(__name__)


class StrictJSONResponse(JSONResponse):
    """A JSON response that is always strict JSON, whatever it carries (a backend's or the
    estimators' NaN becomes null, a lone surrogate its escape: :func:`~cascade_routing.serving.
    schema.strict_json`), so rendering an answer or an error never fails."""

    def render(self, content: Any) -> bytes:
        return strict_json(content)


def refusal(err: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    """A :class:`RequestError` as an error response (its status, message, param, code, headers)."""
    return error_response(err.status, err.message, "authentication_error" if err.status == 401 else
                          "rate_limit_error" if err.status == 429 else "invalid_request_error",
                          param=err.param, code=err.code, headers={**(headers or {}), **err.headers})


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error in OpenAI's shape (:class:`ErrorResponse`)."""
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code, **(extra or {})))
    return StrictJSONResponse(body.model_dump(), status_code=status, headers=headers)


def check_content_type(request: Request) -> None:
    """:class:`RequestError` 415 unless the body is declared ``Content-Type: application/json``
    (parameters such as ``charset`` allowed): a web page can make a visitor's browser send a
    ``text/plain`` or form POST to a server on localhost without a CORS preflight, never this one."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise RequestError(f"Content-Type must be application/json, got {media or 'none'!r}", None, 415,
                           "unsupported_media_type")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(router: CascadeRouter, backends: BackendPool, budget: float | None = None,
               max_batch: int = 64, batch_window_ms: float = 2.0, limits: ServerLimits | None = None,
               keys: dict[str, ApiKey] | None = None, store: CounterStore | None = None,
               request_model: type[ChatCompletionRequest] = ChatCompletionRequest,
               controller: ControllerConfig | None = None) -> FastAPI:
    """The FastAPI app; ``backends`` and ``store`` are closed when the app shuts down.

    The estimator/policy calls of concurrent requests are micro-batched (:class:`ComputeBatcher`,
    at most ``max_batch`` jobs formed within ``batch_window_ms``); each request runs its own
    backend calls. ``limits``: :class:`ServerLimits`. ``keys``: digest -> :class:`ApiKey`
    (:func:`cascade_routing.serving.keys.load_keys`); when given, every endpoint but a bare
    ``/health`` needs ``Authorization: Bearer <key>``. ``store``: where the spend accounts live
    (default: in memory). ``controller``: settings of the online λ controller (one per budget in
    use); None serves the fitted λ unchanged.

    Startup checks: every model of the router needs a backend (a ``BackendPool``'s file is checked
    by :func:`~cascade_routing.serving.backend_config.check_backends_match`: a
    ``BackendConfigError`` naming the file and the missing models; entries the router lacks and
    prices far from the checkpoint's warn), and ``budget`` and the keys' budgets need a fitted λ.
    """
    s = _ServerCore(router, backends, budget, max_batch, batch_window_ms, limits, keys, store, request_model,
                    controller)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await s.compute.aclose()
            await s.backends.aclose()
            s.ledger.store.close()

    app = FastAPI(title="cascade-routing", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=StrictJSONResponse)
    s.app = app
    app.state.router = router
    app.state.backends = backends
    app.state.batcher = s.compute
    app.state.ledger = s.ledger
    app.state.limits = s.limits
    app.state.gate = s.gate
    app.state.draining = asyncio.Event()  # set by DrainingServer when a shutdown begins
    app.state.controllers = s.controllers
    app.state.metrics = s.metrics
    s.publish_lambda(router.fitted_for(s.server_budget)[0])
    _add_error_handlers(app, s)
    _add_info_routes(app, s)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(request: Request) -> Response:
        return await s.chat_completions(request)

    return app


class _ServerCore:
    """The state one app serves from (router, backends, batcher, gate, ledger, controllers, metrics)
    and the request logic :func:`create_app`'s routes call."""

    def __init__(self, router: CascadeRouter, backends: BackendPool, budget: float | None, max_batch: int,
                 batch_window_ms: float, limits: ServerLimits | None, keys: dict[str, ApiKey] | None,
                 store: CounterStore | None, request_model: type[ChatCompletionRequest],
                 controller: ControllerConfig | None) -> None:
        self.router, self.backends, self.keys, self.request_model = router, backends, keys, request_model
        self.limits = limits or ServerLimits()
        self.compute = ComputeBatcher(router, max_batch=max_batch, window_ms=batch_window_ms)
        self.gate = ConcurrencyGate(self.limits.max_concurrent, self.limits.retry_after_s)
        self.server_budget = budget if budget is not None else router.default_budget
        self.ledger = SpendLedger(store, self.server_budget)
        self.reservations = SpendReservations()
        self.controllers = BudgetControllers(controller) if controller is not None else None
        self.metrics = ServerMetrics(self.server_budget)
        self.app: FastAPI | None = None
        configs = getattr(backends, "configs", None)
        if configs is not None:  # a BackendPool: its file against the checkpoint (names, prices)
            check_backends_match(configs, router.models, router.prices)
        missing = [m for m in router.models if m not in backends]
        if missing:
            raise RouterError(f"no backend configured for model(s) {missing} of the checkpoint")
        for key in (keys or {}).values():
            if key.budget is not None:
                try:
                    router.fitted_for(min(key.budget, self.server_budget) if self.server_budget is not None
                                      else key.budget)
                except RouterError as err:
                    raise RouterError(f"API key {key.name!r}: budget {key.budget}: {err}") from None

    # ------------------------------------------------------------------ shared helpers
    def publish_lambda(self, used_budget: float | None) -> None:
        _, fitted = self.router.fitted_for(used_budget)
        factor = self.controllers.get(used_budget).factor if self.controllers is not None and used_budget else 1.0
        self.metrics.set_lambda(used_budget, lam_in_use(fitted, factor), factor)  # type: ignore[arg-type]

    def authenticate(self, request: Request) -> ApiKey | None:
        """The caller's key (None when the server has no keys); 401 without a valid one."""
        if not self.keys:
            return None
        key = lookup(self.keys, request.headers.get("authorization"))
        if key is None:
            raise RequestError("missing or invalid API key: send 'Authorization: Bearer <key>'", None, 401,
                               "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return key

    def fail(self, err: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
        """A chat-completion request refused before any work: counted in the metrics, answered in
        OpenAI's error shape with ``X-Cascade-Routing-Cost-USD: 0``."""
        self.metrics.error(err.code or ("bad_request" if err.status == 400 else f"http_{err.status}"))
        self.metrics.request(err.status, None)
        return refusal(err, {**(headers or {}), COST_HEADER: "0"})

    def account_view(self, key: ApiKey | None) -> dict[str, Any]:
        """Server-wide account plus every key's (open server or admin key), else the key's own."""
        ledger, server_budget = self.ledger, self.server_budget
        if key is None or key.admin:
            out = ledger.snapshot(ALL)
            out["keys"] = {k.name: ledger.snapshot(k.name, k.budget or server_budget)
                           for k in (self.keys or {}).values()}
            return out if key is None else {**out, "key": key.name}
        return {**ledger.snapshot(key.name, key.budget or server_budget), "key": key.name}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.router.name, "object": "model", "created": int(self.ledger.started),
                "owned_by": "cascade-routing", "models": self.router.models, "budgets": self.router.budgets}

    def effective_budget(self, key: ApiKey | None, requested: float | None) -> float | None:
        """min(server budget, key budget, requested): a client can only lower its budget."""
        caps = [b for b in (self.server_budget, key.budget if key else None, requested) if b is not None]
        return min(caps) if caps else None

    # ------------------------------------------------------------------ chat completions
    async def chat_completions(self, request: Request) -> Response:
        """Authenticate, check the key's spend limit and the body's ``Content-Type`` (415 unless
        ``application/json``), read the body (within ``body_timeout_s``, before taking a place at the
        gate: a slow sender never holds a concurrency slot), take a place at the gate, serve; a stream
        holds its place until it ends. Any unexpected exception is still answered in OpenAI's error
        shape (500 ``internal_error``, with ``spent`` and the cost header) and counted in /metrics."""
        arrived = time.monotonic()
        request_id = request_id_of(request.headers.get("x-request-id"))
        headers = {"X-Request-ID": request_id}
        progress = RouteProgress()
        held = body_read = False
        try:
            try:
                key = self.authenticate(request)
                self.admit(key)
                check_content_type(request)
                raw = await self.read_body(request, arrived)
                body_read = True
                self.gate.enter()
                held = True
                response = await self.serve_chat(request, raw, request_id, headers, key, arrived, progress)
            except RequestError as err:
                # refused before its body was read: the connection is closed after the answer, so the
                # rest of that body is never taken for a next request nor keeps an idle socket open
                return self.fail(err, headers if body_read else {**headers, "Connection": "close"})
            if isinstance(response, StreamingResponse):  # a stream holds its place until it ends
                response.body_iterator = _then(response.body_iterator, self.gate.leave)
                held = False
            return response
        except Exception as err:  # noqa: BLE001 - a fault of the server itself: still a JSON answer
            return self.internal_error(err, progress, request_id, headers)
        finally:
            if held:
                self.gate.leave()

    def internal_error(self, err: BaseException, progress: RouteProgress, request_id: str,
                       headers: dict[str, str]) -> JSONResponse:
        """The answer to a chat request that raised what no other path handles (a bug, a failing
        store): 500 ``internal_error`` in OpenAI's shape with what the request spent (``spent`` and
        the cost header), logged and counted in /metrics (a request whose route ran is in the
        ledger already: it is recorded whatever the route's outcome)."""
        log.error("internal error in request %s", request_id, exc_info=err)
        total = progress.total_cost()
        self.metrics.error("internal_error")
        self.metrics.request(500, None)
        return error_response(500, f"internal server error ({type(err).__name__}); it was logged with the request "
                              "id", "server_error", code="internal_error",
                              extra={"spent": total, "request_id": request_id},
                              headers={**headers, COST_HEADER: f"{total:.10g}"})

    async def read_body(self, request: Request, arrived: float) -> bytes:
        """The request body within ``limits.body_timeout_s`` (and the deadline) of its arrival:
        413 past ``max_body_bytes``, 408 ``request_timeout`` when it has not all arrived in time."""
        limits = self.limits
        timeout = min(limits.body_timeout_s, limits.deadline_s) - (time.monotonic() - arrived)
        try:
            return await asyncio.wait_for(read_body(request, limits.max_body_bytes), max(0.0, timeout))
        except (asyncio.TimeoutError, TimeoutError):
            raise RequestError(f"the request body did not arrive within {min(limits.body_timeout_s, limits.deadline_s)}s "
                               "(the server's body timeout)", None, 408, "request_timeout",
                               headers={"Connection": "close"}) from None

    def admit(self, key: ApiKey | None, reserve: float = 0.0) -> Reservation | None:
        """Check the key's ``max_spend``: 429 ``insufficient_quota`` once its recorded spend reached it,
        429 ``quota_reserved`` (with ``Retry-After``) while requests in flight have reserved the rest;
        else, with ``reserve`` > 0, hold that much for this request (see
        :class:`~cascade_routing.serving.accounts.SpendReservations`). None for an unlimited key."""
        if key is None or key.max_spend is None:
            return None
        spent = self.ledger.spent(key.name)
        if spent >= key.max_spend:
            raise RequestError(f"API key {key.name!r} has spent its limit of {key.max_spend} USD", None, 429,
                               "insufficient_quota")
        reserved = self.reservations.held(key.name)
        if spent + reserved >= key.max_spend:
            raise RequestError(
                f"API key {key.name!r} has {key.max_spend - spent:.6g} USD of its limit of {key.max_spend} USD "
                f"left, held by its requests in flight (worst case {reserved:.6g} USD); retry when they finish",
                None, 429, "quota_reserved", headers={"Retry-After": str(self.limits.retry_after_s)})
        return self.reservations.reserve(key.name, reserve) if reserve > 0 else None

    def worst_case_cost(self, chat: ChatCompletionRequest, item: RouteRequest) -> float:
        """The most this request can cost if every model runs (what a key with ``max_spend`` reserves):
        per model, input price x the UTF-8 bytes of the messages and parameters sent (``item``'s; a
        byte-level BPE token covers at least one byte) + output price x the output-token cap
        (``max_completion_tokens`` / ``max_tokens``, else :data:`RESERVED_OUTPUT_TOKENS`) x ``n``."""
        configs = getattr(self.backends, "configs", {})
        sent = {"messages": item.messages, **item.params}
        prompt_tokens = len(json.dumps(sent, ensure_ascii=False).encode("utf-8", errors="replace"))
        caps = [c for c in (chat.max_completion_tokens, chat.max_tokens) if c is not None]
        output_tokens = (max(caps) if caps else RESERVED_OUTPUT_TOKENS) * (chat.n or 1)
        return float(sum(configs[m].price_in * prompt_tokens + configs[m].price_out * output_tokens
                         for m in self.router.models if m in configs))

    def parse_chat(self, raw: bytes) -> ChatCompletionRequest:
        """The validated request: this server's model, supported parameters, prompt within the limit,
        a task label the checkpoint knows."""
        router, limits = self.router, self.limits
        chat = parse_chat_request(raw, self.request_model)
        if chat.model != router.name:
            raise RequestError(f"unknown model {chat.model!r}; this server serves {router.name!r}", "model", 404,
                               "model_not_found")
        refused = chat.unsupported()
        if refused is not None:
            raise RequestError(f"unsupported parameter '{refused[0]}': {refused[1]}", refused[0], 400,
                               "unsupported_parameter")
        if chat.prompt_chars() > limits.max_prompt_chars:
            raise RequestError(f"the messages have {chat.prompt_chars()} characters of text; the limit is "
                               f"{limits.max_prompt_chars}", "messages", 400, "context_length_exceeded")
        try:
            router.check_task(chat.routing.task if chat.routing else None)
        except RouterError as err:
            raise RequestError(str(err), "routing.task") from None
        return chat

    async def serve_chat(self, request: Request, raw: bytes, request_id: str, headers: dict[str, str],
                         key: ApiKey | None, arrived: float, progress: RouteProgress) -> Response:
        """Parse, pick the fitted λ, route (``progress`` is filled as it goes) and answer: the
        ``chat.completion``, a stream, or the error of a route that did not answer."""
        router, limits, metrics = self.router, self.limits, self.metrics
        started = time.perf_counter()
        deadline = arrived + limits.deadline_s
        chat = self.parse_chat(raw)
        requested = chat.routing.budget if chat.routing else None
        try:
            budget_used, table_fitted = router.fitted_for(self.effective_budget(key, requested))
        except RouterError as err:
            raise RequestError(str(err), "routing.budget") from None
        control = self.controllers.get(budget_used) if self.controllers is not None and budget_used else None
        fitted, factor, version = (table_fitted, 1.0, None) if control is None else control.scaled(table_fitted)
        item = RouteRequest(chat.query() or "", chat.messages_payload(), chat.routing.task if chat.routing else None,
                            chat.forwarded_params())
        key_name = key.name if key else None
        controller_info: dict[str, Any] | None = None
        observed = False

        def observe() -> dict[str, Any] | None:
            """Hand the request's spend to the online controller (once; its ``controller_info`` then
            names the state it was observed as) and return ``controller_info``. A request that got no
            answer and cost nothing (every model failed unbilled, or it ended before any call) is
            not observed: it is no evidence of cheap traffic, and an outage would otherwise wind λ
            down to its floor, to be overspent once the backends are back."""
            nonlocal controller_info, observed
            if not observed:
                observed = True
                if control is not None and (progress.answers or progress.total_cost() > 0):
                    control.observe(progress.total_cost())
                    controller_info = {"budget": control.budget, "lam_factor": factor, "version": version,
                                       "observed_as": control.version - 1}
            return controller_info

        def record(outcome: str, result: RouteResult | None, cancelled: list[str]) -> None:
            """Account for whatever the request spent (controller, ledger, metrics), in every outcome,
            then give back the request's reservation (its real cost now counts instead)."""
            try:
                observe()
                spent = progress.total_cost()
                failed = [f["model"] for f in progress.called_failures()]
                self.ledger.record(key_name, budget_used, outcome, spent, list(progress.answers),
                                   result.model if result else None, failed, cancelled)
                metrics.spent(progress.costs(), result.model if result else None, failed, key_name or "anonymous",
                              progress.partial)
                self.publish_lambda(budget_used)
            finally:
                if reservation is not None:
                    reservation.release()

        def run_route() -> "asyncio.Task[RouteResult]":
            token = REQUEST_LIMITS.set(RequestLimits(limits.max_upstream_attempts, deadline))
            try:  # the task copies the context: its backend calls share these limits
                return asyncio.create_task(router.route_one(item, self.backends, budget_used, self.compute, progress,
                                                            fitted))
            finally:
                REQUEST_LIMITS.reset(token)

        answer: list[Response] = []

        def finish(result: RouteResult) -> None:
            """Build the answer before the request is recorded: one that cannot be built is recorded
            (and answered) as an error, never as answered."""
            choices, usage, routing, extra_headers = completion_parts(result, request_id, observe())
            body = ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                                          model=router.name, choices=choices, usage=usage, routing=routing)
            answer.append(StrictJSONResponse(body.model_dump(exclude_none=False),
                                             headers={**headers, **extra_headers}))

        # hold the request's worst case against the key's max_spend until record() settles it
        reservation = self.admit(key, self.worst_case_cost(chat, item)) if key is not None and key.max_spend else None
        try:
            if chat.stream:
                return await self.stream_chat(request, chat, item, run_route, record, progress, request_id, headers,
                                              deadline, started, observe)
            outcome, result, error = await self.await_route(request, run_route(), progress, deadline, record, finish)
        finally:
            if reservation is not None and not chat.stream:
                reservation.release()  # recorded already; this only matters if the route never started
        if result is None:
            return self.route_failure(outcome, error, progress, request_id, headers, stream=False)
        metrics.request(200, False, time.perf_counter() - started)
        return answer[0]

    async def await_route(self, request: Request, route: "asyncio.Task[RouteResult]", progress: RouteProgress,
                          deadline: float, record: Any, finish: Any = None
                          ) -> tuple[str, RouteResult | None, BaseException | None]:
        """Wait for ``route`` until it answers, the client leaves, the deadline passes or a shutdown's
        grace period ends (then it is cancelled, and the model whose call was in flight is counted in
        ``cancelled_calls``); ``record`` the spend in every case, also when this wait itself is
        cancelled (the server stopping past its grace period, or a streamed response whose client
        went away: recorded as a disconnect). ``finish(result)``, when given, runs on a route's
        result before it is recorded: if it raises, the outcome is ``errors`` with its exception.
        Returns ``(outcome, result, error)``."""
        limits = self.limits
        watcher = asyncio.create_task(_disconnected(request))
        drain = asyncio.create_task(self.app.state.draining.wait())
        outcome, result, error = "errors", None, None
        cancelled: list[str] = []
        try:
            done, _ = await asyncio.wait({route, watcher, drain}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if drain in done and route not in done and watcher not in done:
                # shutting down: finish within the grace period (less a margin to send the answer)
                until = min(deadline, time.monotonic() + max(0.0, limits.shutdown_timeout_s - 1.0))
                done, _ = await asyncio.wait({route, watcher}, timeout=max(0.0, until - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    done = {drain}
            if route in done:
                try:
                    result = route.result()
                    if finish is not None:
                        finish(result)
                    outcome = "answered"
                except Exception as err:  # noqa: BLE001 - this request's own failure
                    result, error = None, err
            else:
                outcome = "disconnects" if watcher in done else "shutdowns" if drain in done else "timeouts"
                if progress.in_flight is not None:
                    cancelled.append(progress.in_flight)
                route.cancel()
                await asyncio.gather(route, return_exceptions=True)
        except asyncio.CancelledError:
            if progress.in_flight is not None:
                cancelled.append(progress.in_flight)
            route.cancel()
            outcome = "disconnects"
            raise
        finally:
            watcher.cancel()
            drain.cancel()
            record(outcome, result, cancelled)
        return outcome, result, error

    def interruption(self, outcome: str) -> tuple[str, str, str]:
        """(message, type, code) of a route the server stopped at its deadline (``timeouts``) or at the end
        of its shutdown grace period (``shutdowns``): the same words in a JSON error and a stream's error event."""
        if outcome == "shutdowns":
            return ("the server is shutting down and could not finish this request in its grace period of "
                    f"{self.limits.shutdown_timeout_s}s; retry", "server_error", "server_shutting_down")
        if outcome == "timeouts":
            return (f"the request did not finish within the server's deadline of {self.limits.deadline_s}s; its "
                    "backend calls were cancelled", "timeout_error", "deadline_exceeded")
        raise ValueError(f"no interruption message for outcome {outcome!r}")

    def route_failure(self, outcome: str, error: BaseException | None, progress: RouteProgress, request_id: str,
                      headers: dict[str, str], stream: bool) -> JSONResponse:
        """The error response of a request whose route did not answer (504, 503, 499, the status of a
        request the backends refused, 502 or 500), with what it spent in ``spent`` and in the
        ``X-Cascade-Routing-Cost-USD`` header."""
        metrics = self.metrics
        total = progress.total_cost()
        spent = {"spent": total, "request_id": request_id}
        headers = {**headers, COST_HEADER: f"{total:.10g}"}
        if outcome == "shutdowns":
            message, type_, code = self.interruption("shutdowns")
            status, resp = 503, error_response(503, message, type_, code=code, extra=spent,
                                               headers={**headers, "Retry-After": "1"})
        elif outcome == "timeouts" or isinstance(error, (asyncio.TimeoutError, TimeoutError)):
            message, type_, code = self.interruption("timeouts")
            status, resp = 504, error_response(504, message, type_, code=code,
                                               extra={**spent, "models_run": list(progress.answers)}, headers=headers)
        elif outcome == "disconnects":
            status, resp = 499, error_response(499, "client closed the request", "client_closed", code="client_closed",
                                               extra=spent, headers=headers)
        elif isinstance(error, RequestRejectedError):
            status, resp = error.status, error_response(
                error.status, f"model {error.model!r} refused the request (HTTP {error.status}): {error.message}",
                "invalid_request_error", param=error.param, code=error.code,
                extra={"failures": progress.failures, **spent}, headers=headers)
        elif isinstance(error, NoModelAvailableError):
            status, resp = 502, error_response(502, str(error), "upstream_error", code="no_model_available",
                                               extra={"failures": error.failures, **spent}, headers=headers)
        else:
            log.error("routing failed for request %s", request_id, exc_info=error)
            status, resp = 500, error_response(500, f"routing failed: {type(error).__name__}: {error}",
                                               "server_error", extra=spent, headers=headers)
        metrics.error({504: "deadline_exceeded", 503: "server_shutting_down", 499: "client_closed",
                       502: "no_model_available", 500: "routing_failed"}.get(status, "rejected_by_backend"))
        metrics.request(status, stream)
        return resp

    async def stream_chat(self, request: Request, chat: ChatCompletionRequest, item: RouteRequest, run_route: Any,
                          record: Any, progress: RouteProgress, request_id: str, headers: dict[str, str],
                          deadline: float, started: float, controller_info: Any) -> Response:
        """``stream: true``: see :mod:`cascade_routing.serving.chat_stream`. The route is awaited as a
        non-streamed one is (:meth:`await_route`: deadline, client disconnect, shutdown grace
        period), so a failure before the first byte is the same JSON error (504, 499, 503, ...), and
        one after it an error event: ``deadline_exceeded``, ``server_shutting_down``, or
        ``stream_aborted`` (a streamed model broke; routing failed)."""
        metrics = self.metrics

        built: dict[int, tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], dict[str, str]]] = {}

        def build(result: RouteResult) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], dict[str, str]]:
            """The answer's parts, built once: first by ``await_route`` before the request is recorded
            (so an answer that cannot be built is an error, not an answered request)."""
            if id(result) not in built:
                built[id(result)] = completion_parts(result, request_id, controller_info())
            return built[id(result)]

        async def submit(_: RouteRequest) -> RouteResult:
            outcome, result, error = await self.await_route(request, run_route(), progress, deadline, record, build)
            if result is not None:
                return result
            raise error if error is not None else RouteInterrupted(outcome)

        def on_end(outcome: StreamOutcome) -> None:
            if outcome.result is not None or outcome.first_token_s is not None:  # a 200 went (or goes) out
                metrics.request(200, True, time.perf_counter() - started)

        def error_event_of(err: BaseException) -> dict[str, Any]:
            spent = {"spent": progress.total_cost(), "request_id": request_id}
            kind = getattr(err, "outcome", None)
            if kind in ("shutdowns", "timeouts"):
                message, type_, code = self.interruption(kind)
                return error_event(message, type_, code=code, **spent)
            event = default_error_event(err)
            event["error"].update(spent)
            return event

        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        writer = ChunkWriter(self.router.name, include_usage)
        out = await start_stream(submit, item, writer, build, headers, on_end,
                                 on_first_token=lambda seconds, mode: metrics.ttft.labels(mode).observe(seconds),
                                 error_event_of=error_event_of, on_abort=metrics.error)
        if isinstance(out, BaseException):
            return self.route_failure(getattr(out, "outcome", "errors"), out, progress, request_id, headers,
                                      stream=True)
        return out


class RouteInterrupted(Exception):
    """A route the server stopped (``outcome``: ``timeouts``, ``shutdowns`` or ``disconnects``)."""

    def __init__(self, outcome: str) -> None:
        super().__init__(f"route interrupted ({outcome})")
        self.outcome = outcome


def _add_error_handlers(app: FastAPI, s: _ServerCore) -> None:
    """Every error as a JSON body in OpenAI's shape."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error",
                              code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return refusal(exc)  # the info routes' errors (401): not chat-completion requests, not counted

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        # an info route's bug (chat requests answer their own: _ServerCore.internal_error)
        return error_response(500, f"internal server error ({type(exc).__name__}); it was logged", "server_error",
                              code="internal_error")


def _add_info_routes(app: FastAPI, s: _ServerCore) -> None:
    """Health, spend and routing statistics, the model list, Prometheus metrics, the OpenAPI docs."""
    router = s.router

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        try:
            key = s.authenticate(request)
        except RequestError:
            return {"status": "ok"}  # liveness only; details need a key
        return {"status": "ok", "model": router.name, "models": router.models,
                "budget": s.server_budget, "spend": s.account_view(key)}

    @app.get("/v1/routing/stats")
    async def stats(request: Request) -> dict[str, Any]:
        key = s.authenticate(request)
        return {**s.account_view(key), "process": os.getpid(), "batching": s.compute.stats(),
                "in_flight": s.gate.in_flight, "rejected_busy": s.gate.rejected,
                "controller": s.controllers.state() if s.controllers else None,
                "breakers": {m: b.breaker.state for m, b in getattr(s.backends, "backends", {}).items()}}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        s.authenticate(request)
        return {"object": "list", "data": [s.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        s.authenticate(request)
        if model_id != router.name:
            raise RequestError(f"unknown model {model_id!r}; this server serves {router.name!r}", "model", 404,
                               "model_not_found")
        return JSONResponse(s.model_card())

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        s.authenticate(request)
        return Response(s.metrics.render(), media_type=s.metrics.content_type)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        s.authenticate(request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        s.authenticate(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="cascade-routing")


async def _then(chunks: AsyncIterator[Any], done: Any) -> AsyncIterator[Any]:
    """``chunks`` passed through; ``done()`` once they end or the client goes away."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        done()


COST_HEADER = "X-Cascade-Routing-Cost-USD"

MAX_REQUEST_ID_CHARS = 128
"""The longest client ``X-Request-ID`` the server echoes (:func:`request_id_of`)."""


def request_id_of(header: str | None) -> str:
    """The request's id: the client's ``X-Request-ID`` when it is 1 to :data:`MAX_REQUEST_ID_CHARS`
    printable ASCII characters (space to ``~``), else (absent, longer, or other characters) a fresh
    ``uuid4().hex``. The id is echoed in a response header, the trace and the logs, so it is bounded;
    a bad one is replaced rather than refused, since the header is optional and only correlates logs."""
    if header and len(header) <= MAX_REQUEST_ID_CHARS and header.isascii() and header.isprintable():
        return header
    return uuid.uuid4().hex

RESERVED_OUTPUT_TOKENS = 4096
"""Output tokens per model a request without ``max_tokens`` / ``max_completion_tokens`` is assumed to
produce at most, for its key's ``max_spend`` reservation (``_ServerCore.worst_case_cost``)."""


def completion_parts(result: RouteResult, request_id: str, controller: dict[str, Any] | None = None
                     ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], dict[str, str]]:
    """(choices, usage, routing trace, response headers) of a routed answer.

    ``choices``: the selected backend's own choices (message with content and/or ``tool_calls``,
    ``logprobs``, ``finish_reason``; all ``n`` of them), else one built from the answer text.
    ``usage``: tokens summed over every model that ran. ``routing``: the trace, with the online
    controller's ``controller`` entry (None without one). Headers: ``X-Cascade-Routing-Cost-USD``
    (the request's real total cost), ``X-Cascade-Routing-Model``, ``X-Cascade-Routing-Models-Run``.
    """
    answer = result.answers[result.model]
    choices = _backend_choices(answer.raw)
    if choices is None:
        choices = [{"index": 0, "message": {"role": "assistant", "content": result.text},
                    "logprobs": None, "finish_reason": "stop"}]
    usage_in = sum(a.usage.get("prompt_tokens", 0) for a in result.answers.values())
    usage_out = sum(a.usage.get("completion_tokens", 0) for a in result.answers.values())
    routing = result.to_dict()
    routing["request_id"] = request_id
    routing["controller"] = controller
    headers = {COST_HEADER: f"{result.total_cost:.10g}", "X-Cascade-Routing-Model": result.model,
               "X-Cascade-Routing-Models-Run": ",".join(result.models_run)}
    return (choices, {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                      "total_tokens": usage_in + usage_out}, routing, headers)


def _backend_choices(raw: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The backend's ``choices`` as OpenAI shapes them (index, message, logprobs, finish_reason)."""
    choices = raw.get("choices") if isinstance(raw, dict) else None
    if not isinstance(choices, list) or not choices:
        return None
    out = []
    for k, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            return None
        message = {key: value for key, value in choice["message"].items() if value is not None or key == "content"}
        message.setdefault("content", None)  # e.g. a tool call without the key
        message["role"] = "assistant"
        reason = choice.get("finish_reason")
        index = choice.get("index", k)
        index = index if isinstance(index, int) and not isinstance(index, bool) and index >= 0 else k
        out.append({"index": index, "message": message, "logprobs": choice.get("logprobs"),
                    "finish_reason": reason if isinstance(reason, str) else "stop"})
    return out


# the process runner lives in its own module; these names stay importable from here
from cascade_routing.serving.runner import (  # noqa: E402,F401
    KEEP_ALIVE_S,
    BackgroundServer,
    DrainingServer,
    reuse_port_socket,
    serve,
)
