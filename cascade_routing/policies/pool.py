"""The model pool of a policy: which models it may run, fitted on calibration data.

A model is *dominated* when another model is no more expensive and better on average: in the
cost–quality plane of the calibration rows (mean cost, mean quality per model) it lies below the
frontier. :func:`nondominated_models` keeps, cheapest first, each model whose mean quality is strictly
above that of every cheaper kept model (equal cost: the better model first, so the worse one is
dominated; equal cost and quality: the lower index is kept). Running a dominated
model inside a cascade or a supermodel spends budget that a frontier model would spend better on
average, so cascades and cascade routing are restricted to the frontier (:class:`PooledPolicy`); the
chain of a cascade is then the frontier in the models' index order, which is the dataset's cost order
(:class:`~cascade_routing.data.RoutingDataset` sorts its models by mean cost, and its splits keep that
order), so the pool is walked in that order too (:func:`nondominated_pool`). Routing keeps every model:
it chooses one model per query from that query's own estimates.

Pure torch / numpy; no Lightning, no transformers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies.base import Policy, PolicyError


def nondominated_models(mean_cost: np.ndarray, mean_quality: np.ndarray) -> np.ndarray:
    """Indices of non-dominated models, cheapest first (see module docstring). ``mean_cost`` and
    ``mean_quality`` [M]: 1-D, same length, not NaN (PolicyError otherwise: a NaN quality would
    silently drop its model)."""
    mean_cost, mean_quality = np.asarray(mean_cost), np.asarray(mean_quality)
    if mean_cost.ndim != 1 or mean_cost.shape != mean_quality.shape:
        raise PolicyError(f"mean_cost and mean_quality must be 1-D, one entry per model, got shapes "
                          f"{mean_cost.shape} and {mean_quality.shape}")
    if np.isnan(mean_cost.astype(np.float64)).any() or np.isnan(mean_quality.astype(np.float64)).any():
        raise PolicyError("NaN in mean_cost or mean_quality")
    order = np.lexsort((-mean_quality.astype(np.float64), mean_cost))  # by cost, then best first
    keep, best = [], -np.inf
    for i in order:
        if mean_quality[i] > best:
            keep.append(int(i))
            best = mean_quality[i]
    return np.asarray(keep, dtype=np.int64)


def nondominated_pool(quality, cost) -> tuple[int, ...]:
    """The frontier of per-query ``quality``/``cost`` [N, M] (calibration rows), in model-index order.

    Walked in model-index order, the order the cascades run (the dataset's cost order, cheapest
    first): a model is kept when its mean quality is strictly above that of every kept model before
    it. Where the rows' own mean costs order the models the same way (every model apart from near
    ties), this is :func:`nondominated_models`; where two near-tied models swap places on these rows,
    the chain still never escalates to a model that an earlier one beats on average. ``cost`` is
    checked for its shape only."""
    q = np.asarray(quality.cpu() if isinstance(quality, Tensor) else quality, dtype=np.float64)
    c = np.asarray(cost.cpu() if isinstance(cost, Tensor) else cost, dtype=np.float64)
    if q.ndim != 2 or q.shape != c.shape or q.shape[0] == 0:
        raise PolicyError(f"pool fitting needs quality and cost of shape [N >= 1, M], got {q.shape} and {c.shape}")
    return tuple(int(i) for i in nondominated_models(np.arange(q.shape[1], dtype=np.float64), q.mean(0)))


def checked_pool(pool) -> tuple[int, ...]:
    """``pool`` as a sorted tuple of distinct model indices >= 0 (non-empty), else PolicyError."""
    out = tuple(sorted(int(i) for i in pool))
    if not out or len(set(out)) != len(out) or out[0] < 0:
        raise PolicyError(f"a pool must be distinct model indices >= 0, got {out}")
    return out


def check_pool_fits(pool: tuple[int, ...], num_models: int) -> None:
    """Raise unless every index of ``pool`` names one of ``num_models`` models."""
    if pool[-1] >= num_models:
        raise PolicyError(f"pool {list(pool)} names model index {pool[-1]} but there are {num_models} models")


def reindex_pool(pool: tuple[int, ...], cols: list[int]) -> tuple[int, ...]:
    """The pool's members among the model columns ``cols``, as positions in ``cols`` (may be empty)."""
    return tuple(i for i, c in enumerate(cols) if c in pool)


class PooledPolicy(Policy):
    """``inner`` run on the columns ``pool`` only (model indices into the full model list).

    ``decide``/``select`` take and return full-width tensors and model indices; models outside the
    pool are never chosen, and a ran-set holding one is an error (it cannot come from this policy).
    """

    def __init__(self, inner: Policy, pool: tuple[int, ...] | list[int]) -> None:
        self.inner = inner
        self.pool = checked_pool(pool)
        self.name = inner.name
        self.max_depth = inner.max_depth
        self.lambda_shapes = inner.lambda_shapes

    def __repr__(self) -> str:
        return f"PooledPolicy({self.inner!r}, pool={list(self.pool)})"

    def _cols(self, m: int, device) -> Tensor:
        check_pool_fits(self.pool, m)
        return torch.tensor(self.pool, dtype=torch.long, device=device)

    def max_steps(self, num_models: int) -> int:
        return self.inner.max_steps(len(self.pool))

    def on_columns(self, cols: list[int]) -> Policy:
        """Re-indexed to the columns ``cols``; the bare policy if none of the pool is left."""
        pool = reindex_pool(self.pool, cols)
        return PooledPolicy(self.inner, pool) if pool else self.inner

    def decide(self, estimate: QualityEstimate, cost: Tensor, ran: Tensor, lam: Tensor | float, **kwargs) -> Tensor:
        b, m = estimate.mean.shape
        cols = self._cols(m, cost.device)
        outside = ran.clone()
        outside[:, cols] = False
        if bool(outside.any()):
            row, col = (int(x) for x in outside.nonzero()[0])
            raise PolicyError(f"model {col} ran for batch row {row} but is outside this policy's pool {list(self.pool)}")
        nxt = self.inner.decide(estimate.take(cols=cols), cost.index_select(1, cols), ran.index_select(1, cols), lam,
                                **kwargs)
        return torch.where(nxt >= 0, cols[nxt.clamp_min(0)], nxt)

    def select(self, estimate: QualityEstimate, ran: Tensor) -> Tensor:
        cols = self._cols(estimate.mean.shape[1], ran.device)
        pick = self.inner.select(estimate.take(cols=cols), ran.index_select(1, cols))
        return torch.where(pick >= 0, cols[pick.clamp_min(0)], pick)
