"""Serving one chat completion with ``stream: true``.

The request is routed as usual (through the micro-batcher) with a sink for backend tokens:

- **pass-through**: when the router knows the model it is about to run gives the returned answer
  (routing, or a final step; :meth:`CascadeRouter.route_batch`), that backend is called with
  ``stream: true`` and its content / tool-call deltas are re-sent to the client as they arrive;
- **buffered**: otherwise the cascade runs to its end and the selected answer is sent as chunks
  (content in pieces of ``piece_chars`` characters, tool calls whole).

The response starts (status 200 and headers) at the first token (pass-through) or when the
cascade has decided (buffered); an error before that is a normal JSON error response with its
status. The routing trace rides on the last chunk before ``[DONE]`` (and, in buffered mode, in the
``X-Cascade-Routing-*`` headers too; in pass-through mode the cost is not known when the headers
go out, so they name the streamed model only). A failure after tokens were sent (the streamed
backend broke, and another model answered instead) ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse

from cascade_routing.serving.router import RouteRequest, RouteResult
from cascade_routing.serving.streaming import DONE, SSE_HEADERS, ChunkWriter, completion_chunks, error_event, sse


_RUNNING: set[asyncio.Task] = set()


@dataclass
class StreamOutcome:
    """What a streamed request ended with (for the server's accounting and metrics)."""

    result: RouteResult | None = None
    error: BaseException | None = None
    first_token_s: float | None = None
    mode: str = "buffered"
    aborted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


Build = Callable[[RouteResult], tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], dict[str, str]]]


class _TokenSink:
    """The queue between the routing task and the response: ``("delta", choice)`` per passed-through
    upstream chunk, then ``("end", None)`` once routing ended (result or error in ``outcome``)."""

    def __init__(self, on_first_token: Callable[[float, str], None] | None) -> None:
        self.start = time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.outcome = StreamOutcome()
        self._on_first_token = on_first_token

    def first_token(self, mode: str) -> None:
        """Record that the first content goes out now, ``passthrough`` or ``buffered``."""
        self.outcome.first_token_s, self.outcome.mode = time.perf_counter() - self.start, mode
        if self._on_first_token is not None:
            self._on_first_token(self.outcome.first_token_s, mode)

    async def on_delta(self, choice: dict[str, Any]) -> None:
        """The router's token sink (``RouteRequest.on_delta``)."""
        if self.outcome.first_token_s is None:
            self.first_token("passthrough")
            self.outcome.extra["model"] = choice.get("model")
        await self.queue.put(("delta", choice))

    async def route(self, submit: Callable[[RouteRequest], Awaitable[RouteResult]], item: RouteRequest,
                    on_end: Callable[[StreamOutcome], None]) -> None:
        """Route ``item``, keep its result or error in ``outcome``, call ``on_end``, then signal the end."""
        try:
            self.outcome.result = await submit(item)
        except BaseException as err:  # noqa: BLE001 - reported to the client by the response
            self.outcome.error = err
            if isinstance(err, asyncio.CancelledError):
                raise
        finally:
            on_end(self.outcome)
            await self.queue.put(("end", None))


def _response_headers(headers: dict[str, str], kind: str, outcome: StreamOutcome, build: Build) -> dict[str, str]:
    """The stream's headers: the caller's, SSE's, and the routing trace's when routing has already
    ended (buffered), or only the streamed model's name (pass-through: the cost is not known yet)."""
    out = dict(headers)
    out.update(SSE_HEADERS)
    if kind == "end":
        assert outcome.result is not None
        out.update(build(outcome.result)[3])
    elif outcome.extra.get("model"):
        out["X-Cascade-Routing-Model"] = str(outcome.extra["model"])
    return out


def _tail(sink: _TokenSink, sent: bool, writer: ChunkWriter, build: Build, piece_chars: int) -> list[bytes]:
    """The events after the streamed deltas, up to ``[DONE]``: an error event if routing failed or the
    streamed model is not the answer after tokens went out (``outcome.aborted``); else the finish
    chunk (pass-through) or the whole answer in chunks (buffered), with usage and the routing trace."""
    outcome = sink.outcome
    if outcome.error is not None:
        outcome.aborted = sent
        return [sse(error_event(f"routing failed after the stream started: {outcome.error}", code="stream_aborted")),
                DONE]
    result = outcome.result
    assert result is not None
    choices, usage, routing, _ = build(result)
    streamed_ok = any(s.streamed and s.status == "ok" and s.model == result.model for s in result.steps)
    if sent and not streamed_ok:
        outcome.aborted = True
        return [sse(error_event("the streamed model failed mid-answer and another model answered "
                                f"({result.model}); retry without stream for its answer",
                                code="stream_aborted", routing=routing)), DONE]
    if sent:
        finish = {int(c.get("index", 0)): c.get("finish_reason") or "stop" for c in choices}
        chunks = writer.tail(finish, usage, routing)
    else:
        if outcome.first_token_s is None:
            sink.first_token("buffered")
        chunks = completion_chunks(writer, choices, usage, routing, piece_chars)[1:]  # role already sent
    return [sse(chunk) for chunk in chunks] + [DONE]


async def _events(sink: _TokenSink, first: tuple[str, Any], writer: ChunkWriter, build: Build, piece_chars: int
                  ) -> AsyncIterator[bytes]:
    """The SSE body: the role chunk, each passed-through delta as it arrives, then :func:`_tail`.

    If the client goes away, this generator is closed; the routing task still runs to its end, so
    the request's spend is accounted by ``on_end``."""
    yield sse(writer.role())
    sent = False
    pending: list[tuple[str, Any]] = [first]
    while True:
        k, payload = pending.pop() if pending else await sink.queue.get()
        if k != "delta":
            break
        sent = True
        yield sse(writer.delta(payload["delta"], payload.get("index", 0), logprobs=payload.get("logprobs")))
    for event in _tail(sink, sent, writer, build, piece_chars):
        yield event


async def start_stream(
    submit: Callable[[RouteRequest], Awaitable[RouteResult]],
    item: RouteRequest,
    writer: ChunkWriter,
    build: Build,
    headers: dict[str, str],
    on_end: Callable[[StreamOutcome], None],
    piece_chars: int = 16,
    on_first_token: Callable[[float, str], None] | None = None,
) -> "StreamingResponse | BaseException":
    """Route ``item`` with a token sink and return the streaming response, or the exception that
    happened before anything was sent (the caller turns it into an error response).

    ``submit(item)`` routes; ``build(result)`` gives (choices, usage, routing trace, headers) of the
    answer as the non-streamed body would; ``on_end(outcome)`` is called once when routing ended
    (also if the client went away mid-stream); ``on_first_token(seconds, mode)`` when the first
    content goes out (``mode``: ``passthrough`` or ``buffered``).
    """
    sink = _TokenSink(on_first_token)
    item.on_delta = sink.on_delta
    task = asyncio.create_task(sink.route(submit, item, on_end))
    _RUNNING.add(task)  # a strong reference until it ends: the response may outlive this frame
    task.add_done_callback(_RUNNING.discard)
    kind, first = await sink.queue.get()
    if kind == "end" and sink.outcome.error is not None:
        return sink.outcome.error
    response_headers = _response_headers(headers, kind, sink.outcome, build)
    return StreamingResponse(_events(sink, (kind, first), writer, build, piece_chars),
                             media_type="text/event-stream", headers=response_headers)
