"""Running the server app: ``serve`` (the ``cascade-routing serve`` process: uvicorn, one or several
workers on a port, graceful shutdown) and :class:`BackgroundServer` (a server on a thread, for tests
and benchmarks). The app itself is :func:`cascade_routing.serving.server.create_app`.

Both run uvicorn's h11 protocol with a header timeout (:class:`HeaderTimeoutH11Protocol`): a
connection must deliver a request's line and headers within ``header_timeout_s`` (default 10 s) of
being opened, or of its first byte after the previous response, else it is closed. uvicorn itself
closes an idle connection only after a response (keep-alive), so without this a client that
connects and sends nothing, or its headers a byte at a time (slowloris), holds a connection and a
file descriptor for ever. The body has its own limit (``ServerLimits.body_timeout_s``). What a
single process cannot do: limit connections per client, or absorb a flood of new connections
(each lives up to ``header_timeout_s``); put a reverse proxy in front for that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import os
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from cascade_routing.policies.controller import ControllerConfig, lambda_is_zero
from cascade_routing.serving.backends import BackendPool
from cascade_routing.serving.limits import ServerLimits
from cascade_routing.serving.router import CascadeRouter, check_budget
from cascade_routing.serving.store import DEFAULT_STORE

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 75.0
HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all
    arrived within :attr:`header_timeout_s` of the connection being made, or of the first byte of
    its next request (see the module docstring). Make one with :func:`header_timeout_protocol`."""

    header_timeout_s: float = HEADER_TIMEOUT_S

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # (the start of) a request's headers: they have a time limit
            self._arm_header_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in; the body has body_timeout_s
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.debug("closing a connection that did not send its request headers within %ss",
                              self.header_timeout_s)
            self.transport.close()


def header_timeout_protocol(header_timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class (uvicorn ``Config(http=...)``) with this header timeout (seconds, finite > 0)."""
    if not 0 < header_timeout_s < math.inf:
        raise ValueError(f"header_timeout_s (--header-timeout-s) must be a finite number of seconds > 0, "
                         f"got {header_timeout_s}")
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": float(header_timeout_s)})


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
    header_timeout_s: float = HEADER_TIMEOUT_S,
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
    (their spend is still recorded). ``header_timeout_s``: a connection's request headers must
    arrive within this long (module docstring). These, ``budget`` (a finite number >= 0),
    ``batch_window_ms`` (finite, >= 0), ``max_batch`` and ``workers`` (>= 1) are checked
    (ValueError naming the flag) before anything is loaded. ``int8``: dynamically quantise the artifact's encoder's linear layers to int8.
    ``controller``: keep the mean spend at the budget on live traffic with the online λ controller
    (:mod:`cascade_routing.policies.controller`); None (default) serves the fitted λ unchanged.
    ``upstream_pools``: HTTP connection pools the backend calls are spread over
    (:func:`~cascade_routing.serving.backends.pooled_client`). ``workers`` > 1: that many server
    processes share the port (:mod:`cascade_routing.serving.workers`; the spend store must be a
    file or Redis). ``reuse_port``: bind with ``SO_REUSEPORT``, so other processes may listen on the
    same address (what each worker does).

    ``host:port`` is bound (with ``workers`` > 1: checked free) right after the settings checks,
    before the artifact loads: a port already taken is a ``RuntimeError`` naming it
    (:func:`bound_socket`) within moments, not after the load.
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
    check_serve_settings(budget, batch_window_ms, max_batch, workers, compute_threads=compute_threads,
                         upstream_pools=upstream_pools, torch_threads=torch_threads)
    protocol = header_timeout_protocol(header_timeout_s)
    limits = dataclasses.replace(limits or ServerLimits(), shutdown_timeout_s=shutdown_timeout_s)
    if workers != 1:
        from cascade_routing.serving.workers import run_workers

        if port == 0:
            raise ValueError("several workers need a fixed --port (with port 0 each would listen on its own)")
        if (store or "").startswith("memory://"):
            raise ValueError("several workers need a shared spend store (sqlite:///FILE or redis://...), "
                             "not memory://, or each would keep its own accounts")
        bound_socket(host, port).close()  # taken (by anyone, SO_REUSEPORT or not): fail here, not in N workers
        parameters = inspect.signature(serve).parameters
        settings = {k: v for k, v in locals().items() if k in parameters}
        return run_workers(workers, serve, {**settings, "workers": 1, "reuse_port": True})

    sock = bound_socket(host, port, reuse_port=reuse_port)
    executor = bind_executor = None
    try:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        keys = load_keys(api_keys)
        executor = ThreadPoolExecutor(max_workers=compute_threads, thread_name_prefix="routing")
        bind_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="binding") if bind_thread else None
        router = CascadeRouter.from_checkpoint(checkpoint, budget=budget, strategy=strategy, name=name,
                                               executor=executor, bind_executor=bind_executor, int8=int8)
        if controller is not None and lambda_is_zero(router.fitted_for(budget)[1]):
            log.warning("--budget-controller cannot act at budget %s: its fitted λ is 0 (the policy spends "
                        "without a price there, and a multiple of 0 is 0); spend is not controlled", budget)
        pool = BackendPool.from_yaml(backends, connection_pools=upstream_pools)
        app = create_app(router, pool, budget, max_batch=max_batch, batch_window_ms=batch_window_ms, limits=limits,
                         keys=keys, store=open_store(store), controller=controller)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                                timeout_keep_alive=max(1, int(keep_alive_s)),
                                timeout_graceful_shutdown=int(math.ceil(limits.shutdown_timeout_s)), backlog=4096)
        DrainingServer(config).run(sockets=[sock])
    finally:
        sock.close()
        for threads in (executor, bind_executor):
            if threads is not None:
                threads.shutdown(wait=False, cancel_futures=True)
    return 0


def check_serve_settings(budget: float, batch_window_ms: float, max_batch: int, workers: int,
                         compute_threads: int = 1, upstream_pools: int = 1, torch_threads: int | None = None) -> None:
    """ValueError naming the ``serve`` flag of the first setting out of range: ``--budget`` (a finite
    number >= 0), ``--batch-window-ms`` (finite, >= 0), ``--max-batch``, ``--workers``,
    ``--compute-threads``, ``--upstream-pools`` and ``--torch-threads`` (unless None) (>= 1)."""
    try:
        check_budget(budget)
    except ValueError as err:
        raise ValueError(f"--budget: {err}") from None
    if not 0 <= batch_window_ms < math.inf:
        raise ValueError(f"batch_window_ms (--batch-window-ms) must be a finite number >= 0, got {batch_window_ms}")
    counts = [("max_batch", max_batch), ("workers", workers), ("compute_threads", compute_threads),
              ("upstream_pools", upstream_pools)] + ([("torch_threads", torch_threads)] if torch_threads is not None else [])
    for name, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be an integer >= 1, got {value}")


def bound_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (``SO_REUSEADDR``; with ``reuse_port`` also
    ``SO_REUSEPORT``: Linux spreads connections over every process listening this way on the
    address), not yet listening (uvicorn listens on it); ``RuntimeError`` naming ``host:port`` and
    why when it cannot be bound (in use, not an address of this machine, a privileged port)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise RuntimeError(f"serve cannot listen on {host}:{port}: {err.strerror or err}") from err
    return sock


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """:func:`bound_socket` with ``SO_REUSEPORT`` (what each ``serve --workers N`` process binds)."""
    return bound_socket(host, port, reuse_port=True)


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

    ``with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")``; request headers must arrive
    within ``header_timeout_s`` (:class:`HeaderTimeoutH11Protocol`); startup is bounded by
    ``timeout_s``, shutdown by the app's ``limits.shutdown_timeout_s`` (1 s for other apps) plus
    ``timeout_s``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0,
                 log_level: str = "warning", header_timeout_s: float = HEADER_TIMEOUT_S) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        limits = getattr(getattr(app, "state", None), "limits", None)
        grace = math.ceil(limits.shutdown_timeout_s) if limits is not None else 1
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=grace,
                                backlog=4096, timeout_keep_alive=int(KEEP_ALIVE_S),
                                http=header_timeout_protocol(header_timeout_s))
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
