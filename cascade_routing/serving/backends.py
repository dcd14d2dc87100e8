"""OpenAI-compatible chat-completions backends, one per model: retries, circuit breakers, limits.

The configuration (YAML) is :mod:`cascade_routing.serving.backend_config`; what an answer is, what
it costs, how ``usage`` and stream chunks are checked and which failures refuse the request itself
are in :mod:`cascade_routing.serving.backend_responses`. This module calls the endpoints: POST (or
stream) with jittered exponential backoff on 5xx / 429 / timeouts / connection errors (or the
endpoint's ``Retry-After``), a per-model circuit breaker and concurrency limit, and HTTP connection
pools shared by every model (:class:`BackendPool`).

Per-request limits (set by the server through :data:`REQUEST_LIMITS`, a context variable, so
every backend call made for one request shares them): a total number of HTTP attempts over all
models and retries, and a deadline; a call never starts an attempt, nor sleeps before a retry,
past the deadline, and each attempt's timeout is cut to the time left.

Per attempt: ``timeout_s`` bounds each read and also the attempt as a whole until its first
token is handed on to a streaming client (connect, send, and the last byte of a buffered answer),
so an endpoint trickling its answer byte by byte fails with ``timeout`` like a silent one (then
the next attempt or model); a stream already passing tokens to the client is bounded by each
read's timeout and the request's deadline only (a long answer is not a stall). The answer is read
at most ``max_response_bytes`` far (a larger one is ``bad_response``; a 4xx/5xx body only its
first 16 KiB, for the error message). Anything else an answer can make go wrong while it is read
(an undecodable ``Content-Encoding``, a chunk of the wrong shape) is ``bad_response`` too.
"""

from __future__ import annotations

import asyncio
import codecs
import contextvars
import email.utils
import math
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

import httpx

from cascade_routing.serving.backend_config import (  # noqa: F401  (re-exported: the public API)
    BackendConfig,
    BackendConfigError,
    load_backend_configs,
    parse_backends,
)
from cascade_routing.serving.backend_responses import (  # noqa: F401  (re-exported: the public API)
    FEATURE_NAMES,
    Answer,
    BackendError,
    RequestRejectedError,
    _logprob_confidence,
    _StreamedAnswer,
    answer_json,
    answer_text,
    check_choices,
    partial_cost,
    parse_usage,
    rejection,
)
from cascade_routing.serving.streaming import sse_data


@dataclass
class RequestLimits:
    """Shared by every backend call of one request: attempts left and the deadline (``time.monotonic``)."""

    attempts_left: int
    deadline: float | None = None

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


REQUEST_LIMITS: contextvars.ContextVar[RequestLimits | None] = contextvars.ContextVar("request_limits", default=None)

MAX_RETRY_AFTER_S = 60.0
ERROR_BODY_BYTES = 16 << 10
"""How much of a 4xx/5xx answer body is read (its error message is cut to 4,000 characters)."""
class _ClientSinkError(Exception):
    """Raised from a streaming client's token sink (``on_delta``; the cause is its exception): a
    failure on the client's side, which says nothing about the endpoint."""


_sleep = asyncio.sleep  # the retry wait (a module attribute so tests can record the delays)


class CircuitBreaker:
    """Per backend: closed -> open after ``failures`` consecutive failed attempts; while open every
    call fails at once (``circuit_open``); after ``reset_s`` it is half-open and lets ONE probe
    through: success closes it, failure opens it again for ``reset_s``."""

    def __init__(self, failures: int = 5, reset_s: float = 10.0, clock=time.monotonic) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self._probing = False
        self.opened = 0  # times it opened

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self._clock() - self.opened_at >= self.reset_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def abandon(self) -> None:
        """The attempt was cancelled (no verdict): let another probe through."""
        self._probing = False

    def success(self) -> None:
        self.consecutive = 0
        self.opened_at = None
        self._probing = False

    def failure(self) -> None:
        self.consecutive += 1
        if self._probing or self.consecutive >= self.failures:
            if self.opened_at is None or self._probing:
                self.opened += 1
            self.opened_at = self._clock()
        self._probing = False


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


@dataclass
class _Retry:
    """One request's attempts so far: how many were made, why the last one failed, the wait before the next."""

    attempts: int = 0
    reason: str = "unknown"
    detail: str = ""
    wait: float = 0.0


class Backend:
    """Async client of one OpenAI-compatible endpoint, with a concurrency limit and retries."""

    def __init__(self, config: BackendConfig, client: "httpx.AsyncClient | ShardedClient") -> None:
        self.config = config
        self._client = client
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_s)

    @property
    def name(self) -> str:
        return self.config.name

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
        return headers

    def _parse(self, body: Any, latency_ms: float, attempts: int) -> Answer:
        cfg = self.config
        try:
            choice = body["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(cfg.name, "bad_response", "no choices[0].message", attempts) from None
        try:
            check_choices(body["choices"])
        except ValueError as err:
            raise BackendError(cfg.name, "bad_response", str(err), attempts) from None
        text = answer_text(message)
        if text is None:
            raise BackendError(cfg.name, "bad_response",
                               "choices[0].message has neither string content nor tool_calls", attempts)
        try:
            tokens_in, tokens_out = parse_usage(body.get("usage"))
        except ValueError as err:
            raise BackendError(cfg.name, "bad_response", str(err), attempts) from None
        cost = tokens_in * cfg.price_in + tokens_out * cfg.price_out
        reported = body.get("x_cost_usd")
        if cfg.trust_reported_cost and reported is not None:
            if isinstance(reported, bool) or not isinstance(reported, (int, float)) or not (
                    math.isfinite(reported) and reported >= 0):
                raise BackendError(cfg.name, "bad_response",
                                   f"x_cost_usd must be a finite number >= 0, got {reported!r}", attempts)
            cost = float(reported)
        features: dict[str, float] = {
            "tokens_in": float(tokens_in),
            "tokens_out": float(tokens_out),
            "latency_ms": float(latency_ms),
        }
        confidence = _logprob_confidence(choice)
        if confidence is not None:
            features["logprob_confidence"] = confidence
        recorded = body.get("x_recorded_features")
        if isinstance(recorded, Mapping):
            for key, value in recorded.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    features[str(key)] = float(value)
        return Answer(
            model=cfg.name,
            text=text,
            cost=float(cost),
            features=features,
            usage={"prompt_tokens": tokens_in, "completion_tokens": tokens_out},
            latency_ms=latency_ms,
            attempts=attempts,
            raw=body,
        )

    async def complete(self, messages: list[dict[str, Any]], **params: Any) -> Answer:
        """POST the chat (``stream: false``); see :meth:`_request`."""
        return await self._request(messages, params, None)

    async def stream(self, messages: list[dict[str, Any]], on_delta: Callable[[dict[str, Any]], Awaitable[None]],
                     **params: Any) -> Answer:
        """POST the chat with ``stream: true`` (and ``stream_options.include_usage``): each upstream
        chunk choice that carries content or tool calls is handed to ``await on_delta(choice)``
        (``{"index", "delta", "logprobs"}``) as it arrives; the whole answer is returned at the end.
        Retries as :meth:`complete`, but only while nothing was handed on: a stream that breaks
        after that raises :class:`BackendError` with reason ``stream_broken``."""
        return await self._request(messages, params, on_delta)

    async def _request(self, messages: list[dict[str, Any]], params: dict[str, Any],
                       on_delta: Callable[[dict[str, Any]], Awaitable[None]] | None) -> Answer:
        """POST the chat to the endpoint; retry 5xx/429/timeouts/connection errors with jittered
        backoff (or the endpoint's ``Retry-After``), within the request's limits (module docstring).

        Raises :class:`BackendError` when every attempt failed, on a non-retryable 4xx
        (:class:`RequestRejectedError` when the request caused it), on a malformed answer
        (``bad_response``: no message, an invalid ``usage``, a bad stream chunk), when the
        circuit breaker is open (``circuit_open``), or when the request's attempts or time are spent
        (``attempt_limit`` / ``deadline``).
        """
        payload = self._payload(messages, params, on_delta)
        limits = REQUEST_LIMITS.get()
        retry = _Retry()
        handed_on = [False]
        async with self._semaphore:
            for attempt in range(self.config.max_retries + 1):
                if attempt and not await self._backoff(retry, attempt, limits):
                    break
                if self._refused(retry, limits):
                    break
                answer = await self._attempt(payload, limits, on_delta, handed_on, retry)
                if answer is not None:
                    return answer
        raise BackendError(self.config.name, retry.reason, retry.detail, retry.attempts)

    def _payload(self, messages: list[dict[str, Any]], params: dict[str, Any],
                 on_delta: Callable[[dict[str, Any]], Awaitable[None]] | None) -> dict[str, Any]:
        """The request body: the endpoint's ``extra_body``, the caller's ``params``, model id, messages,
        ``stream`` (with usage in the last chunk when streaming) and ``logprobs`` if configured."""
        cfg = self.config
        payload: dict[str, Any] = {**cfg.extra_body, **params, "model": cfg.model_id, "messages": messages}
        payload["stream"] = on_delta is not None
        if on_delta is not None:
            payload["stream_options"] = {"include_usage": True}
        if cfg.logprobs:
            payload["logprobs"] = True
        return payload

    async def _backoff(self, retry: "_Retry", attempt: int, limits: RequestLimits | None) -> bool:
        """Sleep before retry ``attempt`` (>= 1): jittered exponential backoff, at least the endpoint's
        Retry-After; False (reason ``deadline``) when that wait would outlast the request's time."""
        retry.wait = max(retry.wait, self.config.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
        left = None if limits is None else limits.time_left()
        if left is not None and retry.wait >= left:
            retry.reason, retry.detail = "deadline", f"no time left for a retry after {retry.reason}: {retry.detail}"
            return False
        await _sleep(retry.wait)
        return True

    def _refused(self, retry: "_Retry", limits: RequestLimits | None) -> bool:
        """True when no attempt may start: the request's attempts or time are spent, or the circuit
        breaker is open (``attempt_limit`` / ``circuit_open`` are the reason only if no attempt was made)."""
        if limits is not None:
            if limits.attempts_left <= 0:
                if retry.attempts == 0:
                    retry.reason, retry.detail = "attempt_limit", "the request's upstream attempts are spent"
                return True
            left = limits.time_left()
            if left is not None and left <= 0:
                retry.reason, retry.detail = "deadline", "the request's deadline passed"
                return True
        if not self.breaker.allow():
            if retry.attempts == 0:
                retry.reason = "circuit_open"
                retry.detail = (f"{self.breaker.consecutive} consecutive failures; next probe within "
                                f"{self.config.breaker_reset_s}s")
            return True
        return False

    async def _attempt(self, payload: dict[str, Any], limits: RequestLimits | None,
                       on_delta: Callable[[dict[str, Any]], Awaitable[None]] | None, handed_on: list[bool],
                       retry: "_Retry") -> Answer | None:
        """One attempt, counted against the request's limits and timed out at the lesser of the
        endpoint's timeout and the request's time left: the answer, or None to retry (the failure and
        any Retry-After wait recorded in ``retry``). Raises :class:`BackendError` on a non-retryable
        4xx or a malformed answer, and on a stream that broke after part of it was handed on
        (``stream_broken``, or the chunk's own reason; its ``cost`` then estimates what the provider
        bills for the part received: :func:`partial_cost`)."""
        cfg = self.config
        if limits is not None:
            limits.attempts_left -= 1
        retry.attempts += 1
        timeout = cfg.timeout_s
        left = None if limits is None else limits.time_left()
        if left is not None:
            timeout = max(0.001, min(timeout, left))
        retry.wait = 0.0
        start = time.perf_counter()
        received = _StreamedAnswer()
        try:
            async with asyncio.timeout(timeout) as whole:  # the whole attempt, not each read (module docstring)
                status, retry_after, text, body = await self._exchange(payload, timeout, on_delta, handed_on,
                                                                       retry.attempts, received, whole)
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except BackendError as err:  # a malformed or oversized answer: a verdict on the endpoint too
            self.breaker.failure()
            if handed_on[0]:
                err.cost = partial_cost(payload["messages"], received, cfg.price_in, cfg.price_out)
            raise
        except (httpx.TimeoutException, httpx.TransportError, TimeoutError) as err:
            self.breaker.failure()
            if isinstance(err, TimeoutError):
                retry.reason, retry.detail = "timeout", f"the attempt did not finish within {timeout:.3g}s"
            elif isinstance(err, httpx.TimeoutException):
                retry.reason, retry.detail = "timeout", f"{type(err).__name__} after {timeout:.3g}s"
            else:
                retry.reason, retry.detail = "connection_error", f"{type(err).__name__}: {err}"
            if handed_on[0]:  # part of the answer is already with the client: no retry
                raise BackendError(cfg.name, "stream_broken", retry.detail, retry.attempts,
                                   partial_cost(payload["messages"], received, cfg.price_in, cfg.price_out)) from None
            return None
        except _ClientSinkError as err:  # the client's side failed, not the endpoint: no verdict on it
            self.breaker.abandon()
            raise err.__cause__ from None
        except Exception as err:  # noqa: BLE001 - whatever else reading this answer raised: the answer's fault
            self.breaker.failure()
            cost = partial_cost(payload["messages"], received, cfg.price_in, cfg.price_out) if handed_on[0] else 0.0
            raise BackendError(cfg.name, "bad_response", f"{type(err).__name__}: {err}"[:200], retry.attempts,
                               cost) from None
        latency_ms = (time.perf_counter() - start) * 1000.0
        if status >= 500 or status == 429:
            self.breaker.failure()
            retry.reason, retry.detail = f"http_{status}", text[:200]
            hinted = retry_after_s(retry_after)
            if hinted is not None:
                retry.wait = min(hinted, MAX_RETRY_AFTER_S)
            return None
        self.breaker.success()
        if status >= 400:
            raise rejection(cfg.name, status, text, retry.attempts)
        return self._parse(body, latency_ms, retry.attempts)

    async def _exchange(self, payload: dict[str, Any], timeout: float,
                        on_delta: Callable[[dict[str, Any]], Awaitable[None]] | None, handed_on: list[bool],
                        attempts: int, acc: _StreamedAnswer, whole: asyncio.Timeout
                        ) -> tuple[int, str | None, str, Any]:
        """One HTTP attempt: (status, Retry-After header, error text (first 4,000 chars), body). The
        body is the parsed JSON (:func:`answer_json`), or for a stream the completion rebuilt from its
        chunks in ``acc`` (each delta handed to ``on_delta`` on the way; ``handed_on[0]`` set once one was,
        and the attempt's whole-answer limit ``whole`` lifted then: module docstring).
        Raises :class:`BackendError` ``bad_response`` when the answer is not strict JSON or is larger
        than ``max_response_bytes`` (read no further than that)."""
        cfg = self.config
        async with self._client.stream("POST", cfg.url, json=payload, headers=self._headers(),
                                       timeout=timeout) as response:
            if response.status_code >= 400:
                head = b""
                async for chunk in response.aiter_bytes():
                    head += chunk
                    if len(head) >= ERROR_BODY_BYTES:
                        break
                text = head[:ERROR_BODY_BYTES].decode(errors="replace")[:4000]
                return response.status_code, response.headers.get("retry-after"), text, None
            chunks = self._capped(response, attempts)
            if on_delta is None:
                raw = b"".join([chunk async for chunk in chunks])
                try:
                    return response.status_code, None, "", answer_json(raw)
                except ValueError as err:
                    raise BackendError(cfg.name, "bad_response", f"body is not valid JSON: {err}", attempts) from None
            async for line in _lines(chunks):
                try:
                    event = sse_data(line, answer_json)
                except ValueError as err:
                    raise BackendError(cfg.name, "bad_response", f"bad SSE data: {err}", attempts) from None
                if event is None:
                    continue
                if event == "[DONE]":
                    break
                if "error" in event:
                    raise BackendError(cfg.name, "stream_error", str(event["error"])[:200], attempts)
                try:
                    choices = acc.add(event)
                except ValueError as err:
                    raise BackendError(cfg.name, "bad_response", f"bad stream chunk: {err}", attempts) from None
                for choice in choices:
                    if not handed_on[0]:
                        whole.reschedule(None)
                        handed_on[0] = True
                    try:
                        await on_delta(choice)
                    except Exception as err:
                        raise _ClientSinkError() from err
            return response.status_code, None, "", acc.body()

    async def _capped(self, response: httpx.Response, attempts: int) -> AsyncIterator[bytes]:
        """The answer's (decoded) bytes; :class:`BackendError` ``bad_response`` as soon as they pass
        ``max_response_bytes`` (or at once when ``Content-Length`` says they will)."""
        limit = self.config.max_response_bytes

        def too_large() -> BackendError:
            return BackendError(self.name, "bad_response", f"the answer is larger than max_response_bytes = {limit} "
                                "bytes; it was not read further", attempts)

        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit and not response.headers.get("content-encoding"):
            raise too_large()
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise too_large()
            yield chunk


_SSE_LINE_END = re.compile(r"\r\n|\r|\n")


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The lines of an event stream (UTF-8, invalid bytes replaced), ended by CRLF, CR or LF as the
    SSE format defines them, whatever the chunk boundaries (a CR at a chunk's end waits for the next
    chunk, which may start with its LF; a character's bytes may be cut in two). Not split at the
    other separators ``str.splitlines`` knows (U+0085, U+2028, ...), which JSON may carry unescaped."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []  # the unfinished line so far
    held_cr = False
    async for chunk in chunks:
        text = ("\r" if held_cr else "") + decoder.decode(chunk)
        held_cr = text.endswith("\r")
        if held_cr:
            text = text[:-1]
        pieces = _SSE_LINE_END.split(text)
        if len(pieces) > 1:  # the unfinished line ends in this text, maybe followed by whole lines
            pieces[0] = "".join(parts) + pieces[0]
            parts = []
            for line in pieces[:-1]:
                yield line
        if pieces[-1]:
            parts.append(pieces[-1])
    rest = "".join(parts) + decoder.decode(b"", final=True)
    if rest or held_cr:
        yield rest


class ShardedClient:
    """``post`` / ``stream`` of several ``httpx.AsyncClient`` connection pools, taken in turn.

    httpcore's pool compares every waiting request with every pooled connection on each request
    and each response, so one pool of C connections costs O(C) CPU per call; K pools of C / K
    connections each cut that K-fold and hold the same connections in all
    (``benchmarks/load_test.py`` reports the server's CPU per request).
    """

    def __init__(self, clients: list[httpx.AsyncClient]) -> None:
        if not clients:
            raise ValueError("ShardedClient needs at least one client")
        self.clients = clients
        self._turn = 0

    def _next(self) -> httpx.AsyncClient:
        self._turn = (self._turn + 1) % len(self.clients)
        return self.clients[self._turn]

    def post(self, *args: Any, **kwargs: Any) -> Awaitable[httpx.Response]:
        return self._next().post(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any):
        return self._next().stream(*args, **kwargs)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def pooled_client(max_connections: int = 512, connection_pools: int = 8) -> ShardedClient:
    """``connection_pools`` HTTP clients holding ``max_connections`` connections between them.

    Each keeps idle connections for 2 s, below the usual 5 s server keep-alive: a pooled connection
    is dropped by us before the endpoint closes it, so a request is never written to a closing socket.
    """
    if max_connections < 1 or not 1 <= connection_pools <= max_connections:
        raise ValueError(f"need max_connections >= 1 and 1 <= connection_pools <= max_connections, "
                         f"got {max_connections} and {connection_pools}")
    per_pool = -(-max_connections // connection_pools)
    return ShardedClient([
        httpx.AsyncClient(limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool,
                                              keepalive_expiry=2.0))
        for _ in range(connection_pools)
    ])


class BackendPool:
    """The backends of all models, sharing one HTTP client (by default :func:`pooled_client`).
    Use as an async context manager."""

    def __init__(
        self,
        configs: Mapping[str, BackendConfig],
        client: httpx.AsyncClient | ShardedClient | None = None,
        max_connections: int = 512,
        connection_pools: int = 8,
    ) -> None:
        if not configs:
            raise BackendConfigError("no backends configured")
        self.configs = dict(configs)
        self._owns_client = client is None
        self._client = client or pooled_client(max_connections, connection_pools)
        self.backends = {name: Backend(cfg, self._client) for name, cfg in self.configs.items()}

    @classmethod
    def from_yaml(cls, path: "str | os.PathLike[str]", **kwargs: Any) -> "BackendPool":
        return cls(load_backend_configs(path), **kwargs)

    def __contains__(self, model: str) -> bool:
        return model in self.backends

    def __getitem__(self, model: str) -> Backend:
        try:
            return self.backends[model]
        except KeyError:
            raise KeyError(f"no backend configured for model {model!r}; have {sorted(self.backends)}") from None

    async def complete(self, model: str, messages: list[dict[str, Any]], **params: Any) -> Answer:
        return await self[model].complete(messages, **params)

    async def stream(self, model: str, messages: list[dict[str, Any]],
                     on_delta: Callable[[dict[str, Any]], Awaitable[None]], **params: Any) -> Answer:
        return await self[model].stream(messages, on_delta, **params)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> "BackendPool":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
