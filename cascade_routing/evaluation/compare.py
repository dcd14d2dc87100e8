"""Per-budget comparison of two strategies swept on the same test queries and budgets.

For strategies A and B swept by :func:`~cascade_routing.evaluation.sweep.budget_sweep` over the same
budgets and test rows, at every budget ``b``: the mean paired quality difference
``d_b = mean_i(q^A_{b,i} − q^B_{b,i})`` with a percentile bootstrap CI over queries, and each
strategy's budget adherence ``mean_i(c_{b,i}) / b`` (realised mean test cost over the budget).
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
    if a.per_query_quality.shape != b.per_query_quality.shape or not np.allclose(a.budgets, b.budgets):
        raise ValueError(f"sweeps {a.strategy!r} and {b.strategy!r} do not share budgets and test queries")
    diff_q = a.per_query_quality - b.per_query_quality  # [P, N]
    p, n = diff_q.shape
    rng = np.random.default_rng(seed)
    means = np.stack([diff_q[:, rng.integers(0, n, n)].mean(1) for _ in range(num_resamples)])  # [R, P]
    alpha = (1.0 - level) / 2
    return BudgetComparison(np.asarray(a.budgets, dtype=np.float64), a.qualities, b.qualities, a.costs, b.costs,
                            diff_q.mean(1), np.quantile(means, alpha, axis=0), np.quantile(means, 1 - alpha, axis=0))


def budget_adherence(result) -> np.ndarray:
    """Realised mean test cost over the budget, per budget of a sweep."""
    return np.asarray(result.costs, dtype=np.float64) / np.asarray(result.budgets, dtype=np.float64)
