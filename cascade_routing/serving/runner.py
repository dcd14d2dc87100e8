"""Running the server app: ``serve`` (the ``cascade-routing serve`` process: uvicorn, one or several
workers on a port, graceful shutdown) and :class:`BackgroundServer` (a server on a thread, for tests
and benchmarks). The app itself is :func:`cascade_routing.serving.server.create_app`."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import math
import os
import socket
import threading
import time
from typing import Any

import uvicorn

from cascade_routing.policies.controller import ControllerConfig
from cascade_routing.serving.backends import BackendPool
from cascade_routing.serving.limits import ServerLimits
from cascade_routing.serving.router import CascadeRouter
from cascade_routing.serving.store import DEFAULT_STORE

KEEP_ALIVE_S = 75.0


def serve(
    checkpoint: "str | os.PathLike[str]",
    backends: "str | os.PathLike[str]",
    budget: float,
    strategy: str = "cascade_routing",
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "cascade-routing",
    log_level: str = "info",
    compute_threads: int = 1,
    bind_thread: bool = True,
    max_batch: int = 64,
    batch_window_ms: float = 2.0,
    torch_threads: int | None = 1,
    limits: ServerLimits | None = None,
    api_keys: "str | os.PathLike[str] | None" = None,
    store: str | None = DEFAULT_STORE,
    keep_alive_s: float = KEEP_ALIVE_S,
    shutdown_timeout_s: float = 30.0,
    int8: bool = False,
    controller: ControllerConfig | None = None,
    upstream_pools: int = 8,
    workers: int = 1,
    reuse_port: bool = False,
) -> int:
    """Load the checkpoint and the backends YAML and serve until interrupted (blocking); returns
    the exit status (0, or 1 when one of several workers stopped on its own).

    ``torch_threads`` sets ``torch.set_num_threads`` for the process (default 1: the estimator's
    small per-batch ops are fastest single-threaded, and intra-op threads fight the HTTP work and
    other processes for the cores; measured 30 ms vs 1,050 ms per batch of 50 on a loaded 2-core
    machine); None leaves torch's default.

    The router's CPU work (estimators, policy) runs on ``compute_threads`` worker threads (default
    1: the work is serialised, the event loop stays free for HTTP I/O; Hugging Face fast
    tokenizers are not safe to share between threads, keep 1 unless the estimator allows more).
    ``bind_thread`` (default True): binding, i.e. encoding new queries, runs on a thread of its own
    (:mod:`cascade_routing.serving.batching`'s two lanes), so requests already bound keep deciding
    while a batch of new queries is encoded; queries and answers use separate tokenizer instances.

    ``api_keys``: a keys file (:mod:`cascade_routing.serving.keys`; else ``$CASCADE_ROUTING_API_KEYS``;
    neither = no authentication). ``store``: the spend store URL (:func:`~cascade_routing.serving.
    store.open_store`). ``keep_alive_s``: idle HTTP keep-alive of client connections; it must
    exceed the clients' own idle expiry (httpx: 5 s), else a client can send a request on a
    connection the server is closing and lose it; must be > 0. ``shutdown_timeout_s`` (>= 0): on
    SIGTERM/SIGINT stop accepting, let requests in flight finish for this long, then cancel them
    (their spend is still recorded). Both are checked (ValueError) before anything is loaded. ``int8``: dynamically quantise the artifact's encoder's linear layers to int8.
    ``controller``: keep the mean spend at the budget on live traffic with the online λ controller
    (:mod:`cascade_routing.policies.controller`); None (default) serves the fitted λ unchanged.
    ``upstream_pools``: HTTP connection pools the backend calls are spread over
    (:func:`~cascade_routing.serving.backends.pooled_client`). ``workers`` > 1: that many server
    processes share the port (:mod:`cascade_routing.serving.workers`; the spend store must be a
    file or Redis). ``reuse_port``: bind with ``SO_REUSEPORT``, so other processes may listen on the
    same address (what each worker does).
    """
    from concurrent.futures import ThreadPoolExecutor

    from cascade_routing.serving.keys import load_keys
    from cascade_routing.serving.server import create_app  # the app module imports this one
    from cascade_routing.serving.store import open_store

    if not 0 < keep_alive_s < math.inf:
        raise ValueError(f"keep_alive_s (--keep-alive-s) must be a finite number of seconds > 0, got {keep_alive_s}")
    if not 0 <= shutdown_timeout_s < math.inf:
        raise ValueError("shutdown_timeout_s (--shutdown-timeout-s) must be a finite number of seconds >= 0, "
                         f"got {shutdown_timeout_s}")
    limits = dataclasses.replace(limits or ServerLimits(), shutdown_timeout_s=shutdown_timeout_s)
    if workers != 1:
        from cascade_routing.serving.workers import run_workers

        if port == 0:
            raise ValueError("several workers need a fixed --port (with port 0 each would listen on its own)")
        if (store or "").startswith("memory://"):
            raise ValueError("several workers need a shared spend store (sqlite:///FILE or redis://...), "
                             "not memory://, or each would keep its own accounts")
        parameters = inspect.signature(serve).parameters
        settings = {k: v for k, v in locals().items() if k in parameters}
        return run_workers(workers, serve, {**settings, "workers": 1, "reuse_port": True})

    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    keys = load_keys(api_keys)
    executor = ThreadPoolExecutor(max_workers=compute_threads, thread_name_prefix="routing")
    bind_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="binding") if bind_thread else None
    router = CascadeRouter.from_checkpoint(checkpoint, budget=budget, strategy=strategy, name=name,
                                           executor=executor, bind_executor=bind_executor, int8=int8)
    pool = BackendPool.from_yaml(backends, connection_pools=upstream_pools)
    app = create_app(router, pool, budget, max_batch=max_batch, batch_window_ms=batch_window_ms, limits=limits,
                     keys=keys, store=open_store(store), controller=controller)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_keep_alive=max(1, int(keep_alive_s)),
                            timeout_graceful_shutdown=int(math.ceil(limits.shutdown_timeout_s)), backlog=4096)
    try:
        DrainingServer(config).run(sockets=[reuse_port_socket(host, port)] if reuse_port else None)
    finally:
        for threads in (executor, bind_executor):
            if threads is not None:
                threads.shutdown(wait=False, cancel_futures=True)
    return 0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` with ``SO_REUSEPORT`` (Linux: the kernel spreads
    connections over every process listening this way on the address)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a shutdown first sets the app's ``state.draining`` event, so requests
    in flight answer 503 within ``ServerLimits.shutdown_timeout_s`` instead of being cut off."""

    async def shutdown(self, sockets: Any = None) -> None:
        draining = getattr(getattr(self.config.app, "state", None), "draining", None)
        if draining is not None:
            draining.set()
        await super().shutdown(sockets)


class BackgroundServer:
    """Run an ASGI app with uvicorn in a daemon thread on 127.0.0.1 and a free port (tests, demos).

    ``with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")``; startup is bounded by
    ``timeout_s``, shutdown by the app's ``limits.shutdown_timeout_s`` (1 s for other apps) plus
    ``timeout_s``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0,
                 log_level: str = "warning") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        limits = getattr(getattr(app, "state", None), "limits", None)
        grace = math.ceil(limits.shutdown_timeout_s) if limits is not None else 1
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=grace,
                                backlog=4096, timeout_keep_alive=int(KEEP_ALIVE_S))
        self.server = DrainingServer(config)
        self.timeout_s = timeout_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self._sock]))

    def start(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url} within {self.timeout_s}s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(self.timeout_s + self.server.config.timeout_graceful_shutdown)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
