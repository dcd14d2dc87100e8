"""`cascade-routing` subcommands of the serving stage: ``serve`` and ``replay-backend``.

Each wraps a public function: :func:`cascade_routing.serving.server.serve` and
:func:`cascade_routing.serving.replay.replay_backend`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _failure(text: str) -> tuple[str, str]:
    from cascade_routing.serving.replay import FAILURE_MODES

    model, sep, mode = text.rpartition("=")
    if not sep or not model or mode not in FAILURE_MODES:
        raise argparse.ArgumentTypeError(f"expected MODEL=MODE with MODE in {FAILURE_MODES}, got {text!r}")
    return model, mode


def _fractions(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=FRACTION,..., got {text!r}") from None
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=FRACTION,..., got {text!r}")
    return out


def _show_warning(message: "Warning | str", category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for ``serve``: one ``WARNING <Category>: <message>`` line on stderr
    (no source file and line), for its startup checks (a budget above the fitted table, backends the
    checkpoint lacks, prices far from the checkpoint's) and for warnings while it serves."""
    print(f"WARNING {category.__name__}: {message}", file=file or sys.stderr, flush=True)


def _serve(args: argparse.Namespace) -> int:
    import warnings

    from cascade_routing.policies.controller import ControllerConfig
    from cascade_routing.serving.limits import ServerLimits
    from cascade_routing.serving.runner import serve
    from cascade_routing.serving.store import DEFAULT_STORE

    given = {k: getattr(args, k) for k in ("max_body_bytes", "max_prompt_chars", "max_concurrent", "deadline_s",
                                           "max_upstream_attempts", "body_timeout_s") if getattr(args, k) is not None}
    limits = ServerLimits(**given)
    controller = None
    if args.budget_controller:
        controller = ControllerConfig(window=args.controller_window, k_p=args.controller_kp,
                                      k_i=args.controller_ki, max_factor=args.controller_max_factor)
    with warnings.catch_warnings():  # restores showwarning when the server stops (or an in-process caller's)
        warnings.showwarning = _show_warning
        return serve(args.checkpoint, args.backends, args.budget, strategy=args.strategy, host=args.host,
                     port=args.port, name=args.name, log_level=args.log_level, compute_threads=args.compute_threads,
                     bind_thread=args.bind_thread, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                     torch_threads=args.torch_threads or None, limits=limits, api_keys=args.api_keys,
                     store=args.store or DEFAULT_STORE, keep_alive_s=args.keep_alive_s,
                     shutdown_timeout_s=args.shutdown_timeout_s, int8=args.int8, controller=controller,
                     upstream_pools=args.upstream_pools, workers=args.workers, header_timeout_s=args.header_timeout_s)


def _replay(args: argparse.Namespace) -> int:
    from cascade_routing.serving.replay import replay_backend

    replay_backend(
        args.dataset, split=args.split, split_fractions=args.split_fractions, seed=args.seed, host=args.host,
        port=args.port, latency_ms=args.latency_ms, jitter_ms=args.jitter_ms, failures=dict(args.fail),
        slow_ms=args.slow_ms, write_backends=args.write_backends, log_level=args.log_level,
    )
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add this stage's subcommands (each sets `func`)."""
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible cascade-routing server over real model endpoints",
        description="Serve POST /v1/chat/completions (model = --name; stream: true as SSE), GET /v1/models[/ID], "
                    "GET /health, GET /v1/routing/stats and GET /metrics (Prometheus), routing each query among "
                    "the backends with a checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, help="estimator artifact (.safetensors) with fitted λ tables")
    p.add_argument("--backends", required=True, help="backends YAML (see cascade_routing/configs/backends.example.yaml)")
    p.add_argument("--budget", required=True, type=float, help="mean cost budget per query, USD (finite, >= 0)")
    p.add_argument("--strategy", default="cascade_routing",
                   choices=["cascade_routing", "routing", "threshold_cascade", "optimal_cascade"])
    p.add_argument("--name", default="cascade-routing", help="the model name clients send")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--compute-threads", type=int, default=1,
                   help="worker threads for the estimators/policy (1: serialised, loop stays free)")
    p.add_argument("--bind-thread", action=argparse.BooleanOptionalAction, default=True,
                   help="encode new queries on a thread of their own, so bound requests keep deciding meanwhile")
    p.add_argument("--max-batch", type=int, default=64,
                   help="route up to this many concurrent requests together (1: one at a time)")
    p.add_argument("--batch-window-ms", type=float, default=2.0, help="wait this long to fill a batch")
    p.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--int8", action="store_true",
                   help="quantise the artifact's carried encoder (e.g. a distilled student) to int8")
    p.add_argument("--api-keys", default=None, metavar="YAML",
                   help="require bearer keys from this file (default: $CASCADE_ROUTING_API_KEYS if set, else none)")
    p.add_argument("--store", default=None,
                   help="spend accounts: sqlite:///PATH (default sqlite:///cascade-routing-spend.sqlite), "
                        "redis://HOST:PORT/DB or memory://")
    p.add_argument("--max-body-bytes", type=int, default=None, help="(default 1 MiB) larger request bodies get 413")
    p.add_argument("--max-prompt-chars", type=int, default=None, help="(default 100,000) more message text gets 400")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="(default 256) chat requests served at once; more get 429 with Retry-After")
    p.add_argument("--deadline-s", type=float, default=None, help="(default 120) per-request deadline (504 when exceeded)")
    p.add_argument("--body-timeout-s", type=float, default=None,
                   help="(default 30) the request body must arrive within this many seconds, else 408; it is "
                        "read before the request takes a concurrency slot")
    p.add_argument("--max-upstream-attempts", type=int, default=None,
                   help="(default 8) backend HTTP attempts per request, retries included")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port (SO_REUSEPORT; each loads the artifact; the spend "
                        "store must be sqlite:// or redis://)")
    p.add_argument("--upstream-pools", type=int, default=8,
                   help="HTTP connection pools the backend calls are spread over (512 connections in all; "
                        "one pool costs CPU per call in proportion to its open connections)")
    p.add_argument("--keep-alive-s", type=float, default=75.0,
                   help="idle keep-alive of client connections (keep above the clients' own)")
    p.add_argument("--header-timeout-s", type=float, default=10.0,
                   help="a connection's request line and headers must arrive within this many seconds of its "
                        "opening (or of its next request's first byte), else it is closed (slowloris)")
    p.add_argument("--shutdown-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, let requests in flight finish this long, then cancel them")
    p.add_argument("--budget-controller", action="store_true",
                   help="adjust λ online so the realised mean spend meets the budget on shifted traffic")
    p.add_argument("--controller-window", type=int, default=50, help="requests in the spend window")
    p.add_argument("--controller-kp", type=float, default=0.5, help="proportional gain (log λ)")
    p.add_argument("--controller-ki", type=float, default=0.05, help="integral gain per request (log λ)")
    p.add_argument("--controller-max-factor", type=float, default=30.0,
                   help="λ stays within [fitted / F, fitted x F]")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_serve)

    r = subparsers.add_parser(
        "replay-backend", help="OpenAI-compatible endpoints answering from a dataset's recorded responses",
        description="Serve POST /<model>/v1/chat/completions for every model of a dataset, answering by the "
                    "exact text of the last user message with the recorded response, tokens and cost.",
    )
    r.add_argument("--dataset", required=True, help="dataset name or saved dataset folder")
    r.add_argument("--split", default=None, help="serve only this split (e.g. test)")
    r.add_argument("--split-fractions", type=_fractions, default=None,
                   help="e.g. train=0.6,calibration=0.2,test=0.2 (the default)")
    r.add_argument("--seed", type=int, default=0, help="split seed")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=8100)
    r.add_argument("--latency-ms", type=float, default=0.0, help="added latency per answer")
    r.add_argument("--jitter-ms", type=float, default=0.0, help="extra uniform random latency in [0, J]")
    r.add_argument("--fail", type=_failure, action="append", default=[], metavar="MODEL=MODE",
                   help="simulate a failing model: down, 500 or slow (repeatable)")
    r.add_argument("--slow-ms", type=float, default=30_000.0, help="latency of a 'slow' model")
    r.add_argument("--write-backends", default=None, metavar="YAML",
                   help="write a backends YAML pointing at this server, for `serve --backends`")
    r.add_argument("--log-level", default="info")
    r.set_defaults(func=_replay)
