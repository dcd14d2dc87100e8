"""Replay backend: one OpenAI-compatible endpoint per model answering from a dataset's recordings.

``POST /<model>/v1/chat/completions`` looks the query up by the EXACT text of the last user message
(a query whose text occurs in several rows answers from the first of them; the number of such
texts is logged and exposed as ``app.state.duplicate_texts``) and returns the recorded response
of that model with:

- ``usage``: the recorded ``tokens_in``/``tokens_out`` features when the dataset has them, else
  estimated from the text as ``ceil(chars / 4)``;
- ``x_cost_usd``: the recorded cost of that (query, model) cell, and ``x_recorded_features``: its
  recorded numeric features (backends configured with ``trust_reported_cost: true`` use the
  former; every backend lets the latter override measured features), so routing through the
  replay reproduces the offline simulation exactly;
- a configurable latency (``latency_ms`` fixed, plus uniform ``jitter_ms``);
- the request's parameters echoed: ``x_received`` in the body (everything but ``messages`` and
  ``model``) and the last 1,000 requests in ``app.state.received``; ``n`` choices (each the
  recorded answer; usage and cost n times the recorded completion); with ``tools`` (and
  ``tool_choice`` not ``"none"``) the answer is a call of the chosen (else first) function with
  arguments ``{"answer": <recorded text>}`` and ``finish_reason: "tool_calls"``;
- ``stream: true``: SSE chunks (:mod:`cascade_routing.serving.streaming`), the content in
  ``stream_pieces`` pieces with the latency spread evenly before them (first token after
  latency / pieces), ``x_cost_usd``/``x_recorded_features`` on the finish chunks, a usage chunk when
  ``stream_options.include_usage``.

Unknown text -> 404, unknown model -> 404, malformed body -> 400 (OpenAI error shape). ``GET
/<model>/v1/models`` and ``GET /health`` exist too.

Failure simulation per model (``failures={model: mode}``; mutable at run time through
``app.state.failures``): ``"500"`` answers HTTP 500; ``"slow"`` waits ``slow_ms`` before answering
(past a client's timeout); ``"down"`` answers 503 if reached, and :func:`backends_document` points
that model's ``base_url`` at a closed local port so a client sees a refused connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import time
import uuid
from pathlib import Path
from collections import deque
from typing import Any, AsyncIterator, Mapping

import numpy as np
import yaml
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from cascade_routing.data.converters.routellm import estimate_tokens as text_tokens
from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.data.prices import nonneg_lstsq
from cascade_routing.serving.streaming import DONE, ChunkWriter, message_deltas, split_text, sse

log = logging.getLogger(__name__)

FAILURE_MODES = ("down", "500", "slow")


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": code}}, status_code=status)


def _last_user_text(body: Any) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    for msg in reversed(body["messages"]):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                return "\n".join(p for p in parts if isinstance(p, str))
    return None


def estimate_tokens(text: str) -> int:
    """Rough token count when none is recorded: the data layer's ``ceil(chars / 4)``, at least 1."""
    return max(1, text_tokens(text))


def _check_failures(dataset: RoutingDataset, failures: Mapping[str, str] | None) -> dict[str, str]:
    """``failures`` as a dict, each naming a model of ``dataset`` and one of :data:`FAILURE_MODES`."""
    failures = dict(failures or {})
    for model, mode in failures.items():
        if model not in dataset.models:
            raise ValueError(f"failure set for unknown model {model!r}; dataset models: {dataset.models}")
        if mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r} for {model!r}; use one of {FAILURE_MODES}")
    return failures


def _text_index(dataset: RoutingDataset) -> tuple[dict[str, int], int]:
    """``query text -> first row`` with that text, and how many rows repeat an earlier text (logged)."""
    index: dict[str, int] = {}
    duplicates = 0
    for i, text in enumerate(dataset.queries):
        if text in index:
            duplicates += 1
        else:
            index[text] = i
    if duplicates:
        log.warning("replay %s: %d query rows repeat an earlier text; those answer from the first row",
                    dataset.name, duplicates)
    return index, duplicates


class _Replay:
    """The replay's lookup tables and its chat handler (module docstring); run-time settings
    (failures, latency, stream pieces, counters) live in ``app.state``."""

    def __init__(self, app: FastAPI, dataset: RoutingDataset, jitter_ms: float, slow_ms: float, seed: int) -> None:
        self.app, self.dataset = app, dataset
        self.index, self.duplicates = _text_index(dataset)
        self.models = {m: j for j, m in enumerate(dataset.models)}
        self.rng = random.Random(seed)
        self.jitter_ms, self.slow_ms = jitter_ms, slow_ms

    async def chat(self, model: str, request: Request) -> Response:
        """One chat completion: the simulated failure of ``model`` if set, else the recorded answer
        of the request's last user message, after the configured latency, streamed if asked."""
        state, dataset = self.app.state, self.dataset
        if model not in self.models:
            return _error(404, f"unknown model {model!r}; replay models: {dataset.models}", "model_not_found")
        state.requests[model] += 1
        mode = state.failures.get(model)
        if mode == "500":
            return JSONResponse({"error": {"message": f"simulated failure of {model}", "type": "server_error",
                                           "param": None, "code": None}}, status_code=500)
        if mode == "down":
            return _error(503, f"{model} is down (simulated)")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(400, f"malformed JSON body: {err}")
        text = _last_user_text(body)
        if text is None:
            return _error(400, "no user message in 'messages'")
        row = self.index.get(text)
        if row is None:
            return _error(404, f"query not in the recorded dataset {dataset.name!r}: {text[:80]!r}", "unknown_query")
        delay = state.latency_ms + (self.rng.uniform(0, self.jitter_ms) if self.jitter_ms > 0 else 0.0)
        if mode == "slow":
            delay = max(delay, self.slow_ms)
        received = {k: v for k, v in body.items() if k not in ("messages", "model")}
        reply = self._reply(model, row, text, body, received)
        if reply is None:
            return JSONResponse({"error": {"message": f"no recorded response of {model} for this query",
                                           "type": "server_error", "param": None, "code": None}}, status_code=500)
        state.received.append({"model": model, "query": text, **received})
        if body.get("stream"):
            stream_delay = delay
            if mode == "slow":  # nothing at all until the client has given up
                await asyncio.sleep(delay / 1000.0)
                stream_delay = 0.0
            options = body.get("stream_options") or {}
            return StreamingResponse(
                _replay_chunks(*reply, bool(options.get("include_usage")), state.stream_pieces, stream_delay),
                media_type="text/event-stream")
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)
        head, message, finish, n, usage, extra = reply
        return JSONResponse({
            **head,
            "object": "chat.completion",
            "choices": [{"index": i, "message": message, "finish_reason": finish, "logprobs": None}
                        for i in range(n)],
            "usage": usage,
            **extra,
        })

    def _reply(self, model: str, row: int, text: str, body: dict[str, Any], received: dict[str, Any]
               ) -> tuple[dict[str, Any], dict[str, Any], str, int, dict[str, int], dict[str, Any]] | None:
        """(head, message, finish reason, n, usage, ``x_*`` extras) of the recorded answer of ``model``
        to ``row``, or None when the dataset has no response in that cell."""
        dataset, j = self.dataset, self.models[model]
        response = dataset.responses[row, j]
        if response is None:
            return None
        response = str(response)
        feats = {k: float(v[row, j]) for k, v in dataset.features.items()}
        tokens_in = int(round(feats["tokens_in"])) if "tokens_in" in feats else estimate_tokens(text)
        tokens_out = int(round(feats["tokens_out"])) if "tokens_out" in feats else estimate_tokens(response)
        n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
        message = _replay_message(response, body.get("tools"), body.get("tool_choice"), row)
        finish = "tool_calls" if "tool_calls" in message else "stop"
        usage = {"prompt_tokens": tokens_in, "completion_tokens": n * tokens_out,
                 "total_tokens": tokens_in + n * tokens_out}
        extra = {"x_cost_usd": n * float(dataset.cost[row, j]), "x_recorded_features": feats,
                 "x_received": received}
        head = {"id": f"chatcmpl-replay-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        return head, message, finish, n, usage, extra


def create_replay_app(
    dataset: RoutingDataset,
    latency_ms: float = 0.0,
    jitter_ms: float = 0.0,
    failures: Mapping[str, str] | None = None,
    slow_ms: float = 30_000.0,
    seed: int = 0,
    stream_pieces: int = 8,
) -> FastAPI:
    """The replay app for ``dataset`` (see module docstring)."""
    if dataset.responses is None:
        raise ValueError(f"dataset {dataset.name!r} has no recorded responses; the replay backend needs them")
    failures = _check_failures(dataset, failures)
    app = FastAPI(title=f"cascade-routing replay of {dataset.name}")
    replay = _Replay(app, dataset, jitter_ms, slow_ms, seed)
    app.state.dataset = dataset
    app.state.failures = failures
    app.state.duplicate_texts = replay.duplicates
    app.state.requests = {m: 0 for m in dataset.models}
    app.state.latency_ms = float(latency_ms)
    app.state.stream_pieces = int(stream_pieces)
    app.state.received = deque(maxlen=1000)  # the last requests' parameters, for tests and debugging

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "dataset": dataset.name, "models": dataset.models,
                "queries": dataset.num_queries, "failures": app.state.failures, "requests": app.state.requests}

    @app.get("/{model}/v1/models")
    async def list_models(model: str) -> JSONResponse:
        if model not in replay.models:
            return _error(404, f"unknown model {model!r}", "model_not_found")
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "replay"}]})

    @app.post("/{model}/v1/chat/completions")
    async def chat(model: str, request: Request) -> Response:
        return await replay.chat(model, request)

    return app


def _replay_message(response: str, tools: Any, tool_choice: Any, row: int) -> dict[str, Any]:
    """The recorded answer as an assistant message; when the request offers ``tools`` (and
    ``tool_choice`` is not ``"none"``), a call of the chosen (else the first) function with
    arguments ``{"answer": <recorded text>}``, so tool forwarding is visible to the client."""
    if not isinstance(tools, list) or not tools or tool_choice == "none":
        return {"role": "assistant", "content": response}
    name = None
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
    if name is None:
        first = tools[0] if isinstance(tools[0], dict) else {}
        name = (first.get("function") or {}).get("name", "tool")
    call = {"id": f"call_replay_{row}", "type": "function",
            "function": {"name": name, "arguments": json.dumps({"answer": response})}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


async def _replay_chunks(head: dict[str, Any], message: dict[str, Any], finish: str, n: int, usage: dict[str, Any],
                         extra: dict[str, Any], include_usage: bool, pieces: int, delay_ms: float
                         ) -> AsyncIterator[bytes]:
    """The answer as SSE chunks: ``pieces`` content pieces per choice, the latency spread evenly
    before them (the first token arrives after ``delay_ms / pieces``); finish chunks carry the
    replay's ``x_*`` fields; a usage chunk if asked for."""
    writer = ChunkWriter(head["model"], include_usage, head["id"], head["created"])
    content = message.get("content") or ""
    size = max(1, -(-len(content) // max(1, pieces)))
    yield sse(writer.role())
    for k, piece in enumerate(split_text(content, size) if content else []):
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / max(1, pieces) / 1000.0)
        for i in range(n):
            yield sse(writer.delta({"content": piece}, i))
    if not content and delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000.0)
    for i in range(n):
        for delta in message_deltas({"tool_calls": message.get("tool_calls")}):
            yield sse(writer.delta(delta, i))
    for i in range(n):
        yield sse({**writer.finish(finish, i), **extra})
    if include_usage:
        yield sse(writer.usage(usage))
    yield DONE


def closed_port(host: str = "127.0.0.1") -> int:
    """A local port with nothing listening (bound then released) for simulating a down backend."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _fit_prices(dataset: RoutingDataset, j: int) -> tuple[float, float]:
    """USD per input/output token for model j: non-negative least squares of the recorded cost on
    recorded (or text-estimated) token counts (the cost model's fit,
    :func:`~cascade_routing.data.prices.nonneg_lstsq`). Informational only when the cost is trusted."""
    if "tokens_in" in dataset.features and "tokens_out" in dataset.features:
        t_in, t_out = dataset.features["tokens_in"][:, j], dataset.features["tokens_out"][:, j]
    else:
        t_in = np.array([estimate_tokens(q) for q in dataset.queries], dtype=np.float64)
        t_out = np.array([estimate_tokens(str(r or "")) for r in dataset.responses[:, j]], dtype=np.float64)
    return nonneg_lstsq(t_in, t_out, dataset.cost[:, j])


def backends_document(
    dataset: RoutingDataset,
    base_url: str,
    failures: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
    max_retries: int = 1,
    backoff_s: float = 0.05,
    max_concurrency: int = 64,
) -> dict[str, Any]:
    """A backends YAML document (as a dict) pointing every model at the replay server ``base_url``."""
    failures = dict(failures or {})
    down_url = f"http://127.0.0.1:{closed_port()}"
    entries = []
    for j, model in enumerate(dataset.models):
        price_in, price_out = _fit_prices(dataset, j)
        root = down_url if failures.get(model) == "down" else base_url.rstrip("/")
        entries.append({
            "name": model,
            "base_url": f"{root}/{model}/v1",
            "model_id": model,
            "price_per_input_token": price_in,
            "price_per_output_token": price_out,
            "trust_reported_cost": True,
        })
    return {
        "defaults": {"timeout_s": timeout_s, "max_retries": max_retries, "backoff_s": backoff_s,
                     "max_concurrency": max_concurrency},
        "models": entries,
    }


def write_backends_yaml(dataset: RoutingDataset, base_url: str, path: "str | os.PathLike[str]",
                        **kwargs: Any) -> Path:
    """Write :func:`backends_document` to ``path`` (YAML)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = backends_document(dataset, base_url, **kwargs)
    header = f"# Backends served by `cascade-routing replay-backend` for dataset {dataset.name!r}\n"
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return path


def replay_backend(
    dataset: str,
    split: str | None = None,
    split_fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    host: str = "127.0.0.1",
    port: int = 8100,
    latency_ms: float = 0.0,
    jitter_ms: float = 0.0,
    failures: Mapping[str, str] | None = None,
    slow_ms: float = 30_000.0,
    write_backends: "str | os.PathLike[str] | None" = None,
    log_level: str = "info",
) -> None:
    """Load ``dataset`` (optionally one split of it), bind ``host:port`` (RuntimeError if it is taken;
    port 0: a free one), then optionally write a backends YAML pointing at this server (only once the
    port is ours, so a failed start leaves no file pointing at someone else's port), and serve the
    replay endpoints until interrupted (blocking). Idle client connections are kept as long as
    ``serve`` keeps its own (uvicorn's 5 s default equals httpx's idle expiry, and a request sent on
    a connection the server is closing is lost)."""
    import uvicorn

    from cascade_routing.data import load_dataset
    from cascade_routing.serving.server import KEEP_ALIVE_S

    data = load_dataset(dataset)
    if split is not None:
        fractions = dict(split_fractions or {"train": 0.6, "calibration": 0.2, "test": 0.2})
        parts = data.split(fractions, seed=seed)
        if split not in parts:
            raise ValueError(f"unknown split {split!r}; have {sorted(parts)}")
        data = parts[split]
    app = create_replay_app(data, latency_ms, jitter_ms, failures, slow_ms, seed)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise RuntimeError(f"replay-backend cannot listen on {host}:{port}: {err.strerror}") from err
        if write_backends is not None:
            bound = sock.getsockname()[1]
            url_host = f"[{host}]" if ":" in host else host
            path = write_backends_yaml(data, f"http://{url_host}:{bound}", write_backends, failures=failures)
            print(f"wrote backends for {len(data.models)} models to {path}")
        config = uvicorn.Config(app, log_level=log_level, timeout_keep_alive=int(KEEP_ALIVE_S), backlog=4096)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
