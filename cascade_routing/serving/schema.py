"""Request and response schema of the OpenAI-compatible server (pydantic v2 models).

:func:`parse_chat_request` turns the raw body into a :class:`ChatCompletionRequest` or raises
:class:`RequestError` (HTTP status, message naming the field, ``param`` = the field's dotted path):

1. the bytes must be UTF-8 JSON whose top level is an object (400 ``malformed JSON`` otherwise,
   also for an integer literal longer than Python's 4,300-digit conversion limit);
2. every string anywhere in the body, object keys included, must be encodable as UTF-8 (a lone
   surrogate such as ``"\\ud800"`` is rejected, naming its path, e.g. ``messages[0].content``; a
   bad key appears in the path escaped, e.g. ``metadata.\\ud800``) and every number
   finite (``NaN`` / ``Infinity``, which Python's JSON reader accepts, are rejected the same way);
3. the fields are validated by :class:`ChatCompletionRequest` (types, ranges, unknown fields are
   rejected: ``extra="forbid"``); the first error becomes the message. Types are strict, as in
   OpenAI's API: a boolean must be ``true``/``false`` (not ``"yes"`` or ``1``), an integer a JSON
   integer (not ``5.0`` or ``"5"``), a number a JSON number (an integer is accepted), never a string;
4. the last user message must have non-empty text (the query the estimators see).

Every OpenAI chat parameter is a field: forwarded to the backends (``FORWARDED``, the table in
:mod:`cascade_routing.serving.params`), read by the server, or refused with 400 naming it
(:meth:`ChatCompletionRequest.unsupported`). Adding one: declare the field and, if the backends
should receive it, add its name to ``params.FORWARDED``; :meth:`ChatCompletionRequest.
forwarded_params` then passes it on exactly as the client set it.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from cascade_routing.serving.params import FORWARDED as FORWARDED_PARAMS
from cascade_routing.serving.params import REJECTED


MAX_OUTPUT_TOKENS = 2**31 - 1
"""The largest ``max_tokens`` / ``max_completion_tokens`` accepted (a 32-bit count, far above any
model's output limit): larger values get 400 naming the field instead of an unbounded spend reservation."""


class RequestError(Exception):
    """A request the server refuses before doing any work: ``status``, ``message``, ``param``, ``code``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.headers = dict(headers or {})


class RoutingOptions(BaseModel):
    """The ``routing`` extension: ``budget`` (USD per query; can only LOWER the caller's cap) and
    ``task`` (the query's task label, for estimators trained with tasks)."""

    model_config = ConfigDict(extra="forbid")

    budget: StrictFloat | None = Field(default=None, ge=0, allow_inf_nan=False)
    task: str | None = None


class ChatMessage(BaseModel):
    """One chat message. ``content`` is a string, a list of content parts (``{"type": "text",
    "text": ...}``, images, ...) or null (e.g. an assistant message with tool calls). Other keys
    (``name``, ``tool_calls``, ``tool_call_id``) are kept and forwarded as given."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None

    def text(self) -> str | None:
        """The message's text: the string content, or its text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            parts = [p.get("text") for p in self.content if p.get("type") == "text"]
            parts = [p for p in parts if isinstance(p, str)]
            return "\n".join(parts) if parts else None
        return None


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the request's usage."""

    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    """``response_format``: forwarded as given; only its ``type`` is checked here."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body. Unknown fields are a 400 naming the field."""

    model_config = ConfigDict(extra="forbid")

    FORWARDED: ClassVar[tuple[str, ...]] = FORWARDED_PARAMS
    """Fields sent on to every backend (when the client set them)."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, StrictFloat] | None = None
    n: StrictInt | None = Field(default=None, ge=1, le=128)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # refused by unsupported() (declared so the 400 says why, not just "unknown field")
    audio: Any = None
    modalities: list[str] | None = None
    web_search_options: Any = None
    routing: RoutingOptions | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, why) for the first parameter set that the server refuses, else None."""
        for name, why in REJECTED.items():
            if name in self.model_fields_set and getattr(self, name) is not None:
                if name == "modalities" and self.modalities == ["text"]:
                    continue
                return name, why
        if self.stream_options is not None and not self.stream:
            return "stream_options", "'stream_options' is only allowed with stream: true"
        return None

    def forwarded_params(self) -> dict[str, Any]:
        """The parameters for the backends: the ``FORWARDED`` fields the client set (not null)."""
        return self.model_dump(include=set(self.FORWARDED), exclude_unset=True, exclude_none=True)

    def messages_payload(self) -> list[dict[str, Any]]:
        """The messages as plain dicts for the backends (unset optional keys left out)."""
        return [m.model_dump(exclude_unset=True) for m in self.messages]

    def query(self) -> str | None:
        """The text of the LAST user message (what the estimators see), or None."""
        for msg in reversed(self.messages):
            if msg.role == "user":
                return msg.text() or None
        return None

    def prompt_chars(self) -> int:
        """Characters of text over all messages (the prompt-length limit counts these)."""
        return sum(len(m.text() or "") for m in self.messages)


def printable(text: str) -> str:
    """``text`` with every lone surrogate written as its escape (``"\\ud800"``), so it can be put in
    an error message and encoded as UTF-8; valid text is returned unchanged."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_safe(value: Any) -> Any:
    """``value`` (decoded JSON: dicts, lists, scalars) with every non-finite number replaced by null
    and every string and key made valid Unicode (:func:`printable`): what a response renders when its
    content would otherwise not be strict JSON (the server never sends ``NaN`` or a lone surrogate)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {printable(k) if isinstance(k, str) else k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def strict_json(value: Any, separators: tuple[str, str] = (",", ":")) -> bytes:
    """``value`` as compact UTF-8 JSON (as Starlette's ``JSONResponse`` renders it) with no ``NaN`` /
    ``Infinity`` and valid Unicode throughout (values that have either are rendered through
    :func:`json_safe`); other types raise ``TypeError``."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=separators).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False,
                          separators=separators).encode("utf-8")


def loads_checked(raw: bytes | str) -> tuple[Any, tuple[str, str] | None]:
    """``(value, problem)``: the decoded JSON and :func:`find_invalid_value` of it (None when it is
    strict JSON). ``ValueError`` when it is not JSON at all, or ``"nested too deeply"`` to decode or
    check (the request body and the backends' answers are read this one way)."""
    try:
        value = json.loads(raw)
        return value, find_invalid_value(value)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def find_invalid_value(value: Any, path: str = "") -> tuple[str, str] | None:
    """(path, problem) of the first string that is not valid Unicode (lone surrogate) or number
    that is not finite, anywhere in a decoded JSON value (object keys included); None if all are
    fine. The path is always valid Unicode: an invalid key appears in it escaped (:func:`printable`)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return path, f"contains an invalid Unicode code point (lone surrogate) at position {err.start}"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, f"must be a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            name = printable(str(key))
            where = f"{path}.{name}" if path else name
            if isinstance(key, str) and find_invalid_value(key) is not None:
                return where, "the key contains an invalid Unicode code point (lone surrogate)"
            found = find_invalid_value(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_invalid_value(item, f"{path}[{i}]")
            if found:
                return found
    return None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[dict[str,any]]", "function-after", "none") or "[" in str(part):
            continue  # union-branch labels pydantic adds to the location
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_message(err: ValidationError) -> tuple[str, str]:
    """(message, param) for the first error of a pydantic ``ValidationError``."""
    first = err.errors()[0]
    param = _loc(tuple(first["loc"]))
    if first["type"] == "missing":
        return f"'{param}' is required", param
    if first["type"] == "extra_forbidden":
        return f"unknown field '{param}'", param
    shown = repr(first.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"invalid '{param}': {first['msg']} (got {shown})", param


def parse_chat_request(raw: bytes, request_model: type[ChatCompletionRequest] = ChatCompletionRequest
                       ) -> ChatCompletionRequest:
    """Validate a raw request body (see module docstring); raises :class:`RequestError`."""
    try:
        body, bad = loads_checked(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, a 4,300-digit integer, too deep
        raise RequestError(f"malformed JSON body: {err}") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    if bad is not None:
        raise RequestError(f"invalid '{bad[0]}': {bad[1]}", bad[0])
    try:
        request = request_model.model_validate(body)
    except ValidationError as err:
        message, param = validation_message(err)
        raise RequestError(message, param) from None
    if request.query() is None:
        raise RequestError("'messages' must contain a user message with non-empty text", "messages")
    return request


class ErrorBody(BaseModel):
    """OpenAI's error object; the server may add keys (``failures``, ``request_id``, ``spent``)."""

    model_config = ConfigDict(extra="allow")

    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class AssistantMessage(BaseModel):
    """The answer message as the selected backend gave it (``tool_calls`` etc. kept)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["assistant"] = "assistant"
    content: str | None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: Any = None
    finish_reason: str = "stop"


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionResponse(BaseModel):
    """A standard ``chat.completion`` plus ``routing`` (models run, costs, per-step estimates)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    routing: dict[str, Any]
