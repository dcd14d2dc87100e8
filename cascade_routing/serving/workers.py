"""Several server processes on one port (``serve --workers N``).

One ``serve`` process routes at most about 1 / (its CPU per request) requests per second: its
event loop and compute thread share one interpreter. :func:`run_workers` starts ``N`` copies of the
server in child processes (``spawn``: each loads its own artifact); each binds the same address with
``SO_REUSEPORT`` and the kernel spreads new connections over them. They share what lives in the
spend store (accounts, key limits; so the store must be a file or Redis, not ``memory://``); each
keeps its own batching, in-flight count, metrics and budget controller.

The parent only supervises: SIGTERM or SIGINT to it is passed on as one SIGTERM to every worker,
which then drains as a single server does (``shutdown_timeout_s``); the workers run in their own
sessions, so a terminal's Ctrl-C reaches them once, through the parent. If a worker exits on its
own (a crash, a port it could not bind), the parent stops the others and reports failure. If the
parent itself is killed (SIGKILL), Linux sends each worker a SIGTERM (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from typing import Any, Callable

log = logging.getLogger("cascade_routing.serving")


def _child(target: Callable[..., None], kwargs: dict[str, Any], parent: int) -> None:
    os.setsid()  # a terminal's SIGINT reaches the parent only; it forwards one SIGTERM
    _terminate_with_parent(parent)
    target(**kwargs)


def _terminate_with_parent(parent: int) -> None:
    """Ask Linux for a SIGTERM when the parent dies (``PR_SET_PDEATHSIG``), so a supervisor killed
    with SIGKILL leaves no worker holding the port; elsewhere nothing is set up."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_workers(count: int, target: Callable[..., None], kwargs: dict[str, Any]) -> int:
    """Run ``target(**kwargs)`` in ``count`` child processes until they exit; returns 0 when they were
    stopped by a signal to this process (or all exited cleanly), 1 when one exited on its own first.
    ``target`` must be importable (``spawn``) and ``kwargs`` picklable."""
    if count < 1:
        raise ValueError(f"workers must be >= 1, got {count}")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(target, kwargs, os.getpid()), name=f"cascade-routing-worker-{k}")
             for k in range(count)]
    signalled = False
    failed = False

    def stop_all() -> None:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal signalled
        if not signalled:
            signalled = True
            stop_all()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(0.2)
            if not signalled and not failed and any(p.exitcode is not None for p in procs):
                gone = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode is not None]
                log.error("worker exited on its own: %s; stopping the others", ", ".join(gone))
                failed = True
                stop_all()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 1 if failed else 0
