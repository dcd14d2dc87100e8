"""Quality–cost curves and the paper's AUC.

- :func:`nondominated_models`: models sorted by mean cost, keeping each model whose mean quality
  is strictly above every cheaper kept model.
- :func:`sweep_budgets`: ``per_pair`` budgets evenly spaced (``linspace``, endpoints included, shared
  endpoints once) between the mean costs of each consecutive pair of non-dominated models.
- :func:`protocol_budgets`: :func:`sweep_budgets` on the test split, plus the most expensive
  non-dominated model's mean cost on the fit (calibration) rows when that is higher: λ is fitted on
  those costs, and below that budget no policy can afford the model for every query there.
- :func:`auc`: area under the linearly interpolated curve through the (cost, quality) points on
  ``[c_min, c_max]`` (cheapest and most expensive model's mean cost), extended flat to the right of the
  last point and starting at ``(c_min, q_lowest)`` (the lowest single-model quality) on the left when
  every point costs more than ``c_min``, divided by ``c_max − c_min``, ×100. A point at or left of
  ``c_min`` is part of the curve, so the curve's value at ``c_min`` is interpolated through it (a
  bootstrap resample moves the cheapest point's cost around the fixed ``c_min``; dropping it there
  made a curve of one point, e.g. with a single non-dominated model, score ``q_lowest``).
- :func:`linear_interpolation_curve`: the baseline that mixes consecutive non-dominated models.
- :func:`bootstrap_auc`: percentile 95% CI over resampled test queries.
- :func:`paired_auc_interval`: AUC(A) − AUC(B) of two strategies on the same test queries, with a
  percentile CI from the same resamples for both (paired).
"""

from __future__ import annotations

import numbers
from functools import lru_cache

import numpy as np

from cascade_routing.policies.pool import nondominated_models  # one rule for pools and sweeps


def _points(name: str, costs, qualities) -> tuple[np.ndarray, np.ndarray]:
    """``costs``/``qualities`` as float64 1-D arrays of the same length with finite values, else a
    ValueError naming ``name``'s inputs."""
    c = np.asarray(costs, dtype=np.float64)
    q = np.asarray(qualities, dtype=np.float64)
    if c.ndim != 1 or c.shape != q.shape:
        raise ValueError(f"{name} needs 1-D costs and qualities of the same length, got shapes {c.shape} and {q.shape}")
    for what, x in (("cost", c), ("quality", q)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: {what} of point {int(np.nonzero(~np.isfinite(x))[0][0])} is {x[~np.isfinite(x)][0]}")
    return c, q


def sweep_budgets(mean_cost: np.ndarray, mean_quality: np.ndarray, per_pair: int = 10) -> np.ndarray:
    """Budgets between consecutive non-dominated models (see module docstring): ``mean_cost`` and
    ``mean_quality`` [M] per model (finite), ``per_pair`` an integer >= 1 (ValueError otherwise).
    ``linspace(a, b, 1)`` is ``[a]``, so ``per_pair = 1`` gives the cheapest non-dominated model's
    cost alone; from 2 on, every non-dominated model's cost is one of the budgets. With a single
    non-dominated model (the cheapest model is also the best on average) the grid is that model's
    cost alone: there is nothing to trade, every strategy's curve is that model's point and its
    :func:`auc` is flat at that model's quality, a result rather than an error."""
    if isinstance(per_pair, bool) or not isinstance(per_pair, numbers.Integral) or per_pair < 1:
        raise ValueError(f"per_pair must be an integer >= 1, got {per_pair!r}")
    mean_cost, mean_quality = _points("sweep_budgets", mean_cost, mean_quality)
    if mean_cost.size == 0:
        raise ValueError("sweep_budgets needs at least one model")
    nd = nondominated_models(mean_cost, mean_quality)
    costs = mean_cost[nd]
    if len(nd) == 1:
        return costs.copy()
    parts = [np.linspace(costs[i], costs[i + 1], per_pair) for i in range(len(nd) - 1)]
    out = [parts[0]] + [p[1:] for p in parts[1:]]
    return np.concatenate(out)


def protocol_budgets(test_mean_cost: np.ndarray, test_mean_quality: np.ndarray, fit_mean_cost: np.ndarray,
                     per_pair: int) -> np.ndarray:
    """The evaluation protocol's budgets (see module docstring): ``sweep_budgets`` of the test split's
    models, then ``fit_mean_cost[top]`` appended if it exceeds the last budget (``top``: the test split's
    most expensive non-dominated model)."""
    budgets = sweep_budgets(np.asarray(test_mean_cost), np.asarray(test_mean_quality), per_pair)
    top = int(nondominated_models(np.asarray(test_mean_cost), np.asarray(test_mean_quality))[-1])
    top_fit = float(np.asarray(fit_mean_cost, dtype=np.float64)[top])
    return np.append(budgets, top_fit) if top_fit > budgets[-1] * (1 + 1e-9) else budgets


def auc(costs: np.ndarray, qualities: np.ndarray, c_min: float, c_max: float, q_lowest: float) -> float:
    """The paper's AUC (×100) of the curve through points (costs[i], qualities[i]); see module docstring.

    ``costs``/``qualities``: 1-D, same length, finite; ``c_min`` < ``c_max`` and ``q_lowest`` finite
    (ValueError otherwise)."""
    costs, qualities = _points("AUC", costs, qualities)
    if not all(np.isfinite(v) for v in (c_min, c_max, q_lowest)):
        raise ValueError(f"AUC needs finite c_min, c_max and q_lowest, got {c_min}, {c_max}, {q_lowest}")
    if c_max <= c_min:
        raise ValueError(f"AUC needs c_max > c_min, got [{c_min}, {c_max}]")
    order = np.argsort(costs, kind="stable")
    x, y = costs[order], qualities[order]
    if x.size == 0 or x[0] > c_min:
        x, y = np.concatenate([[c_min], x]), np.concatenate([[q_lowest], y])
    grid = np.union1d(x[(x >= c_min) & (x <= c_max)], [c_min, c_max])
    vals = np.interp(grid, x, y)  # flat beyond the last point
    area = np.trapezoid(vals, grid) if hasattr(np, "trapezoid") else np.trapz(vals, grid)
    return float(100.0 * area / (c_max - c_min))


def linear_interpolation_curve(mean_cost: np.ndarray, mean_quality: np.ndarray, budgets: np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray]:
    """(cost, quality) of the baseline mixing consecutive non-dominated models at each budget."""
    nd = nondominated_models(mean_cost, mean_quality)
    c, q = mean_cost[nd], mean_quality[nd]
    b = np.clip(budgets, c[0], c[-1])
    return b, np.interp(b, c, q)


def _per_query(cost, quality) -> tuple[np.ndarray, np.ndarray]:
    """Per-query ``cost``/``quality`` [P, N] (P, N >= 1, same shape, finite) as float64, else ValueError."""
    c = np.asarray(cost, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    if c.ndim != 2 or c.shape != q.shape or 0 in c.shape:
        raise ValueError(f"bootstrap AUC needs per-query cost and quality of the same shape [P points >= 1, "
                         f"N queries >= 1], got {c.shape} and {q.shape}")
    if not (np.isfinite(c).all() and np.isfinite(q).all()):
        raise ValueError("bootstrap AUC: per-query cost and quality must be finite")
    return c, q


def _check_bootstrap(num_resamples: int, level: float) -> None:
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, numbers.Integral) or num_resamples < 1:
        raise ValueError(f"num_resamples must be an integer >= 1, got {num_resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


@lru_cache(maxsize=8)
def resample_weights(n: int, num_resamples: int, seed: int = 0) -> np.ndarray:
    """[R, n] read-only: row r is ``bincount(rng.integers(0, n, n)) / n`` (the r-th bootstrap resample
    of n queries as weights, ``rng = default_rng(seed)``); cached, as every curve of a table and its
    plot resample the same test queries with the same seed."""
    rng = np.random.default_rng(seed)
    w = np.empty((num_resamples, n), dtype=np.float64)
    for r in range(num_resamples):
        w[r] = np.bincount(rng.integers(0, n, n), minlength=n) / n
    w.setflags(write=False)
    return w


def bootstrap_auc(
    per_query_cost: np.ndarray, per_query_quality: np.ndarray, c_min: float, c_max: float,
    q_lowest: float, num_resamples: int = 500, seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:
    """Percentile CI of the AUC when the N test queries are resampled with replacement.

    ``per_query_cost``/``per_query_quality`` are [P, N]: the realised cost/quality of each query at
    each of the P curve points (budgets). The reference costs/quality (c_min, c_max, q_lowest) are
    held fixed. ``num_resamples`` >= 1, ``level`` in (0, 1); ValueError otherwise.
    """
    per_query_cost, per_query_quality = _per_query(per_query_cost, per_query_quality)
    _check_bootstrap(num_resamples, level)
    p, n = per_query_cost.shape
    weights = resample_weights(n, num_resamples, seed)
    values = np.empty(num_resamples)
    for r in range(num_resamples):
        counts = weights[r]
        values[r] = auc(per_query_cost @ counts, per_query_quality @ counts, c_min, c_max, q_lowest)
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def paired_auc_interval(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], c_min: float, c_max: float,
    q_lowest: float, num_resamples: int = 500, seed: int = 0, level: float = 0.95,
) -> tuple[float, float, float]:
    """``(AUC(a) − AUC(b), low, high)`` for two strategies' per-query ``(cost [P_a, N], quality [P_a, N])``
    and ``(cost [P_b, N], quality [P_b, N])`` on the same N test queries: resample r weighs the queries
    by :func:`resample_weights` row r for both strategies, and the CI is the percentile interval of the
    r differences. The reference (c_min, c_max, q_lowest) is held fixed, as in :func:`bootstrap_auc`."""
    (pc_a, pq_a), (pc_b, pq_b) = a, b
    n = pc_a.shape[1]
    if pc_b.shape[1] != n or pq_a.shape != pc_a.shape or pq_b.shape != pc_b.shape:
        raise ValueError(f"paired AUC needs both strategies' [P, N] cost and quality on the same N queries, got "
                         f"{pc_a.shape}/{pq_a.shape} and {pc_b.shape}/{pq_b.shape}")
    point = auc(pc_a.mean(1), pq_a.mean(1), c_min, c_max, q_lowest) - auc(pc_b.mean(1), pq_b.mean(1), c_min, c_max, q_lowest)
    weights = resample_weights(n, num_resamples, seed)
    diffs = np.array([auc(pc_a @ w, pq_a @ w, c_min, c_max, q_lowest) - auc(pc_b @ w, pq_b @ w, c_min, c_max, q_lowest)
                      for w in weights])
    alpha = (1 - level) / 2
    return float(point), float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha))


def paired_auc_gain_quantile(
    candidate: list[tuple[np.ndarray, np.ndarray]], default: list[tuple[np.ndarray, np.ndarray]],
    references: list[tuple[float, float, float]], q: float, num_resamples: int = 1000, seed: int = 0,
) -> float:
    """The ``q`` quantile of the bootstrap distribution of mean-over-folds AUC(candidate) − AUC(default).

    Each fold f gives both strategies' per-query ``(cost [P, N_f], quality [P, N_f])`` on the same
    N_f queries and its AUC reference ``(c_min, c_max, q_lowest)``; one resample draws the queries of
    every fold with replacement, the same draw for both strategies (paired).
    """
    rng = np.random.default_rng(seed)
    gains = np.empty(num_resamples)
    for r in range(num_resamples):
        total = 0.0
        for (pc_a, pq_a), (pc_b, pq_b), ref in zip(candidate, default, references):
            n = pc_a.shape[1]
            w = np.bincount(rng.integers(0, n, n), minlength=n) / n
            total += auc(pc_a @ w, pq_a @ w, *ref) - auc(pc_b @ w, pq_b @ w, *ref)
        gains[r] = total / len(references)
    return float(np.quantile(gains, q))
