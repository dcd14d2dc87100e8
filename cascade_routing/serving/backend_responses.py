"""What a backend answered: the answer, its cost and features, and the errors of a failed call.

Cost of one answer (USD) = ``prompt_tokens * price_in + completion_tokens * price_out`` from the
endpoint's real ``usage``. A backend configured with ``trust_reported_cost: true`` (the replay
backend writes this) takes the cost from the response's ``x_cost_usd`` field instead when present.
``usage`` must be an object (or absent / null: no tokens) whose ``prompt_tokens`` and
``completion_tokens`` (each optional) are integers in [0, 2**53]; a reported ``x_cost_usd`` must be a
finite number >= 0. Anything else (a negative or fractional count, a string, a list, Infinity) is
that backend's failure: :class:`BackendError` with reason ``bad_response`` naming the field, handled
like any failed call (the router tries another model). So is an answer body that is not strict
JSON (:func:`answer_json`: ``NaN`` / ``Infinity`` anywhere, a string or key with a lone surrogate
such as ``"\\ud800"``), a choice whose ``message`` is not an object or whose ``content`` is neither
a string nor null, and a body over the endpoint's ``max_response_bytes``. A streamed answer's
chunks are checked the same way (each chunk strict JSON; ``choices[].index`` and tool calls'
``index`` non-negative integers, ``delta`` an object).

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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from cascade_routing.serving.schema import loads_checked, printable

FEATURE_NAMES = ("tokens_in", "tokens_out", "latency_ms", "logprob_confidence")


class BackendError(RuntimeError):
    """A backend could not produce an answer (after retries); ``reason`` is a short code. ``cost``:
    what the failed call is estimated to have cost anyway (USD; :func:`partial_cost` of a stream
    that broke after part of its answer arrived, which the provider bills), else 0."""

    def __init__(self, model: str, reason: str, detail: str, attempts: int, cost: float = 0.0) -> None:
        super().__init__(f"backend {model!r} failed ({reason}) after {attempts} attempt(s): {detail}")
        self.model = model
        self.reason = reason
        self.detail = detail
        self.attempts = attempts
        self.cost = cost


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
        return (printable(error) if isinstance(error, str) else None), None, None
    return tuple(printable(v) if isinstance(v, str) else None  # type: ignore[return-value]
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


CHARS_PER_TOKEN = 4
"""Characters per token where no ``usage`` says (the data layer's estimate, ``ceil(chars / 4)``)."""


def partial_cost(messages: Any, received: "_StreamedAnswer", price_in: float, price_out: float) -> float:
    """Estimated USD of a stream that broke after part of its answer arrived (the provider bills the
    prompt and the tokens it sent): the stream's ``usage`` if it had come, else the prompt's tokens
    as ``ceil(chars / 4)`` of the messages' JSON and the output's as ``ceil(chars / 4)`` of the
    content and tool-call text received."""
    try:
        tokens_in, tokens_out = parse_usage(received.extra.get("usage"))
    except ValueError:
        tokens_in = tokens_out = 0
    if not tokens_in and not tokens_out:
        sent = json.dumps(messages, ensure_ascii=False)
        chars = sum(len(piece) for acc in received.choices.values() for piece in acc["content"])
        chars += sum(len(call["function"]["name"]) + len(call["function"]["arguments"])
                     for acc in received.choices.values() for call in acc["tool_calls"].values())
        tokens_in, tokens_out = -(-len(sent) // CHARS_PER_TOKEN), -(-chars // CHARS_PER_TOKEN)
    return float(tokens_in * price_in + tokens_out * price_out)


def answer_json(raw: bytes | str) -> Any:
    """The parsed JSON of an answer body or stream chunk. Raises ValueError naming the problem when
    it is not strict JSON: malformed, nested too deeply, a ``NaN`` / ``Infinity`` (which Python's
    reader accepts) or a string or key with a lone surrogate (a valid escape, but no Unicode text),
    naming its path (e.g. ``choices[0].logprobs.content[0].logprob``)."""
    value, bad = loads_checked(raw)
    if bad is not None:
        raise ValueError(f"{bad[0] or 'the body'} {bad[1]}")
    return value


def check_choices(choices: Any) -> None:
    """Every choice of a ``chat.completion`` is an object with a ``message`` object whose ``content``
    (if present) is a string or null; ValueError naming the first that is not."""
    for k, choice in enumerate(choices if isinstance(choices, list) else []):
        message = choice.get("message") if isinstance(choice, Mapping) else None
        if not isinstance(message, Mapping):
            raise ValueError(f"choices[{k}].message must be an object")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"choices[{k}].message.content must be a string or null, got {type(content).__name__}")


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
                for part in ("name", "arguments"):
                    piece = fn.get(part) or ""
                    if not isinstance(piece, str):
                        raise ValueError(f"choices[{index}].delta.tool_calls[].function.{part} must be a string")
                    slot["function"][part] += piece
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
