"""Serving: ``CascadeRouter`` (a fitted policy + estimators driving real models), OpenAI-compatible
backends, the OpenAI-compatible cascade-routing server, and the replay backend."""

from cascade_routing.serving.backends import (
    Answer,
    Backend,
    BackendConfig,
    BackendConfigError,
    BackendError,
    BackendPool,
    load_backend_configs,
    parse_backends,
)
from cascade_routing.serving.router import (
    CascadeRouter,
    MissingConfidenceWarning,
    NoModelAvailableError,
    RouteResult,
    RouterError,
    StepTrace,
)

__all__ = [
    "Answer", "Backend", "BackendConfig", "BackendConfigError", "BackendError", "BackendPool",
    "CascadeRouter", "MissingConfidenceWarning", "NoModelAvailableError", "RouteResult", "RouterError", "StepTrace",
    "load_backend_configs", "parse_backends",
]
