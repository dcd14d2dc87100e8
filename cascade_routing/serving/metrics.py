"""Prometheus metrics of the cascade-routing server (``GET /metrics``, prometheus_client).

Each app gets its own ``CollectorRegistry`` (several servers in one process stay separate).

| metric | type | labels | meaning |
|---|---|---|---|
| ``cascade_routing_requests_total`` | counter | ``status`` (HTTP code), ``stream`` (``true``/``false``/``unknown`` when refused before parsing) | chat-completion requests answered (``POST /v1/chat/completions`` only: a 401 of ``/metrics``, ``/v1/models`` or ``/docs`` is not one) |
| ``cascade_routing_errors_total`` | counter | ``kind`` | chat-completion errors by code: ``bad_request``, ``unsupported_parameter``, ``model_not_found``, ``invalid_api_key``, ``request_timeout``, ``unsupported_media_type``, ``server_busy``, ``insufficient_quota``, ``quota_reserved``, ``rejected_by_backend``, ``no_model_available``, ``deadline_exceeded``, ``client_closed``, ``routing_failed``, ``internal_error``, ``stream_aborted`` (and ``deadline_exceeded`` / ``server_shutting_down`` after a stream started), ... |
| ``cascade_routing_request_latency_seconds`` | histogram | ``stream`` | wall time of a served request in the server |
| ``cascade_routing_time_to_first_token_seconds`` | histogram | ``mode`` (``passthrough``/``buffered``) | streamed requests: time to the first content chunk |
| ``cascade_routing_models_run_total`` | counter | ``model`` | backend answers used by the router |
| ``cascade_routing_model_failures_total`` | counter | ``model`` | backend calls that failed after retries (a model never called, e.g. ``attempt_limit`` or ``circuit_open``, is not counted) |
| ``cascade_routing_answers_total`` | counter | ``model`` | whose answer was returned |
| ``cascade_routing_spend_usd_total`` | counter | ``model`` | realised spend per model, USD |
| ``cascade_routing_key_spend_usd_total`` | counter | ``key`` | realised spend per API key name (``anonymous`` without keys) |
| ``cascade_routing_lambda`` | gauge | ``budget`` | λ in use (first step, high side, x the controller's factor) |
| ``cascade_routing_lambda_factor`` | gauge | ``budget`` | the online controller's λ multiplier (1 without it) |
| ``cascade_routing_budget_usd`` | gauge | | the configured mean budget per request |
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The metrics of one server (see module docstring); ``render()`` gives the exposition text."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, budget: float | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        p = "cascade_routing_"
        self.requests = Counter(p + "requests", "Chat-completion requests answered.", ["status", "stream"], registry=r)
        self.errors = Counter(p + "errors", "Errors by kind.", ["kind"], registry=r)
        self.latency = Histogram(p + "request_latency_seconds", "Server wall time of a request.", ["stream"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Streamed requests: time to the first content.",
                              ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.models_run = Counter(p + "models_run", "Backend answers used by the router.", ["model"], registry=r)
        self.model_failures = Counter(p + "model_failures", "Backend calls failed after retries.", ["model"],
                                      registry=r)
        self.answers = Counter(p + "answers", "Requests answered with this model's answer.", ["model"], registry=r)
        self.spend = Counter(p + "spend_usd", "Realised spend per model (USD).", ["model"], registry=r)
        self.key_spend = Counter(p + "key_spend_usd", "Realised spend per API key name (USD).", ["key"], registry=r)
        self.lam = Gauge(p + "lambda", "λ in use (first step, x controller factor).", ["budget"], registry=r)
        self.lam_factor = Gauge(p + "lambda_factor", "Online controller's λ multiplier.", ["budget"], registry=r)
        self.budget = Gauge(p + "budget_usd", "Configured mean budget per request (USD).", registry=r)
        if budget is not None:
            self.budget.set(budget)

    def request(self, status: int, stream: bool | None, seconds: float | None = None) -> None:
        """One answered request (``stream`` None: refused before the body was read)."""
        label = "unknown" if stream is None else str(stream).lower()
        self.requests.labels(str(status), label).inc()
        if seconds is not None:
            self.latency.labels(label).observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def spent(self, costs: dict[str, float], answer_model: str | None, failed: Iterable[str],
              key: str = "anonymous", partial: dict[str, float] | None = None) -> None:
        """Record what one request spent, whatever its outcome: ``costs`` per model that answered,
        the answer's model (None if it got none), the models whose calls failed (called ones only),
        and ``partial``: the estimated cost of failed calls billed anyway (a stream broken midway),
        added to the spend but not to the models run."""
        for model, cost in costs.items():
            self.models_run.labels(model).inc()
            self.spend.labels(model).inc(max(0.0, cost))
        for model, cost in (partial or {}).items():
            self.spend.labels(model).inc(max(0.0, cost))
        for model in failed:
            self.model_failures.labels(model).inc()
        if answer_model is not None:
            self.answers.labels(answer_model).inc()
        self.key_spend.labels(key).inc(max(0.0, sum(costs.values()) + sum((partial or {}).values())))

    def set_lambda(self, budget: float | None, lam: float, factor: float) -> None:
        label = "default" if budget is None else f"{budget:.6g}"
        self.lam.labels(label).set(lam)
        self.lam_factor.labels(label).set(factor)

    def render(self) -> bytes:
        return generate_latest(self.registry)
