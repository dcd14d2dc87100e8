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
from cascade_routing.serving.backend_config import PriceMismatchWarning, UnusedBackendWarning, check_backends_match
from cascade_routing.serving.router import (
    BudgetAboveFittedWarning,
    CascadeRouter,
    MissingConfidenceWarning,
    NoModelAvailableError,
    RouteResult,
    RouterError,
    StepTrace,
)

__all__ = [
    "Answer", "Backend", "BackendConfig", "BackendConfigError", "BackendError", "BackendPool",
    "BudgetAboveFittedWarning", "CascadeRouter", "MissingConfidenceWarning", "NoModelAvailableError",
    "PriceMismatchWarning", "RouteResult", "RouterError", "StepTrace", "UnusedBackendWarning",
    "check_backends_match", "load_backend_configs", "parse_backends",
]
