"""λ/γ tables of an artifact: for every strategy and budget, λ fitted on the calibration split.

Budgets: ``budgets_per_pair`` between consecutive non-dominated models by calibration cost (the
paper's grid); a budget below what the cost estimates can reach is fitted at that floor
(:func:`min_reachable_budget`), and one below what a strategy can spend (a cascade always runs its
chain's first model) at that strategy's floor (:func:`~cascade_routing.policies.fitting.fit_reachable_lambdas`). Cascade routing also chooses per budget among its λ shapes and the
guards, routing, the best single model the budget affords and the optimal cascade over the pool
(:func:`~cascade_routing.policies.fitting.fit_lambda`).
"""

from __future__ import annotations

import numpy as np
import torch

from cascade_routing.calibration.binding import bind_split
from cascade_routing.estimators.artifact import EstimatorArtifact
from cascade_routing.evaluation.metrics import sweep_budgets
from cascade_routing.policies.fitting import fit_reachable_lambdas, query_uniforms
from cascade_routing.policies.registry import STRATEGIES


def min_reachable_budget(cost_estimator, cost: np.ndarray) -> float:
    """Mean true cost when every query runs only its cheapest model *by estimate* (λ → ∞).

    No policy driven by these cost estimates can spend less, so budgets below it are raised to it.
    """
    n, m = cost.shape
    est = cost_estimator.estimate(torch.arange(n), torch.zeros(n, m, dtype=torch.bool))
    pick = est.argmin(1).numpy()
    return float(cost[np.arange(n), pick].mean())


def fit_lambda_tables(
    artifact: EstimatorArtifact,
    split,
    strategies=STRATEGIES,
    budgets_per_pair: int = 3,
    num_samples: int = 128,
    progress: bool = True,
) -> dict[str, dict[float, object]]:
    """strategy -> {budget: FittedLambda} fitted on ``split`` (the calibration split).

    A budget below what the cost estimates can reach (:func:`min_reachable_budget`), or below what
    the strategy can spend, is fitted at that floor; the table key stays the requested budget and the
    FittedLambda records its own.
    """
    ds = split.dataset
    qe, ce = bind_split(artifact, split)
    budgets = sweep_budgets(ds.cost.mean(0), ds.quality.mean(0), budgets_per_pair)
    floor = max(float(ds.cost.mean(0).min()), min_reachable_budget(ce, ds.cost) * (1 + 1e-6))
    uniforms = query_uniforms(ds.queries)
    out: dict[str, dict[float, object]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(strategies), desc="fit λ (calibration)", unit="strategy", leave=False)
    for strategy in strategies:
        policy = artifact.policy(strategy, num_samples=num_samples)
        # every budget of the strategy at once (the bisections advance together, batched)
        fits = fit_reachable_lambdas(policy, qe, ce, ds.quality, ds.cost, [max(float(b), floor) for b in budgets],
                                     uniforms=uniforms, cache={})[0]
        out[strategy] = {float(b): f for b, f in zip(budgets, fits)}
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out
