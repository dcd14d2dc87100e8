"""Micro-batching of the router's CPU work (binding, deciding, selecting) across concurrent requests.

Only the estimator/policy calls are batched; every request runs its own loop and its own backend
calls (:meth:`CascadeRouter.route_one`), so a slow backend for one request never delays another.

Two lanes, each with its own queue and worker: binds (encoding new queries, the heaviest step)
run on the router's ``bind_executor`` (or its ``executor`` when that is None), decisions and
selections on its ``executor`` (or inline when None). With two threads, requests already bound
keep deciding while a batch of new ones is encoded, instead of queueing behind it. A lane's
worker takes the first waiting job, then everything already queued, then waits up to
``window_ms`` for more (at most ``max_batch`` jobs), groups them (binds by fitted λ; decisions
by bound state and fitted λ; selections by bound state) and runs ONE router call per group.
Decisions are per row, so they equal routing each query alone.

Isolation: if a group's call raises, the group is split in halves and each half retried (down to
single jobs), so only the request whose input breaks the estimators gets the exception, and the
others stay batched (2·log2(n) extra calls for one bad job among n). A job whose caller went away
(cancelled future: its client left, or its deadline passed) is skipped, also when it was cancelled
while earlier groups of its batch ran; only a call already running on a compute thread finishes.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from cascade_routing.serving.router import CascadeRouter, _State


@dataclass
class Slot:
    """One request's row in a bound state; ``compute_s`` = its share of the batched compute."""

    state: "_State"
    row: int
    batch_size: int
    compute_s: float = 0.0


@dataclass
class Decision:
    """The policy's next model for one request (``model`` -1 = stop) and the beliefs behind it."""

    model: int
    lam: float
    estimate_mean: dict[str, float]
    estimate_std: dict[str, float] | None
    cost_estimate: dict[str, float]


@dataclass
class _Job:
    kind: str  # "bind", "decide", "select"
    key: tuple[Any, ...]
    payload: Any
    future: asyncio.Future = field(repr=False)


class ComputeBatcher:
    """``slot = await b.bind(query, task, fitted)``; ``await b.decide(slot, fitted)`` -> Decision;
    ``await b.select(slot)`` -> (model index or -1, final mean per model)."""

    def __init__(self, router: "CascadeRouter", max_batch: int = 64, window_ms: float = 2.0) -> None:
        if max_batch < 1 or not 0 <= window_ms < math.inf:
            raise ValueError(f"need max_batch >= 1 and a finite window_ms >= 0, got {max_batch}, {window_ms}")
        self.router = router
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self._queues: dict[str, asyncio.Queue] = {}  # lane ("bind" or "step") -> its jobs
        self._workers: dict[str, asyncio.Task] = {}
        self.calls = 0
        self.jobs = 0

    # ------------------------------------------------------------------ public
    async def bind(self, query: str, task: str | None, fitted: Any) -> Slot:
        return await self._submit("bind", (id(fitted),), (query, task))

    async def decide(self, slot: Slot, fitted: Any) -> Decision:
        return await self._submit("decide", (id(slot.state), id(fitted)), (slot, fitted))

    async def select(self, slot: Slot) -> tuple[int, dict[str, float]]:
        return await self._submit("select", (id(slot.state),), slot)

    async def aclose(self) -> None:
        for worker in self._workers.values():
            worker.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {"compute_calls": self.calls, "jobs": self.jobs,
                "mean_batch": self.jobs / self.calls if self.calls else 0.0,
                "max_batch": self.max_batch, "window_ms": self.window_s * 1000.0}

    # ------------------------------------------------------------------ worker
    async def _submit(self, kind: str, key: tuple[Any, ...], payload: Any) -> Any:
        lane = "bind" if kind == "bind" else "step"
        worker = self._workers.get(lane)
        if worker is None or worker.done():
            self._queues[lane] = asyncio.Queue()
            self._workers[lane] = asyncio.create_task(self._work(self._queues[lane]))
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queues[lane].put_nowait(_Job(kind, (kind, *key), payload, future))
        return await future

    async def _work(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            while len(jobs) < self.max_batch and not queue.empty():
                jobs.append(queue.get_nowait())
            deadline = loop.time() + self.window_s
            while len(jobs) < self.max_batch and self.window_s > 0:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple[Any, ...], list[_Job]] = {}
            for job in jobs:
                if not job.future.done():
                    groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                await self._run_group(group)

    async def _run_group(self, group: list[_Job]) -> None:
        group = [job for job in group if not job.future.done()]  # callers gone meanwhile: no work for them
        if not group:
            return
        fn = {"bind": self._bind, "decide": self._decide, "select": self._select}[group[0].kind]
        try:
            results, took = await self._compute(fn, group)
        except Exception as err:  # noqa: BLE001 - isolate by bisection: only the culprit fails
            if len(group) > 1:
                mid = len(group) // 2
                await self._run_group(group[:mid])
                await self._run_group(group[mid:])
            elif not group[0].future.done():
                group[0].future.set_exception(err)
            return
        self.calls += 1
        self.jobs += len(group)
        for job, result in zip(group, results):
            slot = result if job.kind == "bind" else job.payload[0] if job.kind == "decide" else job.payload
            slot.compute_s += took / len(group)
            if not job.future.done():
                job.future.set_result(result)

    async def _compute(self, fn: Callable[[list[_Job]], list[Any]], group: list[_Job]) -> tuple[list[Any], float]:
        def timed() -> tuple[list[Any], float]:
            t0 = time.perf_counter()
            out = fn(group)
            return out, time.perf_counter() - t0

        executor = self.router.executor
        if group[0].kind == "bind" and self.router.bind_executor is not None:
            executor = self.router.bind_executor
        if executor is None:
            return timed()
        return await asyncio.get_running_loop().run_in_executor(executor, timed)

    # ------------------------------------------------------------------ router calls (compute thread)
    def _bind(self, group: list[_Job]) -> list[Slot]:
        queries = [job.payload[0] for job in group]
        tasks = [job.payload[1] for job in group]
        state = self.router._state(queries, None, None if all(t is None for t in tasks) else tasks)
        return [Slot(state, row, len(group)) for row in range(len(group))]

    def _decide(self, group: list[_Job]) -> list[Decision]:
        state, fitted = group[0].payload[0].state, group[0].payload[1]
        rows = torch.as_tensor([job.payload[0].row for job in group], dtype=torch.long)
        nxt, est, cost, lams = self.router._decide(state, rows, fitted)
        from cascade_routing.serving.router import _belief_dicts

        return [Decision(int(nxt[k]), float(lams[k]), *_belief_dicts(self.router.models, est, cost, k))
                for k in range(len(group))]

    def _select(self, group: list[_Job]) -> list[tuple[int, dict[str, float]]]:
        state = group[0].payload.state
        rows = torch.as_tensor([job.payload.row for job in group], dtype=torch.long)
        choice, est = self.router._select(state, rows)
        mean = est.mean.double().cpu().tolist()
        return [(int(choice[k]), dict(zip(self.router.models, mean[k]))) for k in range(len(group))]
