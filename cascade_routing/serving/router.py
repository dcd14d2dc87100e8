"""``CascadeRouter``: a fitted policy + bound estimators driving real models, one query at a time.

The router makes exactly the decisions of :func:`cascade_routing.policies.rollout.simulate` for the same
policy, estimators and fitted λ: both run each step through
:func:`~cascade_routing.policies.step.decide_step` and the answer through
:func:`~cascade_routing.policies.step.select_step`.

- the estimators are bound to the query (``binder(queries, responses, features, tasks)``), with a
  ``responses`` object array [B, M] and a ``features`` dict of float arrays [B, M] that the router
  fills *in place* as answers arrive (the bound estimators read a cell only where it ran);
- at step t (t = number of models that answered so far), query i uses
  ``λ = fitted.lam_for(t, u_i < gamma)`` with ``u_i = query_uniforms([text_i])``;
- ``policy.decide(estimate, cost.to(mean.dtype), ran, λ)`` gives the next model (-1 = stop), and
  at the end ``policy.select(estimate, ran)`` the answer model.

Failed models (an endpoint that is down, times out or returns 5xx after its retries) are REMOVED
FROM THE CANDIDATE SET for that query: the policy then decides over the remaining models only (the
columns of the estimate, cost and ``ran`` of the failed models are dropped before ``decide`` /
``select``, and indices are mapped back). A failed model gave no information, so the estimators
see it as not run. With no failures this is exactly the offline decision; with failures it is the
decision the policy would make on the pool without those models. If no model can answer,
:class:`NoModelAvailableError` is raised (the server maps it to HTTP 502), unless every failure was
a :class:`~cascade_routing.serving.backends.RequestRejectedError` (each endpoint called refused the
request itself, e.g. HTTP 400 for ``max_tokens``; models left uncalled by the attempt limit or an
open circuit do not count): then the first of them is raised, and the client gets
that 4xx. A rejection by one endpoint alone still falls back (it may be that provider's own rule).
A streamed model that fails after some of its tokens went to the client ends the route at once
(:class:`StreamAbortedError`).

``answers`` in the step API map a model name to an :class:`Answer` (text + features + cost), the
answer text alone (``str``: its features, e.g. token counts or log-prob confidence, then read as 0;
pass an ``Answer`` when the estimators use them), or ``None`` for "attempted and failed".

The arrays handed to the binder live on the CPU; estimators may move their work to a device
(the policy runs where the estimate's tensors are).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from cascade_routing.interfaces import CostEstimator, QualityEstimate, QualityEstimator, checked_queries
from cascade_routing.estimators.features import CONFIDENCE_FEATURE, UnseenTaskWarning
from cascade_routing.policies.lambda_table import BUDGET_RTOL, checked_budget, lookup_fitted
from cascade_routing.policies.step import FittedLike, decide_step, max_steps_at, select_step
from cascade_routing.serving.backends import Answer, BackendError, RequestRejectedError

Binder = Callable[..., "tuple[QualityEstimator, CostEstimator]"]
"""``bind(queries: list[str], responses: object ndarray [B, M], features: dict[str, float ndarray
[B, M]] | None, tasks: list[str] | None) -> (QualityEstimator, CostEstimator)``."""

DEFAULT_FEATURES: tuple[str, ...] = ("tokens_in", "tokens_out", "latency_ms")


class RouterError(ValueError):
    """Bad input to the router (unknown model, budget without a fitted λ, ...)."""


def check_budget(budget: Any) -> float:
    """``budget`` as a float; :class:`RouterError` unless it is a finite number >= 0
    (:func:`~cascade_routing.policies.lambda_table.checked_budget`, the rule of λ fitting)."""
    try:
        return checked_budget(budget)
    except ValueError as err:
        raise RouterError(str(err)) from None


class BudgetAboveFittedWarning(UserWarning):
    """The router's budget is above every budget its λ table was fitted at: it routes with the
    largest one's λ, so it spends about that budget's calibration spend, not up to its own."""


class MissingConfidenceWarning(UserWarning):
    """An answer reached estimators trained with a log-prob confidence without one (see _State.record)."""


class NoModelAvailableError(RuntimeError):
    """Every candidate model failed for this query; ``failures`` lists what happened."""

    def __init__(self, query: str, failures: list[dict[str, Any]]) -> None:
        names = ", ".join(f"{f['model']} ({f['reason']})" for f in failures) or "none attempted"
        super().__init__(f"no model could answer the query; failures: {names}")
        self.query = query
        self.failures = failures


class StreamAbortedError(RuntimeError):
    """A model whose tokens were already passed to the client (``RouteRequest.on_delta``) failed
    mid-answer. The route ends here: no other model is called, since its answer could only be
    appended to the partial one the client already has. ``failure`` is the model's entry in
    ``RouteProgress.failures``."""

    def __init__(self, model: str, failure: dict[str, Any]) -> None:
        super().__init__(f"the streamed model {model!r} failed after part of its answer was sent "
                         f"({failure['reason']}: {failure['detail']}); no other model was called")
        self.model = model
        self.failure = failure


class _CompleteFn(Protocol):
    async def complete(self, model: str, messages: list[dict[str, Any]], **params: Any) -> Answer: ...


@dataclass
class StepTrace:
    """One decision: the belief it was based on and what happened to the chosen model."""

    step: int
    lam: float
    estimate_mean: dict[str, float]
    estimate_std: dict[str, float] | None
    cost_estimate: dict[str, float]
    model: str | None = None  # None = stop
    status: str = "stop"  # "ok", "failed" or "stop"
    cost: float = 0.0
    latency_ms: float = 0.0
    error: str | None = None
    streamed: bool = False  # the backend's tokens went straight to the client (see route_one)


@dataclass
class RouteResult:
    """The outcome of :meth:`CascadeRouter.route` for one query."""

    query: str
    text: str
    model: str
    models_run: list[str]  # models that answered, in run order
    attempted: list[str]  # every model called (including failed ones), in order
    costs: dict[str, float]  # per answered model, USD
    total_cost: float
    steps: list[StepTrace]
    failures: list[dict[str, Any]]
    budget: float | None
    final_estimate: dict[str, float]
    answers: dict[str, Answer] = field(default_factory=dict, repr=False)
    backend_ms: float = 0.0  # time spent awaiting backends
    routing_ms: float = 0.0  # everything else (binding, estimating, deciding, waiting in the batch)
    compute_ms: float = 0.0  # this query's share of the estimator/policy compute of its batch
    batch_size: int = 1  # queries bound (encoded) together with this one

    def to_dict(self) -> dict[str, Any]:
        """The trace as JSON-ready data: every field but ``answers``, ``query`` and ``text`` (copied,
        steps as dicts), plus ``usage`` per answered model. ``answers`` (the backends' raw
        responses) is never copied: ``dataclasses.asdict`` would deep-copy it only to drop it."""
        out = {f.name: _copied(getattr(self, f.name)) for f in fields(self) if f.name not in {"answers", "query", "text"}}
        out["usage"] = {m: dict(a.usage) for m, a in self.answers.items()}
        return out


def _copied(value: Any) -> Any:
    """``value`` with its dicts, lists and dataclasses (as dicts) copied: ``dataclasses.asdict`` for
    the trace's plain data, without its deep copy of every number (a measurable share of a response)."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    if hasattr(type(value), "__dataclass_fields__"):
        return {f.name: _copied(getattr(value, f.name)) for f in fields(value)}
    return value


class _State:
    """One batch of queries bound to the estimators, with arrays filled in place as answers arrive."""

    def __init__(self, router: "CascadeRouter", queries: list[str], tasks: list[str] | None) -> None:
        m = len(router.models)
        b = len(queries)
        self.queries = queries
        self.models = router.models
        self.responses = np.full((b, m), None, dtype=object)
        # a confidence not given stays NaN, which the estimators read as "none" (never as log p = 0,
        # which would be an answer the model was certain of)
        self.features = {name: np.full((b, m), np.nan if name == CONFIDENCE_FEATURE else 0.0, dtype=np.float64)
                         for name in router.feature_names}
        self.ran = torch.zeros(b, m, dtype=torch.bool)  # answered
        self.failed = torch.zeros(b, m, dtype=torch.bool)
        self.rows = torch.arange(b)
        self.qe, self.ce = router.binder(queries, self.responses, self.features or None, tasks)
        self.use_low: Tensor | None = None

    def record(self, row: int, m: int, answer: Answer | str | None) -> None:
        if answer is None:
            self.failed[row, m] = True
            return
        if isinstance(answer, str) or CONFIDENCE_FEATURE not in answer.features:
            if CONFIDENCE_FEATURE in self.features:
                warnings.warn(MissingConfidenceWarning(
                    f"an answer of {self.models[m]!r} came without "
                    f"{CONFIDENCE_FEATURE!r}, which these estimators were trained with: they read it as having "
                    "none; set `logprobs: true` for the backends, or pass Answer(..., features={"
                    f"{CONFIDENCE_FEATURE!r}: ...}})"), stacklevel=2)
        if isinstance(answer, str):
            self.responses[row, m] = answer
        else:
            self.responses[row, m] = answer.text
            for name, arr in self.features.items():
                if name in answer.features:
                    arr[row, m] = answer.features[name]
                elif name == "cost":
                    arr[row, m] = answer.cost
        self.ran[row, m] = True


class CascadeRouter:
    """A policy with fitted λ and an estimator binder, serving queries (see module docstring).

    ``fitted``: one fitted λ (``FittedLambda``) or a table ``{budget: FittedLambda}``; ``budget``
    picks the default entry of the table. A per-call ``budget`` uses the entry for the largest
    fitted budget <= the requested one (a :class:`RouterError` if there is none).
    """

    def __init__(
        self,
        policy: Any,
        binder: Binder,
        fitted: "FittedLike | Mapping[float, FittedLike]",
        models: Sequence[str],
        prices: Mapping[str, Any] | None = None,
        budget: float | None = None,
        feature_names: Sequence[str] = DEFAULT_FEATURES,
        name: str = "cascade-routing",
        uniforms: Callable[[list[str]], Tensor] | None = None,
        executor: "concurrent.futures.Executor | None" = None,
        bind_executor: "concurrent.futures.Executor | None" = None,
        tasks: Sequence[str] | None = None,
    ) -> None:
        self.policy = policy
        # The task labels the estimators know (None: not checked, any label is passed on).
        self.tasks: tuple[str, ...] | None = None if tasks is None else tuple(sorted(set(tasks)))
        # Where route() runs its CPU work (binding, estimating, deciding); None = inline in the
        # event loop. A one-thread executor keeps a server's loop free for I/O while torch works.
        self.executor = executor
        # Where binding (encoding the queries: the heaviest step) runs; None = on ``executor``. A
        # thread of its own lets decisions of bound requests proceed while new ones are encoded.
        self.bind_executor = bind_executor
        self.binder = binder
        self.models = list(models)
        if not self.models or len(set(self.models)) != len(self.models):
            raise RouterError(f"models must be a non-empty list of unique names, got {self.models}")
        self.prices = dict(prices or {})
        self.feature_names = tuple(feature_names)
        self.name = name
        if uniforms is None:
            from cascade_routing.policies.fitting import query_uniforms as uniforms
        self._uniforms = uniforms
        if budget is not None:
            check_budget(budget)
        if hasattr(fitted, "lam_for"):
            key = budget if budget is not None else getattr(fitted, "budget", None)
            self.fitted_table: dict[float | None, FittedLike] = {key: fitted}  # type: ignore[dict-item]
            self.default_budget = key
        else:
            table = {float(b): f for b, f in dict(fitted).items()}  # type: ignore[union-attr]
            if not table:
                raise RouterError("the fitted λ table is empty")
            self.fitted_table = table  # type: ignore[assignment]
            if budget is None:
                if len(table) != 1:
                    raise RouterError(f"pass budget=...; fitted budgets: {sorted(table)}")
                budget = next(iter(table))
            self.default_budget = float(budget)
            self.fitted_for(self.default_budget)  # validate now
            self._warn_above_table(self.default_budget)
        self._index = {m: i for i, m in enumerate(self.models)}

    def _warn_above_table(self, budget: float) -> None:
        """:class:`BudgetAboveFittedWarning` when ``budget`` is above every fitted budget (beyond the
        lookup's rounding slack): the largest one's λ is used, so the spend stays near that one."""
        top = max(self.budgets, default=None)
        if top is None or budget <= top * (1 + BUDGET_RTOL):
            return
        spend = getattr(self.fitted_table[top], "calibration_cost", None)
        warnings.warn(BudgetAboveFittedWarning(
            f"budget {budget:.6g} is above the largest fitted budget {top:.6g} (fitted: "
            f"{[float(f'{b:.6g}') for b in self.budgets]}): every query routes with that budget's λ, so the "
            f"mean spend stays near {top:.6g}"
            + (f" (its calibration spend: {spend:.6g})" if spend is not None else "")
            + f" per query, not up to {budget:.6g}"), stacklevel=3)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(
        cls,
        path: "str | os.PathLike[str]",
        budget: float,
        strategy: str = "cascade_routing",
        name: str = "cascade-routing",
        int8: bool = False,
        **kwargs: Any,
    ) -> "CascadeRouter":
        """Load an estimator artifact and build the router for ``strategy`` at ``budget``
        (``int8``: quantise a carried encoder, see :mod:`cascade_routing.serving.checkpoint`).

        Everything a request needs is loaded and checked here, not on the first request: a budget
        below every fitted one is a :class:`RouterError` naming the checkpoint and the strategy
        (one above every fitted one warns, :class:`BudgetAboveFittedWarning`), and one query is
        bound (:meth:`check_binder`), so an encoder or tokenizer folder the artifact refers to but
        does not carry, missing or changed, is an ``ArtifactError`` (or ``FileNotFoundError``)
        naming it.
        """
        from cascade_routing.serving.checkpoint import router_parts

        check_budget(budget)  # before the (slow) load
        parts = router_parts(path, strategy, int8=int8)
        try:
            router = cls(budget=budget, name=name, **{**parts, **kwargs})
        except RouterError as err:
            raise RouterError(f"checkpoint {str(path)!r}, strategy {strategy!r}: {err}") from None
        router.check_binder()
        return router

    def check_binder(self) -> None:
        """Bind one probe query, as a request would be bound: the binder loads what it needs now
        (e.g. the artifact's encoder and tokenizer) and raises what it would raise on the first
        request (e.g. an ``ArtifactError`` or ``FileNotFoundError`` naming a missing encoder or
        tokenizer folder). The probe carries the first task label the router knows (None without
        any); an :class:`UnseenTaskWarning` about it is not shown."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnseenTaskWarning)
            _State(self, ["cascade-routing startup check"], [self.tasks[0]] if self.tasks else None)

    # ------------------------------------------------------------------ λ
    @property
    def budgets(self) -> list[float]:
        return sorted(b for b in self.fitted_table if b is not None)

    def fitted_for(self, budget: float | None) -> tuple[float | None, FittedLike]:
        """(budget used, fitted λ) for a requested budget; see the class docstring (the rule is
        :func:`~cascade_routing.policies.lambda_table.lookup_fitted`, shared with the artifact)."""
        if budget is None:
            budget = self.default_budget
            if budget in self.fitted_table:
                return budget, self.fitted_table[budget]
        budget = check_budget(budget)
        found = lookup_fitted(self.fitted_table, budget)
        if found is None:
            raise RouterError(
                f"no fitted λ for budget {budget}: the smallest fitted budget is "
                f"{self.budgets[0] if self.budgets else None} (fitted: {self.budgets})"
            )
        return found

    def check_task(self, task: str | None) -> None:
        """Raise :class:`RouterError` naming the known labels when ``task`` is not one the estimators
        were trained with (an unknown label would silently read as "no task"); None always passes."""
        if task is None or self.tasks is None or task in self.tasks:
            return
        if not self.tasks:
            raise RouterError(f"unknown task {task!r}: this checkpoint was trained without task labels; "
                              "omit routing.task")
        raise RouterError(f"unknown task {task!r}; the checkpoint knows {list(self.tasks)}")

    # ------------------------------------------------------------------ core
    def _state(self, queries: list[str], answers_list: Sequence[Mapping[str, Any]] | None,
               tasks: list[str] | None) -> _State:
        state = _State(self, queries, tasks)
        for row, answers in enumerate(answers_list or []):
            for model, answer in answers.items():
                if model not in self._index:
                    raise RouterError(f"unknown model {model!r} in answers; router models: {self.models}")
                state.record(row, self._index[model], answer)
        return state

    def _beliefs(self, state: _State, rows: Tensor) -> tuple[QualityEstimate, Tensor]:
        est = state.qe.estimate(state.rows[rows], state.ran[rows])
        cost = state.ce.estimate(state.rows[rows].to(est.mean.device), state.ran[rows].to(est.mean.device))
        return est, cost.to(est.mean.dtype)

    def _decide(self, state: _State, rows: Tensor, fitted: FittedLike
                ) -> tuple[Tensor, QualityEstimate, Tensor, Tensor]:
        """Next model index (-1 = stop) for ``rows``, plus the beliefs and λ used (the step of
        :func:`~cascade_routing.policies.step.decide_step`, failed models dropped from the candidates)."""
        if state.use_low is None:
            state.use_low = self._uniforms(state.queries) < fitted.gamma
        est, cost = self._beliefs(state, rows)
        nxt, lams = decide_step(self.policy, est, cost, state.ran[rows], fitted, state.use_low[rows],
                                candidates=~state.failed[rows])
        return nxt, est, cost, lams

    def _select(self, state: _State, rows: Tensor) -> tuple[Tensor, QualityEstimate]:
        est, _ = self._beliefs(state, rows)
        return select_step(self.policy, est, state.ran[rows], candidates=~state.failed[rows]), est

    # ------------------------------------------------------------------ step API
    def next_models(self, queries: Sequence[str], answers_list: Sequence[Mapping[str, Any]] | None = None,
                    budget: float | None = None, tasks: list[str] | None = None) -> list[str | None]:
        """For each query, the model to run next given the answers so far (None = stop); ``TypeError``
        for a single string or a non-string query (:func:`~cascade_routing.interfaces.checked_queries`)."""
        queries = checked_queries(queries)
        tasks = None if tasks is None else checked_queries(tasks, "tasks", allow_none=True)
        if answers_list is not None and len(answers_list) != len(queries):
            raise RouterError(f"{len(answers_list)} answer dicts for {len(queries)} queries")
        _, fitted = self.fitted_for(budget)
        state = self._state(queries, answers_list, tasks)
        nxt, *_ = self._decide(state, torch.arange(len(queries)), fitted)
        return [None if i < 0 else self.models[i] for i in nxt.tolist()]

    def next_model(self, query: str, answers: Mapping[str, Any] | None = None,
                   budget: float | None = None, task: str | None = None) -> str | None:
        """The model to run next for ``query`` given ``answers`` so far, or None to stop."""
        return self.next_models([query], [answers or {}], budget, None if task is None else [task])[0]

    def select_batch(self, queries: Sequence[str], answers_list: Sequence[Mapping[str, Any]],
                     tasks: list[str] | None = None) -> list[str]:
        """For each query, the model whose answer to return (the policy's ``select``); queries checked
        as in :meth:`next_models`."""
        queries = checked_queries(queries)
        tasks = None if tasks is None else checked_queries(tasks, "tasks", allow_none=True)
        if len(answers_list) != len(queries):
            raise RouterError(f"{len(answers_list)} answer dicts for {len(queries)} queries")
        state = self._state(queries, answers_list, tasks)
        choice, _ = self._select(state, torch.arange(len(queries)))
        out = []
        for q, c in zip(queries, choice.tolist()):
            if c < 0:
                raise NoModelAvailableError(q, [])
            out.append(self.models[c])
        return out

    def select(self, query: str, answers: Mapping[str, Any], task: str | None = None) -> str:
        """The model whose answer to return for ``query`` (raises if no model answered)."""
        return self.select_batch([query], [answers], None if task is None else [task])[0]

    # ------------------------------------------------------------------ full loop
    async def route(
        self,
        query: str,
        backends: "_CompleteFn | Mapping[str, Callable[..., Awaitable[Answer | str]]]",
        messages: list[dict[str, Any]] | None = None,
        budget: float | None = None,
        task: str | None = None,
        **params: Any,
    ) -> RouteResult:
        """Drive the policy on ``query`` against live ``backends`` until it stops; see module docstring.

        ``backends``: an object with ``async complete(model, messages, **params) -> Answer`` (e.g.
        :class:`~cascade_routing.serving.backends.BackendPool`) or a mapping model -> async callable
        ``(messages, **params) -> Answer | str``. ``messages`` default to one user message ``query``.
        Raises :class:`NoModelAvailableError` if every model the policy tried failed.
        """
        return await self.route_one(RouteRequest(query, messages, task, params), backends, budget)

    async def route_batch(
        self,
        items: Sequence["RouteRequest"],
        backends: "_CompleteFn | Mapping[str, Callable[..., Awaitable[Answer | str]]]",
        budget: float | None = None,
    ) -> list["RouteResult | BaseException"]:
        """Route several queries concurrently, sharing the estimator calls (one bind, one
        ``decide`` per step and bound batch, one ``select``); each query runs its own backend calls.

        Per-query isolation: the result list holds a :class:`RouteResult` or the exception of that
        query alone (e.g. :class:`NoModelAvailableError`); one failing query never fails another.
        """
        if not items:
            return []
        from cascade_routing.serving.batching import ComputeBatcher

        compute = ComputeBatcher(self, max_batch=len(items), window_ms=0.0)
        try:
            return list(await asyncio.gather(
                *(self.route_one(it, backends, budget, compute) for it in items), return_exceptions=True))
        finally:
            await compute.aclose()

    async def route_one(
        self,
        item: "RouteRequest",
        backends: "_CompleteFn | Mapping[str, Callable[..., Awaitable[Answer | str]]]",
        budget: float | None = None,
        compute: "Any | None" = None,
        progress: "RouteProgress | None" = None,
        fitted: "FittedLike | None" = None,
    ) -> RouteResult:
        """Route one query: decide (through ``compute``, a :class:`~cascade_routing.serving.batching.
        ComputeBatcher` shared with concurrent requests, or a private one), call the chosen backend,
        record its answer, repeat until the policy stops, then select the answer.

        ``progress`` (optional) is filled as the route advances: whatever happens (an exception,
        cancellation by a deadline or a client disconnect) it holds every answer received so far
        and its cost, so the caller can always account for what the request spent.

        ``backend_ms`` = this query's backend calls; ``routing_ms`` = the rest of its wall time
        (estimating and deciding, waiting for a compute batch); ``compute_ms`` = its share of the
        batched compute.

        ``fitted``: the λ to use instead of the table's entry for ``budget`` (e.g. the entry scaled
        by the online budget controller; pass the same object to concurrent requests so their
        decisions still batch).

        Streaming: with ``item.on_delta`` set, a model whose answer is certain to be the one
        returned (:meth:`_answer_is_final`: routing, a fit limited to depth 1, or a final step) is called with ``stream: true``
        (``backends.stream``) and each content / tool-call delta is handed to ``item.on_delta`` as
        it arrives; otherwise the answer is only known after ``select``. If that model fails before
        its first delta, the route goes on as after any failure; after it, :class:`StreamAbortedError`
        ends the route (no further model is called or paid for).

        Raises :class:`NoModelAvailableError`, :class:`StreamAbortedError`,
        :class:`~cascade_routing.serving.backends.RequestRejectedError` (every endpoint tried refused
        the request itself), :class:`RouterError` (unknown ``item.task``), or what the estimators raise.
        """
        from cascade_routing.serving.batching import ComputeBatcher

        start = time.perf_counter()
        self.check_task(item.task)
        used_budget, table_fitted = self.fitted_for(budget)
        fitted = table_fitted if fitted is None else fitted
        own = compute is None
        if own:
            compute = ComputeBatcher(self, max_batch=1, window_ms=0.0)
        progress = progress if progress is not None else RouteProgress()
        messages = item.messages if item.messages is not None else [{"role": "user", "content": item.query}]
        try:
            slot = await compute.bind(item.query, item.task, fitted)
            await self._drive(slot, compute, fitted, backends, messages, item, progress)
            choice, final = await compute.select(slot)
        finally:
            if own:
                await compute.aclose()
        if choice < 0:
            if progress.rejections and len(progress.rejections) == len(progress.called_failures()):
                raise progress.rejections[0]
            raise NoModelAvailableError(item.query, progress.failures)
        return progress.result(item.query, self.models[choice], used_budget, final, slot,
                               time.perf_counter() - start)

    async def _drive(self, slot: Any, compute: Any, fitted: FittedLike, backends: Any,
                     messages: list[dict[str, Any]], item: "RouteRequest", progress: "RouteProgress") -> None:
        """Decide, run the chosen model, record its answer, repeat until the policy stops (each step
        adds a model that answered or failed, so it stops within 2M + 1 steps)."""
        for step in range(2 * len(self.models) + 1):
            decision = await compute.decide(slot, fitted)
            trace = StepTrace(step, decision.lam, decision.estimate_mean, decision.estimate_std,
                              decision.cost_estimate)
            progress.steps.append(trace)
            if decision.model < 0:
                return
            await self._run_model(slot, decision.model, trace, backends, messages, item.params, progress,
                                  fitted, item.on_delta)
        limit = 2 * len(self.models) + 1  # pragma: no cover - the policy stops once every model ran or failed
        raise RuntimeError(f"policy {self.policy!r} did not stop within {limit} steps")  # pragma: no cover

    def _answer_is_final(self, state: _State, row: int, model: int, fitted: FittedLike) -> bool:
        """Whether ``model``, about to run for ``row``, is certain to give the returned answer: it
        runs at the query's last possible step (``max_steps`` over the models that have not failed of
        the policy that runs at this fit, ``policy.for_fit(fitted)``, capped by the fit's depth limit,
        or no other candidate is left) and either no other model has answered or that policy always
        returns the last model run (``answer_is_last_run``)."""
        answered = int(state.ran[row].sum())
        failed = int(state.failed[row].sum())
        others_left = len(self.models) - answered - failed - 1
        last = answered + 1 >= max_steps_at(self.policy, fitted, len(self.models) - failed) or others_left == 0
        runs = self.policy.for_fit(fitted)
        return last and (answered == 0 or bool(getattr(runs, "answer_is_last_run", False)))

    async def _run_model(self, slot: Any, m: int, trace: StepTrace, backends: Any,
                         messages: list[dict[str, Any]], params: dict[str, Any], progress: "RouteProgress",
                         fitted: FittedLike,
                         on_delta: "Callable[[dict[str, Any]], Awaitable[None]] | None" = None) -> None:
        """Call model ``m``'s backend for this request and record the outcome in ``slot`` / ``progress``
        (streamed through ``on_delta`` when the answer is certain to be returned, see route_one).

        A failed call removes the model from the candidates (a
        :class:`~cascade_routing.serving.backends.RequestRejectedError` is also kept in
        ``progress.rejections``), except that a streamed call that fails after handing on a delta
        raises :class:`StreamAbortedError` (recorded in ``progress.failures`` first)."""
        model = self.models[m]
        trace.model = model
        progress.attempted.append(model)
        progress.in_flight = model
        t0 = time.perf_counter()
        answer: Answer | str | None
        handed_on = False
        try:
            if on_delta is not None and hasattr(backends, "stream") and self._answer_is_final(slot.state, slot.row, m, fitted):
                trace.streamed = True

                async def tagged(choice: dict[str, Any]) -> None:
                    nonlocal handed_on
                    handed_on = True
                    await on_delta({**choice, "model": model})

                answer = await backends.stream(model, messages, tagged, **params)
            else:
                answer = await _call(backends, model, messages, params)
        except BackendError as err:
            answer, trace.error, trace.status = None, str(err), "failed"
            failure = {"model": model, "reason": err.reason, "detail": err.detail, "attempts": err.attempts}
            if err.cost:  # billed anyway (a stream broken midway), estimated: RouteProgress.partial
                failure["cost_estimate"] = trace.cost = progress.partial[model] = err.cost
            progress.failures.append(failure)
            if isinstance(err, RequestRejectedError):
                progress.rejections.append(err)
            if handed_on:
                raise StreamAbortedError(model, failure) from err
        except KeyError as err:
            answer, trace.error = None, str(err)
            progress.failures.append({"model": model, "reason": "no_backend", "detail": str(err), "attempts": 0})
        finally:
            progress.backend_s += time.perf_counter() - t0
            progress.in_flight = None
        if answer is None:
            trace.status = "failed"
        else:
            if isinstance(answer, str):
                answer = Answer(model=model, text=answer, cost=0.0)
            trace.status, trace.cost, trace.latency_ms = "ok", answer.cost, answer.latency_ms
            progress.answers[model] = answer
        slot.state.record(slot.row, m, answer)


@dataclass
class RouteProgress:
    """What one route has done so far (filled by :meth:`CascadeRouter.route_one` as it goes):
    answers received (with their costs), models attempted, failures, decision traces, the model
    whose call is in flight (None between calls), and ``partial``: per model, the estimated cost of a
    failed call the provider bills anyway (a stream that broke after part of its answer arrived;
    :class:`~cascade_routing.serving.backends.BackendError` ``cost``), counted in :meth:`total_cost`."""

    answers: dict[str, Answer] = field(default_factory=dict)
    attempted: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[RequestRejectedError] = field(default_factory=list)  # failures that refused the request itself
    steps: list[StepTrace] = field(default_factory=list)
    backend_s: float = 0.0
    in_flight: str | None = None
    partial: dict[str, float] = field(default_factory=dict)

    def costs(self) -> dict[str, float]:
        return {name: a.cost for name, a in self.answers.items()}

    def result(self, query: str, model: str, budget: float | None, final_estimate: dict[str, float], slot: Any,
               wall_s: float) -> RouteResult:
        """The :class:`RouteResult` of a finished route that returns ``model``'s answer; ``routing_ms``
        is ``wall_s`` less the time spent awaiting backends."""
        return RouteResult(
            query=query,
            text=self.answers[model].text,
            model=model,
            models_run=list(self.answers),
            attempted=list(self.attempted),
            costs=self.costs(),
            total_cost=self.total_cost(),
            steps=self.steps,
            failures=self.failures,
            budget=budget,
            final_estimate=final_estimate,
            answers=self.answers,
            backend_ms=self.backend_s * 1000.0,
            routing_ms=(wall_s - self.backend_s) * 1000.0,
            compute_ms=slot.compute_s * 1000.0,
            batch_size=slot.batch_size,
        )

    def total_cost(self) -> float:
        """USD spent: the answers' costs plus the estimated ``partial`` costs of broken streams."""
        return float(sum(a.cost for a in self.answers.values()) + sum(self.partial.values()))

    def called_failures(self) -> list[dict[str, Any]]:
        """The failures of models that were actually called (not ``attempt_limit`` / ``circuit_open``)."""
        return [f for f in self.failures if f.get("attempts", 0) > 0]


@dataclass
class RouteRequest:
    """One query for :meth:`CascadeRouter.route_batch`: its text, the chat ``messages`` sent to the
    backends (default: one user message), an optional task label and sampling parameters."""

    query: str
    messages: list[dict[str, Any]] | None = None
    task: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # streaming sink: ``await on_delta({"index", "delta", "logprobs", "model"})`` per upstream chunk
    # of a model whose answer is certain to be returned (see CascadeRouter.route_one)
    on_delta: Callable[[dict[str, Any]], Awaitable[None]] | None = None


# ---------------------------------------------------------------------- helpers
async def _call(backends: Any, model: str, messages: list[dict[str, Any]], params: dict[str, Any]
                ) -> Answer | str:
    if hasattr(backends, "complete"):
        return await backends.complete(model, messages, **params)
    if model not in backends:
        raise KeyError(f"no backend for model {model!r}")
    return await backends[model](messages, **params)


def _belief_dicts(models: list[str], est: QualityEstimate, cost: Tensor, k: int = 0
                  ) -> tuple[dict[str, float], dict[str, float] | None, dict[str, float]]:
    mean = est.mean[k].double().cpu().tolist()
    if est.std is not None:
        std = est.std[k].double().cpu().tolist()
    elif est.cov is not None:
        std = torch.diagonal(est.cov[k]).clamp_min(0).sqrt().double().cpu().tolist()
    else:
        std = None
    return (dict(zip(models, mean)), None if std is None else dict(zip(models, std)),
            dict(zip(models, cost[k].double().cpu().tolist())))
