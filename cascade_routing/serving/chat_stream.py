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
go out, so they name the streamed model only).

Once a model's tokens went out, nothing else may be appended to them: if that model fails, the
router stops (:class:`~cascade_routing.serving.router.StreamAbortedError`, no other model is called)
and the stream ends with an error event (``code: stream_aborted``) and ``[DONE]``; so does any
other failure after the first token (the server names deadline and shutdown errors with their own
codes, through ``error_event_of``). As a last guard, a result whose answer is not the model whose
tokens went out also ends with ``stream_aborted``, never with a second model's text.

If the client goes away mid-stream, the routing task is cancelled (its backend call with it): the
server records the request as a disconnect with what it had spent.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse

from cascade_routing.serving.router import RouteRequest, RouteResult, StreamAbortedError
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
ErrorEventOf = Callable[[BaseException], dict[str, Any]]


def default_error_event(err: BaseException) -> dict[str, Any]:
    """The error event of a failure after the stream started: ``code: stream_aborted`` (with the
    failed model's entry as ``failures`` when a streamed model broke)."""
    if isinstance(err, StreamAbortedError):
        return error_event(str(err), code="stream_aborted", failures=[err.failure])
    return error_event(f"routing failed after the stream started: {err}", code="stream_aborted")


class _TokenSink:
    """The queue between the routing task and the response: ``("delta", choice)`` per passed-through
    upstream chunk, then ``("end", None)`` once routing ended (result or error in ``outcome``)."""

    def __init__(self, on_first_token: Callable[[float, str], None] | None) -> None:
        self.start = time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.outcome = StreamOutcome()
        self.models_sent: list[str] = []  # models whose deltas were passed through, in order
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
        if choice.get("model") not in self.models_sent:
            self.models_sent.append(choice.get("model"))
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
            self.queue.put_nowait(("end", None))


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


def _tail(sink: _TokenSink, sent: bool, writer: ChunkWriter, build: Build, piece_chars: int,
          error_event_of: ErrorEventOf, on_abort: Callable[[str], None] | None) -> list[bytes]:
    """The events after the streamed deltas, up to ``[DONE]``: an error event if routing failed, or if
    tokens went out and the answer is not the model that sent them, complete and alone
    (``outcome.aborted``; ``on_abort(code)`` is called); else the finish chunk (pass-through) or the
    whole answer in chunks (buffered), with usage and the routing trace."""
    outcome = sink.outcome

    def abort(event: dict[str, Any]) -> list[bytes]:
        outcome.aborted = True
        if on_abort is not None:
            on_abort(str(event["error"].get("code") or "stream_aborted"))
        return [sse(event), DONE]

    if outcome.error is not None:
        return abort(error_event_of(outcome.error))
    result = outcome.result
    assert result is not None
    choices, usage, routing, _ = build(result)
    streamed_ok = any(s.streamed and s.status == "ok" and s.model == result.model for s in result.steps)
    if sent and (sink.models_sent != [result.model] or not streamed_ok):
        return abort(error_event(f"the streamed model {sink.models_sent[0]!r} did not give the whole answer "
                                 f"(the route returned {result.model!r}); retry without stream",
                                 code="stream_aborted", routing=routing))
    if sent:
        finish = {int(c.get("index", 0)): c.get("finish_reason") or "stop" for c in choices}
        chunks = writer.tail(finish, usage, routing)
    else:
        if outcome.first_token_s is None:
            sink.first_token("buffered")
        chunks = completion_chunks(writer, choices, usage, routing, piece_chars)[1:]  # role already sent
    return [sse(chunk) for chunk in chunks] + [DONE]


async def _events(sink: _TokenSink, first: tuple[str, Any], writer: ChunkWriter, build: Build, piece_chars: int,
                  routing: "asyncio.Task[None]", error_event_of: ErrorEventOf,
                  on_abort: Callable[[str], None] | None) -> AsyncIterator[bytes]:
    """The SSE body: the role chunk, each passed-through delta as it arrives, then :func:`_tail`.

    If the client goes away, this generator is closed and cancels the ``routing`` task (the server
    records the request as a disconnect, with what it spent)."""
    try:
        yield sse(writer.role())
        sent = False
        pending: list[tuple[str, Any]] = [first]
        while True:
            k, payload = pending.pop() if pending else await sink.queue.get()
            if k != "delta":
                break
            sent = True
            yield sse(writer.delta(payload["delta"], payload.get("index", 0), logprobs=payload.get("logprobs")))
        for event in _tail(sink, sent, writer, build, piece_chars, error_event_of, on_abort):
            yield event
    finally:
        if not routing.done():
            routing.cancel()


async def start_stream(
    submit: Callable[[RouteRequest], Awaitable[RouteResult]],
    item: RouteRequest,
    writer: ChunkWriter,
    build: Build,
    headers: dict[str, str],
    on_end: Callable[[StreamOutcome], None],
    piece_chars: int = 16,
    on_first_token: Callable[[float, str], None] | None = None,
    error_event_of: ErrorEventOf = default_error_event,
    on_abort: Callable[[str], None] | None = None,
) -> "StreamingResponse | BaseException":
    """Route ``item`` with a token sink and return the streaming response, or the exception that
    happened before anything was sent (the caller turns it into an error response).

    ``submit(item)`` routes; ``build(result)`` gives (choices, usage, routing trace, headers) of the
    answer as the non-streamed body would; ``on_end(outcome)`` is called once when routing ended
    (also if the client went away mid-stream: the routing task is then cancelled);
    ``on_first_token(seconds, mode)`` when the first content goes out (``mode``: ``passthrough`` or
    ``buffered``); ``error_event_of(error)`` gives the event that reports a failure after the
    stream started (default :func:`default_error_event`); ``on_abort(code)`` is called when such an
    event goes out.
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
    return StreamingResponse(_events(sink, (kind, first), writer, build, piece_chars, task, error_event_of, on_abort),
                             media_type="text/event-stream", headers=response_headers)
