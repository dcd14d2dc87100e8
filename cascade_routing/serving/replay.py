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
- a configurable latency (``latency_ms`` fixed, plus uniform ``jitter_ms``).

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
from typing import Any, Mapping

import numpy as np
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cascade_routing.data.converters.routellm import estimate_tokens as text_tokens
from cascade_routing.data.dataset import RoutingDataset

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


def create_replay_app(
    dataset: RoutingDataset,
    latency_ms: float = 0.0,
    jitter_ms: float = 0.0,
    failures: Mapping[str, str] | None = None,
    slow_ms: float = 30_000.0,
    seed: int = 0,
) -> FastAPI:
    """The replay app for ``dataset`` (see module docstring)."""
    if dataset.responses is None:
        raise ValueError(f"dataset {dataset.name!r} has no recorded responses; the replay backend needs them")
    failures = dict(failures or {})
    for model, mode in failures.items():
        if model not in dataset.models:
            raise ValueError(f"failure set for unknown model {model!r}; dataset models: {dataset.models}")
        if mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r} for {model!r}; use one of {FAILURE_MODES}")
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
    models = {m: j for j, m in enumerate(dataset.models)}
    rng = random.Random(seed)

    app = FastAPI(title=f"cascade-routing replay of {dataset.name}")
    app.state.dataset = dataset
    app.state.failures = failures
    app.state.duplicate_texts = duplicates
    app.state.requests = {m: 0 for m in dataset.models}
    app.state.latency_ms = float(latency_ms)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "dataset": dataset.name, "models": dataset.models,
                "queries": dataset.num_queries, "failures": app.state.failures, "requests": app.state.requests}

    @app.get("/{model}/v1/models")
    async def list_models(model: str) -> JSONResponse:
        if model not in models:
            return _error(404, f"unknown model {model!r}", "model_not_found")
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "replay"}]})

    @app.post("/{model}/v1/chat/completions")
    async def chat(model: str, request: Request) -> JSONResponse:
        if model not in models:
            return _error(404, f"unknown model {model!r}; replay models: {dataset.models}", "model_not_found")
        app.state.requests[model] += 1
        mode = app.state.failures.get(model)
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
        row = index.get(text)
        if row is None:
            return _error(404, f"query not in the recorded dataset {dataset.name!r}: {text[:80]!r}", "unknown_query")
        delay = app.state.latency_ms + (rng.uniform(0, jitter_ms) if jitter_ms > 0 else 0.0)
        if mode == "slow":
            delay = max(delay, slow_ms)
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)
        j = models[model]
        response = dataset.responses[row, j]
        if response is None:
            return JSONResponse({"error": {"message": f"no recorded response of {model} for this query",
                                           "type": "server_error", "param": None, "code": None}}, status_code=500)
        response = str(response)
        feats = {k: float(v[row, j]) for k, v in dataset.features.items()}
        tokens_in = int(round(feats["tokens_in"])) if "tokens_in" in feats else estimate_tokens(text)
        tokens_out = int(round(feats["tokens_out"])) if "tokens_out" in feats else estimate_tokens(response)
        return JSONResponse({
            "id": f"chatcmpl-replay-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": response},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                      "total_tokens": tokens_in + tokens_out},
            "x_cost_usd": float(dataset.cost[row, j]),
            "x_recorded_features": feats,
        })

    return app


def closed_port(host: str = "127.0.0.1") -> int:
    """A local port with nothing listening (bound then released) for simulating a down backend."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _fit_prices(dataset: RoutingDataset, j: int) -> tuple[float, float]:
    """USD per input/output token for model j: least squares of the recorded cost on recorded
    (or text-estimated) token counts, clamped at 0. Informational only when the cost is trusted."""
    if "tokens_in" in dataset.features and "tokens_out" in dataset.features:
        t_in, t_out = dataset.features["tokens_in"][:, j], dataset.features["tokens_out"][:, j]
    else:
        t_in = np.array([estimate_tokens(q) for q in dataset.queries], dtype=np.float64)
        t_out = np.array([estimate_tokens(str(r or "")) for r in dataset.responses[:, j]], dtype=np.float64)
    x = np.stack([t_in, t_out], 1)
    sol, *_ = np.linalg.lstsq(x, dataset.cost[:, j], rcond=None)
    return max(0.0, float(sol[0])), max(0.0, float(sol[1]))


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
    """Load ``dataset`` (optionally one split of it), optionally write a backends YAML pointing at
    this server, and serve the replay endpoints until interrupted (blocking)."""
    import uvicorn

    from cascade_routing.data import load_dataset

    data = load_dataset(dataset)
    if split is not None:
        fractions = dict(split_fractions or {"train": 0.6, "calibration": 0.2, "test": 0.2})
        parts = data.split(fractions, seed=seed)
        if split not in parts:
            raise ValueError(f"unknown split {split!r}; have {sorted(parts)}")
        data = parts[split]
    if write_backends is not None:
        path = write_backends_yaml(data, f"http://{host}:{port}", write_backends, failures=failures)
        print(f"wrote backends for {len(data.models)} models to {path}")
    app = create_replay_app(data, latency_ms, jitter_ms, failures, slow_ms, seed)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
