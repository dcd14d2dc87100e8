"""Per-budget points of quality–cost curves, with a bootstrap band on the mean quality.

For a sweep with per-query cost/quality ``[P, N]`` (P budgets, N test queries), point ``p`` is
``(budget_p, mean_n cost[p, n], mean_n quality[p, n])``; its band is the percentile interval
(``level``) of the mean quality over ``num_resamples`` resamples of the N queries with replacement
(one resample of queries shared by all budgets, as in :func:`metrics.bootstrap_auc`).
"""

from __future__ import annotations

import numpy as np

from cascade_routing.evaluation.metrics import resample_weights

POINT_FIELDS = ("estimator", "strategy", "budget", "mean_cost", "mean_quality", "quality_ci_low", "quality_ci_high")


def quality_band(per_query_quality: np.ndarray, num_resamples: int = 200, seed: int = 0,
                 level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low [P], high [P]): percentile band of the mean quality at each of the P points."""
    q = np.asarray(per_query_quality, dtype=np.float64)
    n = q.shape[1]
    if num_resamples < 1 or n == 0:
        mean = q.mean(1) if n else np.full(q.shape[0], np.nan)
        return mean, mean
    weights = resample_weights(n, num_resamples, seed)
    means = q @ weights.T  # [P, R]
    alpha = (1 - level) / 2
    return np.quantile(means, alpha, axis=1), np.quantile(means, 1 - alpha, axis=1)


def curve_points(result, estimator: str, num_resamples: int = 200, seed: int = 0) -> list[dict]:
    """One row per budget of a :class:`~cascade_routing.evaluation.sweep.SweepResult` (fields :data:`POINT_FIELDS`)."""
    low, high = quality_band(result.per_query_quality, num_resamples, seed)
    return [
        {"estimator": estimator, "strategy": result.strategy, "budget": float(b), "mean_cost": float(c),
         "mean_quality": float(q), "quality_ci_low": float(lo), "quality_ci_high": float(hi)}
        for b, c, q, lo, hi in zip(result.budgets, result.costs, result.qualities, low, high)
    ]
