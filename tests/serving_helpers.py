"""Small stand-ins for the serving tests: a synthetic dataset with recorded answers and a
text-bound estimator pair implementing the ``cascade_routing.interfaces`` protocols.

The stand-in estimators read ``responses``/``features`` only where ``ran`` (like the learned ones),
so the same binder serves offline simulation (bound to a whole split) and the live router (bound to
one query, arrays filled in place).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.interfaces import QualityEstimate

MODELS = ["small", "medium", "large"]
PRICE_OUT = {"small": 1e-6, "medium": 5e-6, "large": 2.5e-5}  # USD per output token
PRICE_IN = {"small": 2e-7, "medium": 1e-6, "large": 5e-6}


def _unit(text: str, salt: str) -> float:
    """A deterministic number in [0, 1) from text (stable across processes)."""
    h = hashlib.sha256(f"{salt}|{text}".encode()).digest()[:8]
    return int.from_bytes(h, "big") / 2.0**64


def synthetic_dataset(n: int = 60, seed: int = 0) -> RoutingDataset:
    """N queries, 3 models; quality 0/1 (bigger models better), recorded answers contain
    'CORRECT'/'WRONG', token counts and costs = tokens x prices, a log-prob confidence."""
    rng = np.random.default_rng(seed)
    queries = [f"Question {i}: what is {i} plus {i * 7 % 13}?" for i in range(n)]
    p_correct = np.array([0.45, 0.65, 0.85])
    quality = (rng.random((n, 3)) < p_correct).astype(np.float64)
    tokens_in = np.array([[len(q) // 4 + 5] * 3 for q in queries], dtype=np.float64)
    tokens_out = rng.integers(5, 60, size=(n, 3)).astype(np.float64)
    price_in = np.array([PRICE_IN[m] for m in MODELS])
    price_out = np.array([PRICE_OUT[m] for m in MODELS])
    cost = tokens_in * price_in + tokens_out * price_out
    responses = np.empty((n, 3), dtype=object)
    for i in range(n):
        for j, m in enumerate(MODELS):
            verdict = "CORRECT" if quality[i, j] else "WRONG"
            responses[i, j] = f"{m} says {verdict} answer {i} " + "x" * int(tokens_out[i, j])
    confidence = np.log(np.clip(0.5 * quality + 0.5 * rng.random((n, 3)), 1e-6, 1))  # a log-prob
    return RoutingDataset(
        queries=queries, models=list(MODELS), quality=quality, cost=cost, responses=responses,
        features={"tokens_in": tokens_in, "tokens_out": tokens_out, "logprob_confidence": confidence,
                  "latency_ms": rng.uniform(50, 500, size=(n, 3))},
        tasks=["arith"] * n, name="synthetic-serving",
    )


class TextQualityEstimator:
    """Ex-ante: mean from a hash of (query, model) scaled by model size, std 0.25.
    Post-hoc for run models: 0.95 if the answer says CORRECT else 0.05 (blended with the
    log-prob confidence when given), std 0.02; other models shift towards the run answers."""

    def __init__(self, queries, responses, features):
        self.models = list(MODELS)
        self.queries = list(queries)
        self.responses = responses
        self.features = features or {}
        prior = np.array([[0.3 + 0.2 * j + 0.3 * _unit(q, m) for j, m in enumerate(MODELS)] for q in self.queries])
        self.prior = torch.tensor(prior, dtype=torch.float64)

    def estimate(self, queries, ran):
        rows = queries.tolist()
        mean = self.prior[queries].clone()
        std = torch.full_like(mean, 0.25)
        conf = self.features.get("logprob_confidence")
        for b, i in enumerate(rows):
            seen = []
            for j in range(len(self.models)):
                if bool(ran[b, j]):
                    good = "CORRECT" in str(self.responses[i, j])
                    q = 0.95 if good else 0.05
                    if conf is not None and np.isfinite(conf[i, j]):  # NaN: served without one
                        q = 0.8 * q + 0.2 * float(conf[i, j])
                    mean[b, j] = q
                    std[b, j] = 0.02
                    seen.append(q)
            if seen:
                shift = 0.2 * (sum(seen) / len(seen) - 0.5)
                for j in range(len(self.models)):
                    if not bool(ran[b, j]):
                        mean[b, j] = (mean[b, j] + shift).clamp(0, 1)
                        std[b, j] = 0.2
        return QualityEstimate(mean, std)


class TextCostEstimator:
    """Unrun: price_in x (chars / 4 + 5) + price_out x 30; run: the exact ``features['cost']`` or
    the token features x prices."""

    def __init__(self, queries, features):
        self.models = list(MODELS)
        self.queries = list(queries)
        self.features = features or {}

    def estimate(self, queries, ran):
        out = torch.zeros(len(queries), len(self.models), dtype=torch.float64)
        for b, i in enumerate(queries.tolist()):
            for j, m in enumerate(self.models):
                if bool(ran[b, j]) and "cost" in self.features:
                    out[b, j] = float(self.features["cost"][i, j])
                elif bool(ran[b, j]) and "tokens_out" in self.features:
                    out[b, j] = (PRICE_IN[m] * self.features["tokens_in"][i, j]
                                 + PRICE_OUT[m] * self.features["tokens_out"][i, j])
                else:
                    out[b, j] = PRICE_IN[m] * (len(self.queries[i]) // 4 + 5) + PRICE_OUT[m] * 30
        return out


def bind(queries, responses=None, features=None, tasks=None):
    """The stand-in binder with the artifact's ``bind`` signature."""
    n = len(queries)
    if responses is None:
        responses = np.full((n, len(MODELS)), None, dtype=object)
    return TextQualityEstimator(queries, responses, features), TextCostEstimator(queries, features)


def offline_features(ds: RoutingDataset) -> dict[str, np.ndarray]:
    """What offline simulation hands the binder: the recorded features plus the exact cost."""
    return {**ds.features, "cost": ds.cost}


FEATURE_NAMES = ("tokens_in", "tokens_out", "latency_ms", "logprob_confidence", "cost")


def fitted_router(ds, policy, **kwargs):
    """A :class:`CascadeRouter` of ``policy`` over the stand-in estimators (no task input), with λ
    fitted on ``ds`` itself at the middle model's mean cost, which is its budget; ``kwargs`` go to
    the router."""
    from cascade_routing.policies import fit_lambda
    from cascade_routing.serving import CascadeRouter

    budget = float(ds.cost.mean(0)[1])
    qe, ce = bind(ds.queries, ds.responses, offline_features(ds))
    fitted = fit_lambda(policy, qe, ce, ds.quality, ds.cost, budget, queries=ds.queries)
    return CascadeRouter(policy, bind, {budget: fitted}, ds.models, budget=budget, feature_names=FEATURE_NAMES,
                         **kwargs)


def stand_in_router(ds, budgets=None, binder=None, num_samples=64):
    """(router, offline simulation at the default budget, default budget) over the stand-in
    estimators: cascade routing with λ fitted on ``ds`` itself for each of ``budgets`` (default:
    the middle model's mean cost); the default budget is ``budgets[len // 2]``."""
    from cascade_routing.evaluation import simulate
    from cascade_routing.policies import CascadeRouting, fit_lambda, query_uniforms
    from cascade_routing.serving import CascadeRouter

    policy = CascadeRouting(num_samples=num_samples)
    budgets = list(budgets) if budgets is not None else [float(ds.cost.mean(0)[1])]
    qe, ce = bind(ds.queries, ds.responses, offline_features(ds), ds.tasks)
    table = {b: fit_lambda(policy, qe, ce, ds.quality, ds.cost, b, queries=ds.queries) for b in budgets}
    budget = budgets[len(budgets) // 2]
    router = CascadeRouter(policy, binder or bind, table, ds.models, budget=budget, feature_names=FEATURE_NAMES)
    sim = simulate(policy, qe, ce, ds.quality, ds.cost, table[budget], query_uniforms(ds.queries))
    return router, sim, budget


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url, proc, timeout_s, log) -> None:
    """Wait until ``url/health`` answers 200; RuntimeError with the log's tail if ``proc`` exits or time runs out."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy within {timeout_s}s; log:\n{log.read_text()[-3000:]}")


def split_and_fit(ds: RoutingDataset, policy, budget_of):
    """Halve ``ds`` into calibration / test (seed 0) and fit λ of ``policy`` with the stand-in
    estimators on the calibration half at ``budget_of(mean cost per model)``: (fitted, budget, test)."""
    from cascade_routing.policies import fit_lambda

    parts = ds.split({"calibration": 0.5, "test": 0.5}, seed=0)
    cal, test = parts["calibration"], parts["test"]
    qe, ce = bind(cal.queries, cal.responses, offline_features(cal))
    budget = float(budget_of(cal.cost.mean(0)))
    return fit_lambda(policy, qe, ce, cal.quality, cal.cost, budget, queries=cal.queries), budget, test


class ServingStack:
    """Replay backend + cascade-routing server, each a uvicorn thread on 127.0.0.1 (real sockets).

    ``failures`` {model: "down" | "500" | "slow"} is applied to the replay and the backends document
    (a "down" model's base_url points at a closed port). Bounded start/stop (10 s each).
    """

    def __init__(self, ds, router, failures=None, timeout_s=5.0, max_retries=1, latency_ms=0.0,
                 slow_ms=3000.0, budget=None, max_concurrency=64, backend_settings=None, **app_kwargs):
        from cascade_routing.serving.backends import BackendPool, parse_backends
        from cascade_routing.serving.replay import backends_document, create_replay_app
        from cascade_routing.serving.server import BackgroundServer, create_app

        failures = dict(failures or {})
        self.replay_app = create_replay_app(ds, latency_ms=latency_ms, failures=failures, slow_ms=slow_ms)
        self.replay = BackgroundServer(self.replay_app).start()
        try:
            doc = backends_document(ds, self.replay.url, failures=failures, timeout_s=timeout_s,
                                    max_retries=max_retries, backoff_s=0.01, max_concurrency=max_concurrency)
            doc["defaults"].update(backend_settings or {})
            self.pool = BackendPool(parse_backends(doc, "replay"))
            self.app = create_app(router, self.pool, budget, **app_kwargs)
            self.server = BackgroundServer(self.app).start()
        except BaseException:
            self.replay.stop()
            raise
        self.url = self.server.url

    def close(self):
        self.server.stop()
        self.replay.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_tiny_encoder_for(texts, folder):
    """A randomly initialised 2-layer BERT (hidden 32) whose vocabulary covers ``texts`` (no download)."""
    import re
    from pathlib import Path

    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", str(t).lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    return folder


def make_tiny_artifact(ds, folder, strategies=("cascade_routing", "routing"), budgets_per_pair=2, seed=0):
    """A real estimator artifact (untrained randomly initialised network, tiny local encoder) with
    λ tables fitted on the calibration split, saved with ``EstimatorArtifact.save``.

    Returns (path, splits). The splits are ``ds.split({train: .5, calibration: .25, test: .25})``.
    """
    from pathlib import Path

    from cascade_routing.estimators import encoding
    from cascade_routing.estimators.artifact import EstimatorArtifact
    from cascade_routing.estimators.cost import CostModel
    from cascade_routing.policies.registry import make_policy
    from cascade_routing.estimators.network import NetworkConfig, QualityNetwork
    from cascade_routing.evaluation.metrics import sweep_budgets
    from cascade_routing.policies import fit_lambda, query_uniforms

    folder = Path(folder)
    splits = ds.split({"train": 0.5, "calibration": 0.25, "test": 0.25}, seed=seed)
    texts = list(ds.queries) + [str(r) for r in ds.responses.ravel()]
    enc = str(make_tiny_encoder_for(texts, folder / "encoder"))
    vocab = sorted(set(ds.tasks or []))
    torch.manual_seed(seed)
    cfg = NetworkConfig(num_models=ds.num_models, embed_dim=32, num_tasks=len(vocab), hidden=16, dropout=0.0,
                        num_answer_features=4 + ds.num_models)  # compose_features gives 4 + M
    net = QualityNetwork(cfg)
    art = EstimatorArtifact(
        models=list(ds.models), network_config=cfg.to_dict(),
        state_dict={k: v.detach().clone() for k, v in net.state_dict().items()},
        cost_model=CostModel.fit(splits["train"]),
        encoder={"path": enc, "fingerprint": encoding.encoder_fingerprint(enc), "max_length": 64,
                 "answer_max_length": 64, "answer_encoding": "transformer"},
        task_vocabulary=vocab, var_scale=torch.ones(ds.num_models),
        data_config={"dataset": ds.name, "features": sorted(ds.features)},
    )
    cal = splits["calibration"]
    qe, ce = art.bind(cal.queries, cal.responses, offline_features(cal), cal.tasks)
    budgets = sweep_budgets(cal.cost.mean(0), cal.quality.mean(0), budgets_per_pair)
    floor = float(cal.cost.mean(0).min())
    art.fitted = {
        s: {float(b): fit_lambda(make_policy(s), qe, ce, cal.quality, cal.cost, max(float(b), floor),
                                 uniforms=query_uniforms(cal.queries)) for b in budgets}
        for s in strategies
    }
    return art.save(folder / "estimator.safetensors"), splits


class ScriptedBackends:
    """In-process OpenAI-compatible endpoints for ``models`` (``httpx.MockTransport``, no sockets) that
    answer ``"<model> says CORRECT answer <query>"`` (usage 10 in / 20 out tokens, priced as
    :data:`PRICE_IN` / :data:`PRICE_OUT`) or misbehave as ``modes[model]`` says (mutable):

    - ``"400"``, ``"404"``, ``"500"``: that HTTP status with an OpenAI error body (400: ``param``
      ``max_tokens``, ``code`` ``invalid_value``); ``"context_400"``: a 400 ``context_length_exceeded``;
    - ``"negusage"``, ``"strusage"``, ``"listusage"``, ``"infusage"``: a bad ``usage`` (-1000000 prompt
      tokens, ``"abc"``, a list, ``Infinity``);
    - streamed only, after the role chunk and two content pieces: ``"stream_break"`` (the connection
      drops: ``httpx.ReadError``), ``"stream_stall"`` (a read timeout), ``"stream_garbage"`` (a chunk
      that is not JSON), ``"stream_badindex"`` (``"index": "x"``), ``"stream_error"`` (an error event);
      ``"stream_hold"``: the two pieces, then wait until ``release`` is set (then the rest);
    - ``"hold"``: answer (not streamed) only once ``release`` is set; ``"wrong"``: answer
      ``"<model> says WRONG answer <query>"`` (the stand-in estimators then rate it low);
    - odd but legal JSON (streamed: in the first content chunk): ``"nan"`` (a ``NaN`` log-prob),
      ``"surrogate"`` (the answer text ends with the escape of a lone surrogate, ``\\ud800``),
      ``"surrogate400"`` (a 400 whose error message has one), ``"badchoice"`` (a second choice whose
      content is a number); ``"giant"``: an answer of :attr:`GIANT_CHARS` characters; ``"trickle"``:
      a valid answer (not streamed) sent one byte every 10 ms; ``"badgzip"``: an answer declared
      ``Content-Encoding: gzip`` that is not; ``"stream_toolname"``: streamed, the first content chunk
      is a tool call whose function name is a number;
    - ``"stream_long"``: streamed, a healthy answer whose second half arrives in :attr:`LONG_PIECES`
      chunks 20 ms apart.

    ``calls[model]`` counts the requests each endpoint received; ``pool`` is the :class:`BackendPool`;
    ``settings`` are added to the backends document's ``defaults``.
    """

    PIECES = 2
    GIANT_CHARS = 20_000
    LONG_PIECES = 30

    def __init__(self, models=MODELS, modes=None, timeout_s: float = 5.0, max_retries: int = 0,
                 settings=None) -> None:
        import collections
        import threading

        import httpx

        from cascade_routing.serving.backends import BackendPool, parse_backends

        self.modes = dict(modes or {})
        self.calls: collections.Counter = collections.Counter()
        self.release = threading.Event()
        doc = {"defaults": {"timeout_s": timeout_s, "max_retries": max_retries, "backoff_s": 0.01, **(settings or {})},
               "models": [{"name": m, "base_url": f"http://scripted/{m}/v1", "price_per_input_token": PRICE_IN[m],
                           "price_per_output_token": PRICE_OUT[m]} for m in models]}
        self.pool = BackendPool(parse_backends(doc, "scripted"),
                                client=httpx.AsyncClient(transport=httpx.MockTransport(self._handle)))

    @staticmethod
    def answer(model: str, query: str) -> str:
        return f"{model} says CORRECT answer {query}"

    @staticmethod
    def cost(model: str) -> float:
        return 10 * PRICE_IN[model] + 20 * PRICE_OUT[model]

    async def _handle(self, request):
        import asyncio
        import json

        import httpx

        model = request.url.path.split("/")[1]
        body = json.loads(request.content)
        self.calls[model] += 1
        mode = self.modes.get(model, "ok")
        if mode == "surrogate400":
            raw = (b'{"error": {"message": "bad \\ud800 input", "type": "invalid_request_error", "param": "messages", '
                   b'"code": "invalid_value"}}')
            return httpx.Response(400, content=raw, headers={"content-type": "application/json"})
        if mode in ("400", "404", "500", "context_400"):
            code = {"400": "invalid_value", "context_400": "context_length_exceeded"}.get(mode)
            error = {"message": f"{model}: no ({mode})", "type": "invalid_request_error",
                     "param": "max_tokens" if mode == "400" else None, "code": code}
            return httpx.Response(400 if mode == "context_400" else int(mode), json={"error": error})
        text = self.answer(model, body["messages"][-1]["content"])
        if mode == "wrong":
            text = text.replace("CORRECT", "WRONG")
        if mode == "giant":
            text = (text + " ") * (self.GIANT_CHARS // (len(text) + 1) + 1)
        odd = {"nan": ', "logprobs": {"content": [{"token": "x", "logprob": NaN}]}'}.get(mode, "")
        usage = {"prompt_tokens": 10, "completion_tokens": 20}
        usage_json = json.dumps({"negusage": {"prompt_tokens": -1000000, "completion_tokens": 20},
                                 "strusage": {"prompt_tokens": "abc", "completion_tokens": 20},
                                 "listusage": [1]}.get(mode, usage))
        if mode == "infusage":
            usage_json = '{"prompt_tokens": 10, "completion_tokens": Infinity}'
        if not body.get("stream"):
            while mode == "hold" and not self.release.is_set():
                await asyncio.sleep(0.01)
            message = json.dumps({"role": "assistant", "content": text})
            if mode == "surrogate":
                message = message[:-2] + ' \\ud800"}'
            second = ', {"index": 1, "message": {"role": "assistant", "content": 5}}' if mode == "badchoice" else ""
            raw = ('{"object": "chat.completion", "choices": [{"index": 0, "message": ' + message + odd
                   + ', "finish_reason": "stop"}' + second + '], "usage": ' + usage_json + "}").encode()
            if mode == "trickle":
                async def trickled():
                    for k in range(len(raw)):
                        await asyncio.sleep(0.01)
                        yield raw[k:k + 1]

                return httpx.Response(200, content=trickled(), headers={"content-type": "application/json"})
            if mode == "badgzip":
                return httpx.Response(200, content=raw, headers={"content-type": "application/json",
                                                                 "content-encoding": "gzip"})
            return httpx.Response(200, content=raw, headers={"content-type": "application/json"})

        def chunk(delta=None, finish=None, index=0, **extra):
            choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish}]
            return ("data: " + json.dumps({"object": "chat.completion.chunk", "choices": choices, **extra})
                    + "\n\n").encode()

        cut = len(text) // 3

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            if mode in ("nan", "surrogate"):  # the first content chunk is odd JSON
                first = json.dumps({"object": "chat.completion.chunk",
                                    "choices": [{"index": 0, "delta": {"content": text[:cut]}, "finish_reason": None}]})
                first = (first.replace('"finish_reason"', '"logprobs": {"content": [{"token": "x", "logprob": NaN}]}, '
                                       '"finish_reason"') if mode == "nan" else
                         first.replace(json.dumps(text[:cut]), json.dumps(text[:cut])[:-1] + '\\ud800"'))
                yield ("data: " + first + "\n\n").encode()
            elif mode == "stream_toolname":
                yield chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                             "function": {"name": 5, "arguments": "{}"}}]})
            else:
                yield chunk({"content": text[:cut]})
            yield chunk({"content": text[cut:2 * cut]})
            await asyncio.sleep(0.01)
            if mode == "stream_break":
                raise httpx.ReadError("connection reset by peer")
            if mode == "stream_stall":
                raise httpx.ReadTimeout("no data within the read timeout")
            if mode == "stream_garbage":
                yield b"data: {not json\n\n"
            if mode == "stream_badindex":
                yield chunk({"content": "z"}, index="x")
            if mode == "stream_error":
                yield b'data: {"error": {"message": "upstream overloaded"}}\n\n'
            if mode == "stream_hold":
                while not self.release.is_set():
                    await asyncio.sleep(0.01)
            if mode == "stream_long":
                rest = text[2 * cut:]
                step = -(-len(rest) // self.LONG_PIECES)
                for k in range(0, len(rest), step):
                    await asyncio.sleep(0.02)
                    yield chunk({"content": rest[k:k + step]})
            else:
                yield chunk({"content": text[2 * cut:]})
            yield chunk({}, "stop")
            yield b'data: {"object": "chat.completion.chunk", "choices": [], "usage": ' + usage_json.encode() + b"}\n\n"
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})


def scripted_server(router, backends: "ScriptedBackends", **app_kwargs):
    """A started :class:`~cascade_routing.serving.server.BackgroundServer` of ``create_app(router,
    backends.pool, **app_kwargs)`` (use as a context manager)."""
    from cascade_routing.serving.server import BackgroundServer, create_app

    return BackgroundServer(create_app(router, backends.pool, **app_kwargs))
