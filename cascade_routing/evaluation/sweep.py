"""Budget sweeps: refit λ per budget on the fit rows, simulate on the test rows, compute the AUC.

Follows the paper's protocol (see :mod:`cascade_routing.evaluation.metrics`): budgets between the
pool's non-dominated models by mean *test* cost, λ (and γ) refitted per budget on the fit rows, the
curve of realised (mean test cost, mean test quality), its AUC with a bootstrap CI.
A budget below what the policy can spend *on the fit rows* cannot be fitted there: below the cheapest
model's mean cost, or below the mean cost of each query's cheapest model by estimate (λ fitting
raises :class:`~cascade_routing.policies.base.BudgetUnreachable` with that cost). It is raised to that
cost and counted in ``SweepResult.raised_budgets`` (never silently).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cascade_routing.evaluation.metrics import auc, bootstrap_auc, linear_interpolation_curve, nondominated_models
from cascade_routing.evaluation.simulate import simulate
from cascade_routing.interfaces import checked_queries, checked_row_ids
from cascade_routing.policies.base import Policy
from cascade_routing.policies.fitting import FittedLambda, fit_reachable_lambdas, query_uniforms
from cascade_routing.policies.lambda_table import checked_budget


@dataclass
class SweepResult:
    """One strategy's quality–cost curve on the test rows."""

    strategy: str
    budgets: np.ndarray
    costs: np.ndarray
    qualities: np.ndarray
    per_query_cost: np.ndarray  # [P, N_test]
    per_query_quality: np.ndarray  # [P, N_test]
    auc: float
    ci: tuple[float, float]
    fitted: list[FittedLambda] = field(default_factory=list)
    raised_budgets: int = 0


@dataclass(frozen=True)
class Reference:
    """Single-model reference points of the pool on the test rows."""

    mean_cost: np.ndarray
    mean_quality: np.ndarray

    @property
    def c_min(self) -> float:
        return float(self.mean_cost.min())

    @property
    def c_max(self) -> float:
        return float(self.mean_cost.max())

    @property
    def q_lowest(self) -> float:
        return float(self.mean_quality.min())


def reference_points(quality: np.ndarray, cost: np.ndarray) -> Reference:
    """The models' mean cost and quality on these rows; an error when every model costs the same on
    average (the AUC is taken over [cheapest, costliest] mean cost, an empty range)."""
    ref = Reference(np.asarray(cost, dtype=np.float64).mean(0), np.asarray(quality, dtype=np.float64).mean(0))
    if ref.c_max <= ref.c_min:
        raise ValueError(f"every model costs {ref.c_min:.6g} USD per query on average on these rows, so a cost "
                         "budget has nothing to trade off: routing, cascades and their AUC need models of "
                         "different cost")
    return ref


def _checked_rows(rows, n: int, name: str) -> np.ndarray:
    """``rows`` as int64 [K >= 1] of ids in [0, n) (:func:`~cascade_routing.interfaces.checked_row_ids`);
    ValueError naming ``name`` otherwise."""
    out = checked_row_ids(rows, n, name)
    if out.size == 0:
        raise ValueError(f"{name} must hold at least one row id")
    return out


def _checked_budgets(budgets) -> list[float]:
    """``budgets`` as a non-empty list of floats, each finite >= 0 (ValueError otherwise)."""
    arr = np.asarray(budgets.cpu() if isinstance(budgets, torch.Tensor) else budgets, dtype=object)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"budgets must be a non-empty 1-D sequence of budgets, got shape {arr.shape}")
    return [checked_budget(b) for b in arr]


def linear_interpolation_sweep(quality: np.ndarray, cost: np.ndarray, budgets: np.ndarray,
                               num_resamples: int = 500, seed: int = 0) -> SweepResult:
    """The baseline: at each budget mix the two enclosing non-dominated models (per-query expectation)."""
    ref = reference_points(quality, cost)
    nd = nondominated_models(ref.mean_cost, ref.mean_quality)
    c_nd = ref.mean_cost[nd]
    pq_cost, pq_quality = [], []
    for b in np.clip(budgets, c_nd[0], c_nd[-1]):
        hi = int(np.searchsorted(c_nd, b, side="left"))
        hi = min(max(hi, 1), len(nd) - 1) if len(nd) > 1 else 0
        lo = max(hi - 1, 0)
        span = c_nd[hi] - c_nd[lo]
        p = 0.0 if span <= 0 else (b - c_nd[lo]) / span
        pq_cost.append((1 - p) * cost[:, nd[lo]] + p * cost[:, nd[hi]])
        pq_quality.append((1 - p) * quality[:, nd[lo]] + p * quality[:, nd[hi]])
    pc, pqual = np.stack(pq_cost), np.stack(pq_quality)
    costs, quals = linear_interpolation_curve(ref.mean_cost, ref.mean_quality, budgets)
    a = auc(costs, quals, ref.c_min, ref.c_max, ref.q_lowest)
    ci = bootstrap_auc(pc, pqual, ref.c_min, ref.c_max, ref.q_lowest, num_resamples, seed)
    return SweepResult("linear_interpolation", np.asarray(budgets), costs, quals, pc, pqual, a, ci)


def budget_sweep(
    policy: Policy,
    quality_estimator,
    cost_estimator,
    quality: np.ndarray,
    cost: np.ndarray,
    fit_rows: np.ndarray,
    test_rows: np.ndarray,
    budgets: np.ndarray,
    texts: list[str] | None = None,
    strategy: str | None = None,
    num_resamples: int = 500,
    seed: int = 0,
    progress=None,
    overshoot_correction: bool = True,
) -> SweepResult:
    """Refit λ per budget on ``fit_rows`` and simulate on ``test_rows`` (row ids into ``quality``/``cost``
    [N, M] and into the estimators' table). ``texts`` (all N) give the per-query λ-mix uniforms;
    ``overshoot_correction``: see :mod:`cascade_routing.policies.fitting`.

    ``budgets``: a non-empty 1-D sequence of finite budgets >= 0 (USD per query); one below what the
    policy can spend on the fit rows is raised to that (module docstring). ValueError for a bad
    budget, rows that are not non-empty integer ids in [0, N) (a bool mask is refused), or ``texts``
    not one per row; bad ground truth raises :class:`~cascade_routing.policies.base.PolicyError`."""
    quality = np.asarray(quality, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if quality.ndim != 2 or cost.shape != quality.shape:
        raise ValueError(f"quality and cost must both be [N, M], got shapes {quality.shape} and {cost.shape}")
    fit_rows = _checked_rows(fit_rows, len(quality), "fit_rows")
    test_rows = _checked_rows(test_rows, len(quality), "test_rows")
    budgets = _checked_budgets(budgets)
    if texts is not None:
        texts = checked_queries(texts, "texts")
        if len(texts) != len(quality):
            raise ValueError(f"texts must hold one text per row of quality/cost ({len(quality)}), got {len(texts)}")
        u_all = query_uniforms(texts)
    else:
        u_all = torch.rand(len(quality), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = reference_points(quality[test_rows], cost[test_rows])
    floor = float(cost[fit_rows].mean(0).min())
    test_cache: dict = {}
    pc, pq = [], []
    # every budget's λ at once (the fits advance together, one batched simulation per round)
    fitted, b_fit = fit_reachable_lambdas(policy, quality_estimator, cost_estimator, quality[fit_rows], cost[fit_rows],
                                          [max(float(b), floor) for b in budgets], uniforms=u_all[fit_rows],
                                          rows=torch.as_tensor(fit_rows), cache={},
                                          overshoot_correction=overshoot_correction)
    raised = sum(bf > float(b) for bf, b in zip(b_fit, budgets))
    for f in fitted:
        res = simulate(policy, quality_estimator, cost_estimator, quality[test_rows], cost[test_rows], f,
                       u_all[test_rows], torch.as_tensor(test_rows), test_cache)
        pc.append(res.cost.numpy())
        pq.append(res.quality.numpy())
        if progress is not None:
            progress()
    pc_a, pq_a = np.stack(pc), np.stack(pq)
    costs, quals = pc_a.mean(1), pq_a.mean(1)
    a = auc(costs, quals, ref.c_min, ref.c_max, ref.q_lowest)
    ci = bootstrap_auc(pc_a, pq_a, ref.c_min, ref.c_max, ref.q_lowest, num_resamples, seed)
    return SweepResult(strategy or getattr(policy, "name", type(policy).__name__), np.asarray(budgets), costs,
                       quals, pc_a, pq_a, a, ci, fitted, raised)
