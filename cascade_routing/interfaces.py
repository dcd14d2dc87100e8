"""The estimator interface every policy, simulation and server consumes (the stage between data and policies).

An estimator is *bound* to a table of queries (a dataset split, or the single query a server is
answering) and is addressed by row index, so that the engine never sees text:

- ``QualityEstimator.estimate(queries, ran) -> QualityEstimate``: for row indices ``queries``
  (long [B]) and the state ``ran`` (bool [B, M], which models have already run for each query),
  the estimated quality of *every* model given what has been observed: ``mean`` [B, M] and an
  uncertainty, either ``std`` [B, M] (independent Gaussians) or ``cov`` [B, M, M].
  Models that have run carry their post-hoc estimate (uncertainty ~0 when the answer is known).
- ``CostEstimator.estimate(queries, ran) -> Tensor`` [B, M]: estimated cost in USD of every model;
  exact for models in ``ran``.
- :func:`bitmask`: the integer id of a ran-set, shared by policies (E[max] caches) and estimators
  (per-ran-set tables).
- :func:`checked_queries`: the query texts (or tasks) an estimator is bound to, one string per query.
- :func:`checked_row_ids`: row ids into such a table, checked (no bool masks, fractions or negatives).

This module is pure torch: no Lightning, no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class QualityEstimate:
    """Gaussian belief over each model's quality: mean [B, M] and std [B, M] or cov [B, M, M]."""

    mean: Tensor
    std: Tensor | None = None
    cov: Tensor | None = None

    def __post_init__(self) -> None:
        if self.mean.dim() != 2:
            raise ValueError(f"QualityEstimate.mean must be [B, M], got shape {tuple(self.mean.shape)}")
        if self.std is not None and self.std.shape != self.mean.shape:
            raise ValueError(
                f"QualityEstimate.std shape {tuple(self.std.shape)} != mean shape {tuple(self.mean.shape)}"
            )
        if self.cov is not None and self.cov.shape != (*self.mean.shape, self.mean.shape[-1]):
            raise ValueError(f"QualityEstimate.cov must be [B, M, M], got {tuple(self.cov.shape)}")

    @property
    def has_uncertainty(self) -> bool:
        return self.std is not None or self.cov is not None

    def take(self, rows: Tensor | None = None, cols: Tensor | list[int] | None = None) -> "QualityEstimate":
        """The belief restricted to the query rows ``rows`` and the model columns ``cols`` (long
        indices, None: all); ``cov`` is restricted on both of its model axes."""
        mean, std, cov = self.mean, self.std, self.cov
        if rows is not None:
            r = torch.as_tensor(rows, dtype=torch.long).to(mean.device)
            mean, std, cov = (None if t is None else t.index_select(0, r) for t in (mean, std, cov))
        if cols is not None:
            c = torch.as_tensor(cols, dtype=torch.long).to(mean.device)
            mean, std = (None if t is None else t.index_select(1, c) for t in (mean, std))
            cov = None if cov is None else cov.index_select(1, c).index_select(2, c)
        return QualityEstimate(mean, std, cov)

    def to(self, device: torch.device | str) -> "QualityEstimate":
        return QualityEstimate(
            self.mean.to(device),
            None if self.std is None else self.std.to(device),
            None if self.cov is None else self.cov.to(device),
        )


@runtime_checkable
class QualityEstimator(Protocol):
    """Quality belief given the ran-state. ``models`` names the M columns, cheapest first."""

    models: list[str]

    def estimate(self, queries: Tensor, ran: Tensor) -> QualityEstimate: ...


@runtime_checkable
class CostEstimator(Protocol):
    """Estimated USD cost of every model [B, M]; exact for models already run."""

    models: list[str]

    def estimate(self, queries: Tensor, ran: Tensor) -> Tensor: ...


def bitmask(ran: Tensor) -> Tensor:
    """long [B]: the id of each row's ran-set, ``Σ_m ran[b, m] · 2^m`` (bit m set iff model m ran)."""
    weights = 2 ** torch.arange(ran.shape[-1], device=ran.device)
    return (ran.long() * weights).sum(-1)


def checked_queries(texts: Any, what: str = "queries", allow_none: bool = False) -> list:
    """``texts`` as a list, one string per query; ``TypeError`` naming ``what`` for a single string
    (which would otherwise be read as one query per character) or for an item that is not a string
    (``None`` allowed with ``allow_none``: a query without a task)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of strings, one per query, got a single "
                        f"{type(texts).__name__} (for one query, wrap it in a list)")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str) and not (allow_none and text is None):
            raise TypeError(f"{what}[{i}] is of type {type(text).__name__}, not str")
    return out


def checked_row_ids(rows: Any, n: int | None, what: str = "query row ids",
                    out_of_range: type[Exception] = ValueError) -> np.ndarray:
    """``rows`` as int64 [K]: a 1-D sequence (list, array or tensor) of integer ids in [0, ``n``)
    (``n=None``: ids >= 0, for callers that do not hold the table).

    ``ValueError`` naming ``what`` for a bool mask (it would be read as the ids 0 and 1), a
    fractional or non-finite id (it would be truncated to another row) or a shape other than 1-D
    (a [K, 1] column); ``out_of_range`` for an id outside [0, n) (a negative one would silently
    index from the end of the table). Both name the first bad id and its position. Estimators pass
    ``IndexError``, the error an out-of-range index raises, which the rollout turns into a message
    naming the estimator."""
    raw = np.asarray(rows.detach().cpu() if isinstance(rows, Tensor) else rows)
    if raw.dtype == bool:
        raise ValueError(f"{what} must be integer row ids, got a bool mask (use np.nonzero(mask)[0])")
    if raw.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of row ids, got shape {raw.shape}")
    if raw.size and not np.issubdtype(raw.dtype, np.integer):
        if not np.issubdtype(raw.dtype, np.floating):
            raise ValueError(f"{what} must be integer row ids, got dtype {raw.dtype}")
        fractional = ~np.isfinite(raw) | (raw != np.round(raw))
        if fractional.any():
            i = int(np.flatnonzero(fractional)[0])
            raise ValueError(f"{what} must be integer row ids, got {raw[i].item()!r} at position {i}")
    out = raw.astype(np.int64)
    bad = (out < 0) if n is None else (out < 0) | (out >= n)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        allowed = ">= 0" if n is None else f"in [0, {n})"
        raise out_of_range(f"{what} must lie {allowed}, got {int(out[i])} at position {i}")
    return out
