"""Server-sent events in OpenAI's ``chat.completion.chunk`` format.

A streamed answer is a sequence of ``data: <json>\\n\\n`` events ending with ``data: [DONE]\\n\\n``.
Every chunk has ``id``, ``object: "chat.completion.chunk"``, ``created``, ``model`` and
``choices: [{"index", "delta", "logprobs", "finish_reason"}]``:

- the first chunk of a choice carries ``delta: {"role": "assistant", "content": ""}``;
- content arrives as ``delta: {"content": "..."}`` pieces, tool calls as ``delta: {"tool_calls":
  [{"index", "id", "type": "function", "function": {"name", "arguments"}}]}``;
- the choice's last chunk has ``delta: {}`` and its ``finish_reason``;
- with ``stream_options: {"include_usage": true}`` every chunk has ``usage: null`` and one more chunk
  with ``choices: []`` and the request's ``usage`` precedes ``[DONE]``.

cascade-routing adds ``routing`` (the trace, as in a non-streamed body) to the LAST chunk before
``[DONE]``. An error after the stream started is one ``data: {"error": {...}}`` event (the
``openai`` client raises ``APIError`` on it), then ``[DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Iterator

from cascade_routing.serving.schema import strict_json

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``event`` as compact, strict JSON (a non-finite number goes out
    as null, a lone surrogate escaped: :func:`~cascade_routing.serving.schema.strict_json`)."""
    return b"data: " + strict_json(event) + b"\n\n"


def split_text(text: str, piece_chars: int = 16) -> list[str]:
    """``text`` cut into pieces of at most ``piece_chars`` characters (at least one piece, maybe "")."""
    if piece_chars < 1:
        raise ValueError(f"piece_chars must be >= 1, got {piece_chars}")
    return [text[i:i + piece_chars] for i in range(0, len(text), piece_chars)] or [""]


class ChunkWriter:
    """Builds the chunks of one streamed completion (see module docstring)."""

    def __init__(self, model: str, include_usage: bool = False, completion_id: str | None = None,
                 created: int | None = None) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = completion_id or f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time()) if created is None else created

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.model, "choices": choices}
        if self.include_usage:
            out["usage"] = None
        out.update(extra)
        return out

    def delta(self, delta: dict[str, Any], index: int = 0, finish_reason: str | None = None,
              logprobs: Any = None) -> dict[str, Any]:
        return self.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

    def role(self, index: int = 0) -> dict[str, Any]:
        return self.delta({"role": "assistant", "content": ""}, index)

    def finish(self, finish_reason: str, index: int = 0, **extra: Any) -> dict[str, Any]:
        out = self.delta({}, index, finish_reason)
        out.update(extra)
        return out

    def usage(self, usage: dict[str, Any], **extra: Any) -> dict[str, Any]:
        out = self.chunk([], usage=usage)
        out.update(extra)
        return out

    def tail(self, finish_reasons: dict[int, str], usage: dict[str, Any], routing: dict[str, Any] | None
             ) -> list[dict[str, Any]]:
        """The closing chunks: one finish chunk per choice, then the usage chunk (if asked for);
        ``routing`` rides on the last of them."""
        out = [self.finish(reason, index) for index, reason in sorted(finish_reasons.items())]
        if self.include_usage:
            out.append(self.usage(usage))
        if routing is not None:
            out[-1]["routing"] = routing
        return out


def message_deltas(message: dict[str, Any], piece_chars: int = 16) -> Iterator[dict[str, Any]]:
    """The deltas (after the role delta) that rebuild ``message``: content pieces, then each tool
    call whole (``index`` = its position)."""
    content = message.get("content")
    if isinstance(content, str) and content:
        for piece in split_text(content, piece_chars):
            yield {"content": piece}
    for k, call in enumerate(message.get("tool_calls") or []):
        if isinstance(call, dict):
            yield {"tool_calls": [{"index": k, **call}]}


def completion_chunks(writer: ChunkWriter, choices: list[dict[str, Any]], usage: dict[str, Any],
                      routing: dict[str, Any] | None, piece_chars: int = 16) -> list[dict[str, Any]]:
    """A whole ``chat.completion``'s ``choices`` as chunks (the buffered mode: the answer is known)."""
    out = []
    finish = {}
    for choice in choices:
        index = int(choice.get("index", 0))
        out.append(writer.role(index))
        for delta in message_deltas(choice.get("message") or {}, piece_chars):
            out.append(writer.delta(delta, index))
        if choice.get("logprobs") is not None and out:
            out[-1]["choices"][0]["logprobs"] = choice["logprobs"]
        finish[index] = choice.get("finish_reason") or "stop"
    return out + writer.tail(finish, usage, routing)


def error_event(message: str, type_: str = "server_error", code: str | None = None,
                **extra: Any) -> dict[str, Any]:
    """The event that reports an error after the stream started (OpenAI's error shape)."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code, **extra}}


def sse_data(line: str, loads: Callable[[str], Any] = json.loads) -> "dict[str, Any] | str | None":
    """The payload of one line of an SSE stream: the JSON of a ``data:`` line parsed by ``loads``
    (ValueError if it is not JSON), the string ``"[DONE]"`` for the end marker, None for any other
    line (blank, comment, ``event:``)."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    event = loads(data)
    if not isinstance(event, dict):
        raise ValueError(f"SSE data is not a JSON object: {data[:80]!r}")
    return event
