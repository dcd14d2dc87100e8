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


async def start_stream(
    submit: Callable[[RouteRequest], Awaitable[RouteResult]],
    item: RouteRequest,
    writer: ChunkWriter,
    build: Callable[[RouteResult], tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], dict[str, str]]],
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
    start = time.perf_counter()
    queue: asyncio.Queue = asyncio.Queue()
    outcome = StreamOutcome()

    def first_token(mode: str) -> None:
        outcome.first_token_s, outcome.mode = time.perf_counter() - start, mode
        if on_first_token is not None:
            on_first_token(outcome.first_token_s, mode)

    async def on_delta(choice: dict[str, Any]) -> None:
        if outcome.first_token_s is None:
            first_token("passthrough")
            outcome.extra["model"] = choice.get("model")
        await queue.put(("delta", choice))

    item.on_delta = on_delta

    async def run() -> None:
        try:
            outcome.result = await submit(item)
        except BaseException as err:  # noqa: BLE001 - reported to the client below
            outcome.error = err
            if isinstance(err, asyncio.CancelledError):
                raise
        finally:
            on_end(outcome)
            await queue.put(("end", None))

    task = asyncio.create_task(run())
    _RUNNING.add(task)  # a strong reference until it ends: the response may outlive this frame
    task.add_done_callback(_RUNNING.discard)
    kind, first = await queue.get()
    if kind == "end" and outcome.error is not None:
        return outcome.error
    response_headers = dict(headers)
    response_headers.update(SSE_HEADERS)
    if kind == "end":
        assert outcome.result is not None
        _, _, _, extra_headers = build(outcome.result)
        response_headers.update(extra_headers)
    elif outcome.extra.get("model"):
        response_headers["X-Cascade-Routing-Model"] = str(outcome.extra["model"])

    async def events() -> AsyncIterator[bytes]:
        yield sse(writer.role())
        sent = False
        pending: list[tuple[str, Any]] = [(kind, first)]
        # If the client goes away, this generator is closed; the routing task still runs to its end, so
        # the request's spend is accounted by ``on_end``.
        while True:
            k, payload = pending.pop() if pending else await queue.get()
            if k != "delta":
                break
            sent = True
            yield sse(writer.delta(payload["delta"], payload.get("index", 0), logprobs=payload.get("logprobs")))
        if outcome.error is not None:
            outcome.aborted = sent
            yield sse(error_event(f"routing failed after the stream started: {outcome.error}", code="stream_aborted"))
            yield DONE
            return
        result = outcome.result
        assert result is not None
        choices, usage, routing, _ = build(result)
        streamed_ok = any(s.streamed and s.status == "ok" and s.model == result.model for s in result.steps)
        if sent and not streamed_ok:
            outcome.aborted = True
            yield sse(error_event("the streamed model failed mid-answer and another model answered "
                                  f"({result.model}); retry without stream for its answer",
                                  code="stream_aborted", routing=routing))
            yield DONE
            return
        if sent:
            finish = {int(c.get("index", 0)): c.get("finish_reason") or "stop" for c in choices}
            tail = writer.tail(finish, usage, routing)
        else:
            if outcome.first_token_s is None:
                first_token("buffered")
            tail = completion_chunks(writer, choices, usage, routing, piece_chars)[1:]  # role already sent
        for chunk in tail:
            yield sse(chunk)
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=response_headers)
