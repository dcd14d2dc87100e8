"""Micro-batching of concurrent requests for :meth:`CascadeRouter.route_batch`.

Requests submitted while a batch is being formed are routed together (same budget only): the
worker takes the first waiting request, then everything already queued, then waits up to
``window_ms`` for more, up to ``max_batch``; each batch runs as its own task, so a new batch forms
while earlier ones await their backends. Decisions are per query and identical to routing each
query alone; batching only shares the estimators' per-call overhead.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cascade_routing.serving.router import CascadeRouter, NoModelAvailableError, RouteRequest, RouteResult


class RequestBatcher:
    """``await batcher.submit(RouteRequest(...), budget)`` -> RouteResult (or raises)."""

    def __init__(self, router: CascadeRouter, backends: Any, max_batch: int = 64, window_ms: float = 2.0) -> None:
        if max_batch < 1 or window_ms < 0:
            raise ValueError(f"need max_batch >= 1 and window_ms >= 0, got {max_batch}, {window_ms}")
        self.router = router
        self.backends = backends
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self.batches = 0
        self.batched_requests = 0

    async def submit(self, item: RouteRequest, budget: float | None = None) -> RouteResult:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work())
        assert self._queue is not None
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, budget, future))
        return await future

    async def _work(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            groups: dict[float | None, list] = {}
            for entry in batch:
                groups.setdefault(entry[1], []).append(entry)
            for budget, group in groups.items():
                task = asyncio.create_task(self._run(group, budget))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _run(self, group: list, budget: float | None) -> None:
        self.batches += 1
        self.batched_requests += len(group)
        try:
            results = await self.router.route_batch([e[0] for e in group], self.backends, budget)
        except BaseException as err:  # noqa: BLE001 - handed to every waiting request
            for _, _, future in group:
                if not future.done():
                    future.set_exception(err)
            if isinstance(err, asyncio.CancelledError):
                raise
            return
        for (_, _, future), result in zip(group, results):
            if future.done():
                continue
            if isinstance(result, NoModelAvailableError):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def aclose(self) -> None:
        tasks = [t for t in (self._worker, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "requests": self.batched_requests,
                "mean_batch": self.batched_requests / self.batches if self.batches else 0.0,
                "max_batch": self.max_batch, "window_ms": self.window_s * 1000.0}
