"""Per-budget comparison of two strategies swept on the same test queries and budgets.

For strategies A and B swept by :func:`~cascade_routing.evaluation.sweep.budget_sweep` over the same
budgets and test rows, at every budget ``b``: the mean paired quality difference
``d_b = mean_i(q^A_{b,i} − q^B_{b,i})`` with a percentile bootstrap CI over queries, and each
strategy's budget adherence ``mean_i(c_{b,i}) / b`` (realised mean test cost over the budget; over
what the strategy spends with cost ignored where that is less, :func:`spend_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BudgetComparison:
    """Rows per budget: ``budget``, mean quality and cost of A and B, ``diff`` = A − B, its CI."""

    budgets: np.ndarray
    quality_a: np.ndarray
    quality_b: np.ndarray
    cost_a: np.ndarray
    cost_b: np.ndarray
    diff: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray

    @property
    def worst_index(self) -> int:
        """Index of the budget where A trails B the most."""
        return int(np.argmin(self.diff))

    @property
    def worst(self) -> tuple[float, float]:
        """(budget, diff) where A trails B the most."""
        i = self.worst_index
        return float(self.budgets[i]), float(self.diff[i])


def compare_per_budget(a, b, num_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> BudgetComparison:
    """Paired per-budget differences of sweep results ``a`` − ``b`` (see module docstring)."""
    # no absolute tolerance: budgets are USD per query, and allclose's default atol (1e-8) equated 1e-9 and 5e-9
    if (a.per_query_quality.shape != b.per_query_quality.shape
            or not np.allclose(a.budgets, b.budgets, atol=0.0)):
        raise ValueError(f"sweeps {a.strategy!r} and {b.strategy!r} do not share budgets and test queries")
    diff_q = a.per_query_quality - b.per_query_quality  # [P, N]
    low, high = _bootstrap_interval(diff_q, num_resamples, seed, level)
    return BudgetComparison(np.asarray(a.budgets, dtype=np.float64), a.qualities, b.qualities, a.costs, b.costs,
                            diff_q.mean(1), low, high)


def _bootstrap_interval(per_query: np.ndarray, num_resamples: int, seed: int, level: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI [P] of the row means of ``per_query`` [P, N], queries (columns) resampled."""
    per_query = np.asarray(per_query, dtype=np.float64)
    n = per_query.shape[1]
    rng = np.random.default_rng(seed)
    means = np.stack([per_query[:, rng.integers(0, n, n)].mean(1) for _ in range(num_resamples)])  # [R, P]
    alpha = (1.0 - level) / 2
    return np.quantile(means, alpha, axis=0), np.quantile(means, 1 - alpha, axis=0)


def spend_targets(result) -> np.ndarray:
    """The mean cost each budget's fit aims at: the budget (as raised to the reachable floor, the fit's
    ``budget``), or that fit's calibration cost where the fit spends a fixed amount below the budget:
    λ = 0 (the strategy spends less than the budget even with cost ignored) or one model run alone
    (the single-model guard, ``models``). A sweep without fits (linear interpolation): its budgets."""
    budgets = np.asarray(result.budgets, dtype=np.float64)
    fitted = getattr(result, "fitted", None) or []
    if len(fitted) != budgets.size:
        return budgets
    targets = []
    for b, f in zip(budgets, fitted):
        unconstrained = float(f.lam_low.abs().max()) == 0.0 and float(f.lam_high.abs().max()) == 0.0
        fixed = unconstrained or getattr(f, "models", None) is not None
        if fixed and f.calibration_cost is not None:
            targets.append(float(f.calibration_cost))
        else:
            targets.append(float(f.budget) if f.budget is not None else float(b))
    return np.asarray(targets, dtype=np.float64)


def budget_adherence(result) -> np.ndarray:
    """Realised mean test cost over the cost each fit aims at (:func:`spend_targets`), per budget of a sweep."""
    return np.asarray(result.costs, dtype=np.float64) / spend_targets(result)


def adherence_interval(result, num_resamples: int = 1000, seed: int = 0, level: float = 0.95
                       ) -> tuple[float, float, float]:
    """``(mean, low, high)``: the sweep's mean budget adherence ``(1/P) Σ_b mean_i(c_{b,i}) / t_b`` (t_b:
    :func:`spend_targets`) and its percentile bootstrap CI, the test queries resampled (one draw shared
    by every budget)."""
    ratio = np.asarray(result.per_query_cost, dtype=np.float64) / spend_targets(result)[:, None]
    per_query = ratio.mean(0, keepdims=True)  # [1, N]: Σ_b c_{b,i} / (P b), whose mean over i is the adherence
    low, high = _bootstrap_interval(per_query, num_resamples, seed, level)
    return float(per_query.mean()), float(low[0]), float(high[0])


def paired_interval(a: np.ndarray, b: np.ndarray, num_resamples: int = 1000, seed: int = 0, level: float = 0.95
                    ) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``mean_i(a_i − b_i)`` for per-query values on the same queries, with a
    percentile bootstrap CI over queries."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired values must be non-empty and of the same length, got {a.size} and {b.size}")
    diff = (a - b)[None, :]
    low, high = _bootstrap_interval(diff, num_resamples, seed, level)
    return float(diff.mean()), float(low[0]), float(high[0])
