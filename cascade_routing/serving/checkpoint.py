"""The parts of a :class:`~cascade_routing.serving.router.CascadeRouter` read from an estimator artifact.

``router_parts(path, strategy)`` loads the artifact (:func:`cascade_routing.estimators.artifact.
load_artifact`) and returns the policy for ``strategy`` (built exactly as when λ was fitted, with the
stored model pool: ``EstimatorArtifact.policy``), the binder (``artifact.bind``), the fitted λ
table ``{budget: FittedLambda}`` of that strategy, the model names (cheapest first) and prices.

Features handed to the bound estimators: ``tokens_in``, ``tokens_out``, ``latency_ms``, ``cost``
(the exact cost of a run model), plus ``logprob_confidence`` when the artifact's training data had
it (``data_config["features"]`` when stored, else the dataset it names). Override with
``feature_names=``. A backend that should feed ``logprob_confidence`` needs ``logprobs: true``.

Task labels: the router refuses a ``routing.task`` the artifact does not know (``tasks``: the
network's task vocabulary and the cost model's per-task tables; empty when it was trained without
tasks), since an unknown label would silently read as "no task".

Fast encoder path: an artifact trained on the distilled student (``distill-encoder``) carries it
and embeds queries with it (about 14x MiniLM's speed on CPU); ``int8=True`` additionally quantises
the carried encoder's linear layers to int8 (dynamic quantisation, ``torch.ao``).
"""

from __future__ import annotations

import os
from typing import Any

from cascade_routing.serving.router import DEFAULT_FEATURES

BASE_FEATURES: tuple[str, ...] = (*DEFAULT_FEATURES, "cost")
_DATASETS_WITH_CONFIDENCE = {"rational-llm-cascades"}


def artifact_feature_names(artifact: Any) -> tuple[str, ...]:
    """Feature names the artifact's estimators were trained with (see module docstring)."""
    config = getattr(artifact, "data_config", {}) or {}
    stored = config.get("features")
    if isinstance(stored, (list, tuple)):
        return tuple(dict.fromkeys([*BASE_FEATURES, *map(str, stored)]))
    if config.get("dataset") in _DATASETS_WITH_CONFIDENCE:
        return (*BASE_FEATURES, "logprob_confidence")
    return BASE_FEATURES


def quantize_int8(artifact: Any) -> Any:
    """In place: the carried encoder's Linear layers -> dynamic int8 (weights int8, activations per batch)."""
    import torch

    from cascade_routing.estimators.artifact import ArtifactError

    net = artifact.network()
    if net.encoder is None:
        raise ArtifactError("int8 needs an artifact that carries its encoder (net.encoder.*), e.g. one trained "
                            "on a distilled student; this one embeds with the default MiniLM")
    net.encoder.model = torch.ao.quantization.quantize_dynamic(net.encoder.model, {torch.nn.Linear}, dtype=torch.qint8)
    return artifact


def router_parts(path: "str | os.PathLike[str]", strategy: str = "cascade_routing",
                 policy_kwargs: dict[str, Any] | None = None, int8: bool = False) -> dict[str, Any]:
    """Keyword arguments for :class:`CascadeRouter` (all but ``budget``) from the artifact at ``path``."""
    from cascade_routing.estimators.artifact import ArtifactError, load_artifact

    artifact = load_artifact(path)
    if int8:
        quantize_int8(artifact)
    table = artifact.fitted.get(strategy)
    if not table:
        raise ArtifactError(
            f"checkpoint {str(path)!r} has no fitted λ for strategy {strategy!r}; it has {sorted(artifact.fitted)}"
        )
    return {
        "policy": artifact.policy(strategy, **(policy_kwargs or {})),
        "binder": artifact.bind,
        "fitted": table,
        "models": list(artifact.models),
        "prices": artifact.prices,
        "feature_names": artifact_feature_names(artifact),
        "tasks": artifact_tasks(artifact),
    }


def artifact_tasks(artifact: Any) -> list[str]:
    """The task labels the artifact's estimators read: its network's vocabulary and the labels of
    its cost model's per-task tables (sorted; empty when it was trained without tasks)."""
    cost = getattr(artifact, "cost_model", None)
    labels = set(getattr(artifact, "task_vocabulary", None) or [])
    for table in ("mean_cost_by_task", "tokens_out_by_task"):
        labels |= set(getattr(cost, table, None) or {})
    return sorted(map(str, labels))
