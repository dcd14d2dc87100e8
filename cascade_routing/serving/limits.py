"""Per-request limits of the server and the helpers that enforce them before any work is done.

- ``max_body_bytes`` (default 1 MiB): a larger body gets 413; the body is read in chunks and
  never buffered past the limit (a ``Content-Length`` over the limit is refused unread).
- ``max_prompt_chars`` (default 100,000): text characters over all messages; more gets 400
  ``context_length_exceeded``.
- ``body_timeout_s`` (default 30): the whole body must arrive within this long of the request's
  arrival (and within ``deadline_s``), else 408 ``request_timeout``. The body is read BEFORE the
  request takes a concurrency slot, so a client sending slowly never holds one.
- ``max_concurrent`` (default 256): chat requests being served at once (from the body read on);
  one more gets 429 with ``Retry-After: retry_after_s`` instead of queueing without bound.
- ``deadline_s`` (default 120): wall time for one request, from arrival to answer; past it the
  request's backend calls are cancelled and the client gets 504.
- ``max_upstream_attempts`` (default 8): backend HTTP attempts per request, retries included;
  once spent, further models count as failed (``attempt_limit``).
- ``shutdown_timeout_s`` (default 30): on SIGTERM, requests in flight get this long to finish
  (less one second); then they are cancelled and answered 503 ``server_shutting_down`` (spend
  recorded) before the HTTP server's own grace period cuts connections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request

from cascade_routing.serving.schema import RequestError


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 100_000
    max_concurrent: int = 256
    retry_after_s: int = 1
    deadline_s: float = 120.0
    max_upstream_attempts: int = 8
    shutdown_timeout_s: float = 30.0
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_chars", "max_concurrent", "max_upstream_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("deadline_s", "body_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {getattr(self, name)}")
        if not 0 <= self.shutdown_timeout_s < math.inf:
            raise ValueError(f"shutdown_timeout_s must be a finite number of seconds >= 0, got {self.shutdown_timeout_s}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or :class:`RequestError` 413 as soon as it exceeds ``limit`` bytes (499
    ``client_closed`` when the client disconnects before all of it arrived)."""
    too_large = RequestError(f"request body is larger than the server's limit of {limit} bytes", None, 413,
                             "request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # the client's doing, not a server fault: 499 like any client that left
        raise RequestError("the client closed the connection before its request body arrived", None, 499,
                           "client_closed") from None
    return b"".join(chunks)


class ConcurrencyGate:
    """Counts requests in flight; :meth:`enter` refuses (429) beyond ``limit`` instead of queueing."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.rejected = 0

    def enter(self) -> None:
        if self.in_flight >= self.limit:
            self.rejected += 1
            raise RequestError(f"the server is at its limit of {self.limit} concurrent requests; retry later",
                               None, 429, "server_busy", headers={"Retry-After": str(self.retry_after_s)})
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
