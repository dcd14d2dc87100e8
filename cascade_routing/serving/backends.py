"""OpenAI-compatible chat-completions backends, one per model, configured from a YAML file.

YAML layout (see ``configs/backends.example.yaml``)::

    defaults:                 # optional; every key may be overridden per model
      timeout_s: 60           # per attempt (connect + read)
      max_retries: 2          # extra attempts after the first, on 5xx / 429 / timeout / connection error
      backoff_s: 0.5          # wait before retry k (k = 0, 1, ...): backoff_s * 2**k * U(0.5, 1.5), or the
                              # endpoint's Retry-After (seconds) when it is longer (capped at 60 s)
      breaker_failures: 5     # circuit breaker: open after this many consecutive failed attempts
      breaker_reset_s: 10     # ... stay open this long, then let ONE probe through (half-open)
      max_concurrency: 32     # requests in flight to this model at once (an asyncio semaphore)
      logprobs: false         # ask the endpoint for token log-probs (feature ``logprob_confidence``)
    models:
      - name: gpt-4o-mini                     # the model's name in the checkpoint / router
        base_url: https://api.openai.com/v1   # POST {base_url}/chat/completions
        model_id: gpt-4o-mini                 # the ``model`` field sent to the endpoint
        api_key_env: OPENAI_API_KEY           # name of the env var holding the key (optional)
        price_per_1m_input_tokens: 0.15       # USD; or price_per_input_token
        price_per_1m_output_tokens: 0.60      # USD; or price_per_output_token

Cost of one answer (USD) = ``prompt_tokens * price_in + completion_tokens * price_out`` from the
endpoint's real ``usage``. A backend configured with ``trust_reported_cost: true`` (the replay
backend writes this) takes the cost from the response's ``x_cost_usd`` field instead when present.
``usage`` must be an object (or absent / null: no tokens) whose ``prompt_tokens`` and
``completion_tokens`` (each optional) are integers in [0, 2**53]; a reported ``x_cost_usd`` must be a
finite number >= 0. Anything else (a negative or fractional count, a string, a list, Infinity) is
that backend's failure: :class:`BackendError` with reason ``bad_response`` naming the field, handled
like any failed call (the router tries another model). A streamed answer's chunks are checked the
same way (``choices[].index`` and tool calls' ``index`` non-negative integers, ``delta`` an object).

A non-retryable 4xx that the request itself may have caused (400, 413, 422; not a 400 whose error
``code`` is ``context_length_exceeded``, which is the model's own limit) raises
:class:`RequestRejectedError`. The router still tries the other models (one provider may refuse what
another accepts); when every model it tried refused, the server returns the first refusal's status
to the client instead of a 502. Other 4xx (401, 403, 404, ...: the endpoint's configuration) are
ordinary failures.

Features of an answer (the names used project-wide): ``tokens_in``, ``tokens_out``, ``latency_ms``
(wall time of the successful attempt) and, when the endpoint returns log-probs,
``logprob_confidence`` = the mean token log-probability of the answer (for a one-token answer, the
answer token's log-prob: the definition of the rational-llm-cascades data). A response may carry
``x_recorded_features`` (the replay backend does): those values override the measured ones, so a
replay reproduces the recorded dataset exactly.

Per-request limits (set by the server through :data:`REQUEST_LIMITS`, a context variable, so
every backend call made for one request shares them): a total number of HTTP attempts over all
models and retries, and a deadline; a call never starts an attempt, nor sleeps before a retry,
past the deadline, and each attempt's timeout is cut to the time left.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import httpx
import yaml

from cascade_routing.serving.streaming import sse_data

FEATURE_NAMES = ("tokens_in", "tokens_out", "latency_ms", "logprob_confidence")


class BackendConfigError(ValueError):
    """The backends YAML is malformed; the message names the file, model and field."""


class BackendError(RuntimeError):
    """A backend could not produce an answer (after retries); ``reason`` is a short code."""

    def __init__(self, model: str, reason: str, detail: str, attempts: int) -> None:
        super().__init__(f"backend {model!r} failed ({reason}) after {attempts} attempt(s): {detail}")
        self.model = model
        self.reason = reason
        self.detail = detail
        self.attempts = attempts


REQUEST_CAUSED_STATUSES = frozenset({400, 413, 422})
"""HTTP statuses of an endpoint that refuse the request itself (:class:`RequestRejectedError`)."""


class RequestRejectedError(BackendError):
    """The endpoint refused the request itself (HTTP 400/413/422, see the module docstring). When every
    model tried refused, the client gets ``status`` with the first endpoint's ``message``, ``param``
    and ``code`` (OpenAI's error fields, None where the body had none)."""

    def __init__(self, model: str, status: int, detail: str, attempts: int, message: str,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(model, f"http_{status}", detail, attempts)
        self.status, self.message, self.param, self.code = status, message, param, code


def _upstream_error(text: str) -> tuple[str | None, str | None, str | None]:
    """(message, param, code) of an OpenAI-shaped error body ``{"error": {...}}``; None where absent."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError, RecursionError):
        return None, None, None
    if not isinstance(error, Mapping):
        return (error if isinstance(error, str) else None), None, None
    return tuple(v if isinstance(v, str) else None  # type: ignore[return-value]
                 for v in (error.get("message"), error.get("param"), error.get("code")))


def rejection(model: str, status: int, text: str, attempts: int) -> BackendError:
    """The error of a non-retryable 4xx answer ``text``: :class:`RequestRejectedError` when the
    request caused it (module docstring), else a plain :class:`BackendError` (``http_<status>``)."""
    message, param, code = _upstream_error(text)
    if status not in REQUEST_CAUSED_STATUSES or code == "context_length_exceeded":
        return BackendError(model, f"http_{status}", text[:200], attempts)
    return RequestRejectedError(model, status, text[:200], attempts, message or text[:200] or f"HTTP {status}",
                                param, code)


MAX_TOKENS = 2**53
"""The largest token count a ``usage`` field may hold (every count up to it is an exact float)."""


def _token_count(usage: Mapping[str, Any], name: str) -> int | None:
    """``usage[name]`` as an int (absent / null: 0), or None if it is not an integer in [0, MAX_TOKENS]."""
    value = usage.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if 0 <= value <= MAX_TOKENS else None


def parse_usage(usage: Any) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a response's ``usage`` (see the module docstring);
    raises ValueError naming the field when it is not a valid usage object."""
    if usage is None:
        return 0, 0
    if not isinstance(usage, Mapping):
        raise ValueError(f"usage must be an object, got {type(usage).__name__}")
    counts = []
    for name in ("prompt_tokens", "completion_tokens"):
        count = _token_count(usage, name)
        if count is None:
            raise ValueError(f"usage.{name} must be an integer in [0, 2**53], got {usage.get(name)!r}")
        counts.append(count)
    return counts[0], counts[1]


@dataclass
class RequestLimits:
    """Shared by every backend call of one request: attempts left and the deadline (``time.monotonic``)."""

    attempts_left: int
    deadline: float | None = None

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


REQUEST_LIMITS: contextvars.ContextVar[RequestLimits | None] = contextvars.ContextVar("request_limits", default=None)

MAX_RETRY_AFTER_S = 60.0
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
class Answer:
    """One model's answer to one query, with its real cost and the features the estimators read."""

    model: str
    text: str
    cost: float
    features: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    latency_ms: float = 0.0
    attempts: int = 1
    raw: dict[str, Any] | None = None


@dataclass(frozen=True)
class BackendConfig:
    """One model's endpoint. Prices are USD per token."""

    name: str
    base_url: str
    model_id: str
    price_in: float
    price_out: float
    api_key_env: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 2
    backoff_s: float = 0.5
    max_concurrency: int = 32
    logprobs: bool = False
    trust_reported_cost: bool = False
    breaker_failures: int = 5
    breaker_reset_s: float = 10.0
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


_DEFAULTS: dict[str, Any] = {
    "timeout_s": 60.0,
    "max_retries": 2,
    "backoff_s": 0.5,
    "max_concurrency": 32,
    "logprobs": False,
    "trust_reported_cost": False,
    "breaker_failures": 5,
    "breaker_reset_s": 10.0,
}
_KNOWN = {
    "name", "base_url", "model_id", "api_key_env", "price_per_input_token", "price_per_output_token",
    "price_per_1m_input_tokens", "price_per_1m_output_tokens", "extra_body", *_DEFAULTS,
}


def _price(entry: Mapping[str, Any], kind: str, where: str) -> float:
    per_token = entry.get(f"price_per_{kind}_token")
    per_million = entry.get(f"price_per_1m_{kind}_tokens")
    if (per_token is None) == (per_million is None):
        raise BackendConfigError(
            f"{where}: give exactly one of price_per_{kind}_token or price_per_1m_{kind}_tokens"
        )
    value = per_token if per_token is not None else per_million
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise BackendConfigError(f"{where}: {kind} price {value!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise BackendConfigError(f"{where}: {kind} price must be a finite number >= 0, got {value}")
    return value if per_token is not None else value / 1e6


def _defaults(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The settings every model starts from: :data:`_DEFAULTS` updated by the document's ``defaults``."""
    defaults = dict(_DEFAULTS)
    user_defaults = data.get("defaults") or {}
    if not isinstance(user_defaults, Mapping):
        raise BackendConfigError(f"{source}: 'defaults' must be a mapping")
    unknown = set(user_defaults) - set(_DEFAULTS)
    if unknown:
        raise BackendConfigError(f"{source}: unknown key(s) in defaults: {sorted(unknown)}")
    defaults.update(user_defaults)
    return defaults


def _model_config(entry: Any, source: str, i: int, defaults: Mapping[str, Any], taken: Mapping[str, Any]
                  ) -> BackendConfig:
    """Entry ``i`` of ``models`` validated (name not in ``taken``, known keys, http(s) URL, numeric
    settings in range, prices) into a :class:`BackendConfig`; errors name ``source`` and the entry."""
    where = f"{source}: models[{i}]"
    if not isinstance(entry, Mapping):
        raise BackendConfigError(f"{where}: expected a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise BackendConfigError(f"{where}: 'name' must be a non-empty string")
    where = f"{source}: model {name!r}"
    unknown = set(entry) - _KNOWN
    if unknown:
        raise BackendConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    if name in taken:
        raise BackendConfigError(f"{where}: duplicate model name")
    base_url = entry.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise BackendConfigError(f"{where}: 'base_url' must be an http(s) URL, got {base_url!r}")
    settings = {k: entry.get(k, defaults[k]) for k in _DEFAULTS}
    try:
        timeout_s = float(settings["timeout_s"])
        max_retries = int(settings["max_retries"])
        backoff_s = float(settings["backoff_s"])
        max_concurrency = int(settings["max_concurrency"])
        breaker_failures = int(settings["breaker_failures"])
        breaker_reset_s = float(settings["breaker_reset_s"])
    except (TypeError, ValueError) as err:
        raise BackendConfigError(f"{where}: bad numeric setting: {err}") from None
    if (timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_concurrency < 1 or breaker_failures < 1
            or breaker_reset_s < 0):
        raise BackendConfigError(
            f"{where}: need timeout_s > 0, max_retries >= 0, backoff_s >= 0, max_concurrency >= 1, "
            "breaker_failures >= 1, breaker_reset_s >= 0"
        )
    return BackendConfig(
        name=name,
        base_url=base_url,
        model_id=str(entry.get("model_id", name)),
        price_in=_price(entry, "input", where),
        price_out=_price(entry, "output", where),
        api_key_env=entry.get("api_key_env"),
        timeout_s=timeout_s,
        max_retries=max_retries,
        backoff_s=backoff_s,
        max_concurrency=max_concurrency,
        logprobs=bool(settings["logprobs"]),
        trust_reported_cost=bool(settings["trust_reported_cost"]),
        breaker_failures=breaker_failures,
        breaker_reset_s=breaker_reset_s,
        extra_body=dict(entry.get("extra_body") or {}),
    )


def parse_backends(data: Any, source: str = "<backends>") -> dict[str, BackendConfig]:
    """Validate a parsed backends document (see module docstring); returns name -> config."""
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), list) or not data["models"]:
        raise BackendConfigError(f"{source}: expected a mapping with a non-empty list 'models'")
    defaults = _defaults(data, source)
    configs: dict[str, BackendConfig] = {}
    for i, entry in enumerate(data["models"]):
        config = _model_config(entry, source, i, defaults, configs)
        configs[config.name] = config
    return configs


def load_backend_configs(path: "str | os.PathLike[str]") -> dict[str, BackendConfig]:
    """Read and validate a backends YAML file (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backends file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BackendConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_backends(data, source=str(path))


def _logprob_confidence(choice: Mapping[str, Any]) -> float | None:
    """Mean token log-prob of the answer, from OpenAI's ``choices[0].logprobs.content``."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping):
        return None
    content = logprobs.get("content")
    if not isinstance(content, list) or not content:
        return None
    values = [tok.get("logprob") for tok in content if isinstance(tok, Mapping)]
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return None
    return sum(values) / len(values)


def answer_text(message: Any) -> str | None:
    """The text of an answer message that the estimators read: its string ``content``, followed by
    one line ``tool_call NAME ARGUMENTS`` per tool call (a tool-call answer is still an answer);
    None if the message has neither."""
    if not isinstance(message, Mapping):
        return None
    content = message.get("content")
    calls = message.get("tool_calls") or []
    if not isinstance(content, str) and not (isinstance(calls, list) and calls):
        return None
    lines = [content] if isinstance(content, str) and content else []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            lines.append(f"tool_call {function.get('name')} {function.get('arguments')}")
    return "\n".join(lines)


class _StreamedAnswer:
    """Rebuilds a ``chat.completion`` body from the chunks of a streamed one (content and
    tool-call fragments joined per choice, usage and the replay's ``x_*`` fields kept)."""

    def __init__(self) -> None:
        self.choices: dict[int, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}

    def add(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Fold one chunk in; returns its choices that carry new content or tool calls. Raises
        ValueError naming the field of a malformed chunk (``choices`` not a list, an ``index`` that is
        not a non-negative integer, a ``delta``, tool call or ``function`` that is not an object)."""
        for key in ("usage", "x_cost_usd", "x_recorded_features", "id", "model"):
            if event.get(key) is not None:
                self.extra[key] = event[key]
        choices = event.get("choices") or []
        if not isinstance(choices, list):
            raise ValueError(f"choices must be a list, got {type(choices).__name__}")
        new = []
        for choice in choices:
            if not isinstance(choice, Mapping):
                continue
            index = _index(choice, "choices[].index")
            acc = self.choices.setdefault(index, {"index": index, "content": [], "tool_calls": {},
                                                  "logprobs": [], "finish_reason": None})
            delta = choice.get("delta") or {}
            if not isinstance(delta, Mapping):
                raise ValueError(f"choices[{index}].delta must be an object, got {type(delta).__name__}")
            if choice.get("finish_reason"):
                acc["finish_reason"] = choice["finish_reason"]
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, Mapping) and isinstance(logprobs.get("content"), list):
                acc["logprobs"].extend(logprobs["content"])
            content = delta.get("content")
            calls = delta.get("tool_calls")
            if isinstance(content, str) and content:
                acc["content"].append(content)
            for call in calls if isinstance(calls, list) else []:
                if not isinstance(call, Mapping):
                    raise ValueError(f"choices[{index}].delta.tool_calls[] must be objects")
                slot = acc["tool_calls"].setdefault(_index(call, "tool_calls[].index"),
                                                    {"id": None, "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
                slot["id"] = call.get("id") or slot["id"]
                fn = call.get("function") or {}
                if not isinstance(fn, Mapping):
                    raise ValueError(f"choices[{index}].delta.tool_calls[].function must be an object")
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            if (isinstance(content, str) and content) or calls:
                new.append({"index": index, "delta": {k: v for k, v in delta.items() if k != "role"},
                            "logprobs": logprobs})
        return new

    def body(self) -> dict[str, Any]:
        choices = []
        for index, acc in sorted(self.choices.items()):
            message: dict[str, Any] = {"role": "assistant",
                                       "content": "".join(acc["content"]) if acc["content"] or not acc["tool_calls"]
                                       else None}
            if acc["tool_calls"]:
                message["tool_calls"] = [acc["tool_calls"][k] for k in sorted(acc["tool_calls"])]
            choices.append({"index": index, "message": message, "finish_reason": acc["finish_reason"] or "stop",
                            "logprobs": {"content": acc["logprobs"]} if acc["logprobs"] else None})
        return {"object": "chat.completion", "choices": choices, **self.extra}


def _index(item: Mapping[str, Any], where: str) -> int:
    """``item["index"]`` (default 0), which must be a non-negative integer (ValueError naming ``where``)."""
    index = item.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"{where} must be a non-negative integer, got {index!r}")
    return index


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
        4xx, and on a stream that broke after part of it was handed on (``stream_broken``)."""
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
        try:
            status, retry_after, text, body = await self._exchange(payload, timeout, on_delta, handed_on,
                                                                   retry.attempts)
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except (httpx.TimeoutException, httpx.TransportError) as err:
            self.breaker.failure()
            if isinstance(err, httpx.TimeoutException):
                retry.reason, retry.detail = "timeout", f"{type(err).__name__} after {timeout:.3g}s"
            else:
                retry.reason, retry.detail = "connection_error", f"{type(err).__name__}: {err}"
            if handed_on[0]:  # part of the answer is already with the client: no retry
                raise BackendError(cfg.name, "stream_broken", retry.detail, retry.attempts) from None
            return None
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
                        attempts: int) -> tuple[int, str | None, str, Any]:
        """One HTTP attempt: (status, Retry-After header, error text (first 4,000 chars), body). The
        body is the parsed JSON, or for a stream the completion rebuilt from its chunks (each
        delta handed to ``on_delta`` on the way; ``handed_on[0]`` set once one was)."""
        cfg = self.config
        if on_delta is None:
            response = await self._client.post(cfg.url, json=payload, headers=self._headers(), timeout=timeout)
            if response.status_code >= 400:
                return response.status_code, response.headers.get("retry-after"), response.text[:4000], None
            try:
                return response.status_code, None, "", response.json()
            except ValueError:
                raise BackendError(cfg.name, "bad_response", "body is not JSON", attempts) from None
        async with self._client.stream("POST", cfg.url, json=payload, headers=self._headers(),
                                       timeout=timeout) as response:
            if response.status_code >= 400:
                text = (await response.aread()).decode(errors="replace")[:4000]
                return response.status_code, response.headers.get("retry-after"), text, None
            acc = _StreamedAnswer()
            async for line in response.aiter_lines():
                try:
                    event = sse_data(line)
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
                    handed_on[0] = True
                    await on_delta(choice)
            return response.status_code, None, "", acc.body()


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
