"""cascade-routing: routing, cascading and cascade routing among LLMs under a cost budget.

The public API, imported lazily (``import cascade_routing`` loads none of torch, Lightning or
transformers; each name loads its own stage on first use)::

    from cascade_routing import load_dataset, CascadeRouting, fit_lambda, simulate
    from cascade_routing import EstimatorArtifact, CascadeRouter

Deeper names stay in their stage's package (``cascade_routing.data``, ``.policies``,
``.evaluation``, ``.estimators``, ``.calibration``, ``.training``, ``.serving``).
"""

from __future__ import annotations

import importlib

import os

# torch's OpenMP workers spin-wait between parallel ops by default; with more than one torch thread
# that spinning starves the engine's numba kernels (measured: bench_engine 2 threads 2.1 s with, 0.19 s
# without, at load ~5). Passive waiting is set before torch is imported, unless the user chose a policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    **dict.fromkeys(("RoutingDataset", "DatasetError", "load_dataset", "list_datasets", "fetch", "import_table",
                     "summarize"), "cascade_routing.data"),
    **dict.fromkeys(("Routing", "ThresholdCascade", "OptimalCascade", "CascadeRouting", "FittedLambda",
                     "fit_lambda", "make_policy", "STRATEGIES", "PolicyError", "BudgetUnreachable"),
                    "cascade_routing.policies"),
    **dict.fromkeys(("simulate", "budget_sweep", "sweep_budgets", "auc", "SimulationResult", "SweepResult"),
                    "cascade_routing.evaluation"),
    "synthetic_estimators": "cascade_routing.evaluation.synthetic",
    **dict.fromkeys(("EstimatorArtifact", "load_artifact", "ArtifactError"), "cascade_routing.estimators.artifact"),
    "UncoveredRanSetError": "cascade_routing.estimators.learned",
    "UnseenTaskWarning": "cascade_routing.estimators.features",
    "evaluate": "cascade_routing.training.heldout",
    "QualityEstimatorModule": "cascade_routing.training.module",
    "RoutingDataModule": "cascade_routing.training.datamodule",
    "train_eval": "cascade_routing.cli.estimator_commands",
    **dict.fromkeys(("CascadeRouter", "BackendPool", "RouterError", "NoModelAvailableError",
                     "MissingConfidenceWarning"), "cascade_routing.serving"),
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'cascade_routing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next access does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
