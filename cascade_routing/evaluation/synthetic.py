"""Synthetic and oracle estimators (the paper's RouterBench experiment).

Synthetic quality: for every query i and model m draw two noisy observations of the ground truth,
``before = y + N(0, σ_before²)`` and ``after = y + N(0, σ_after²)``; recalibrate each by a per-model
least-squares linear fit ``y ≈ a·noisy + b`` on the fit rows. The ex-ante estimate of an unrun model
is its recalibrated ``before`` value with std ``σ_m = std(before_cal − after_cal)`` (fit rows); a run
model carries its recalibrated ``after`` value with std 0. Synthetic cost: the same construction with
the cost noise levels for unrun models (clamped at 0: a cost is never negative), the exact cost for
run models (costs of run models are known).

Oracle: the exact quality (std 0) and exact cost, whatever ran.

Estimators are bound to the table of rows they were built on and addressed by row index.
Pure torch/numpy; seeded (same seed, same draws).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cascade_routing.interfaces import QualityEstimate, checked_row_ids


@dataclass(frozen=True)
class NoiseLevel:
    """Noise standard deviations (quality before/after running, cost before/after running)."""

    quality_before: float
    quality_after: float
    cost_before: float
    cost_after: float


NOISE_PRESETS: dict[str, NoiseLevel] = {
    "low": NoiseLevel(0.6, 0.3, 0.0002, 0.00005),
    "medium": NoiseLevel(1.6, 0.8, 0.0004, 0.0001),
    "high": NoiseLevel(2.4, 1.2, 100.0, 100.0),
}


def _noise(noise: str | NoiseLevel) -> NoiseLevel:
    if isinstance(noise, NoiseLevel):
        return noise
    if noise not in NOISE_PRESETS:
        raise ValueError(f"unknown noise preset {noise!r}; choose one of {sorted(NOISE_PRESETS)}")
    return NOISE_PRESETS[noise]


def _recalibrate(noisy: np.ndarray, truth: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """Per-column least-squares fit truth ≈ a·noisy + b on ``fit_rows``, applied to all rows."""
    out = np.empty_like(noisy)
    for m in range(noisy.shape[1]):
        x, y = noisy[fit_rows, m], truth[fit_rows, m]
        var = x.var()
        a = 0.0 if var == 0 else ((x - x.mean()) * (y - y.mean())).mean() / var
        b = y.mean() - a * x.mean()
        out[:, m] = a * noisy[:, m] + b
    return out


def _table(values, models: list[str], name: str) -> np.ndarray:
    """``values`` as float64 [N, M] with one column per model, or a ValueError naming ``name``."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(models):
        raise ValueError(f"{name} must be [N, M={len(models)}], got shape {x.shape}")
    return x


def _as_rows(fit_rows, n: int) -> np.ndarray:
    """``fit_rows`` (default: every row) as int64 [K], K >= 2; ValueError unless they are integer row
    ids in [0, N) (a bool mask would be read as the ids 0 and 1, a negative id from the end, a [K, 1]
    column would make σ a matrix)."""
    rows = np.arange(n) if fit_rows is None else checked_row_ids(fit_rows, n, "fit_rows")
    if rows.size < 2:
        raise ValueError(f"the linear recalibration needs at least 2 fit rows, got {rows.size}")
    return rows


class _MovableTables:
    """``to(device)``: move every tensor attribute (the bound tables) in place; returns self."""

    def to(self, device):
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self


class SyntheticQualityEstimator(_MovableTables):
    """Ground truth + Gaussian noise, recalibrated per model (see module docstring)."""

    def __init__(self, quality: np.ndarray, models: list[str], noise: str | NoiseLevel = "low",
                 fit_rows=None, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        y = _table(quality, models, "quality")
        if not np.isfinite(y).all():
            raise ValueError("quality has non-finite values")
        level = _noise(noise)
        rows = _as_rows(fit_rows, y.shape[0])
        rng = np.random.default_rng(seed)
        before = _recalibrate(y + rng.normal(0, level.quality_before, y.shape), y, rows)
        after = _recalibrate(y + rng.normal(0, level.quality_after, y.shape), y, rows)
        self.models = list(models)
        self.sigma = torch.tensor((before[rows] - after[rows]).std(0), dtype=dtype)
        self.before = torch.tensor(before, dtype=dtype)
        self.after = torch.tensor(after, dtype=dtype)

    def estimate(self, queries: Tensor, ran: Tensor) -> QualityEstimate:
        q = queries.to(self.before.device)
        ran = ran.to(self.before.device)
        mean = torch.where(ran, self.after[q], self.before[q])
        std = torch.where(ran, torch.zeros_like(mean), self.sigma.expand_as(mean))
        return QualityEstimate(mean, std=std)


class SyntheticCostEstimator(_MovableTables):
    """Exact cost once run; before, ground truth + noise recalibrated per model, clamped at 0."""

    def __init__(self, cost: np.ndarray, models: list[str], noise: str | NoiseLevel = "low",
                 fit_rows=None, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        c = _table(cost, models, "cost")
        if not np.isfinite(c).all():
            raise ValueError("cost has non-finite values")
        level = _noise(noise)
        rows = _as_rows(fit_rows, c.shape[0])
        rng = np.random.default_rng(seed + 1_000_003)
        before = _recalibrate(c + rng.normal(0, level.cost_before, c.shape), c, rows).clip(min=0)
        self.models = list(models)
        self.before = torch.tensor(before, dtype=dtype)
        self.exact = torch.tensor(c, dtype=dtype)

    def estimate(self, queries: Tensor, ran: Tensor) -> Tensor:
        q = queries.to(self.exact.device)
        return torch.where(ran.to(self.exact.device), self.exact[q], self.before[q])


class OracleQualityEstimator(_MovableTables):
    """The exact quality of every model (std 0), whatever ran."""

    def __init__(self, quality: np.ndarray, models: list[str], dtype: torch.dtype = torch.float32) -> None:
        self.models = list(models)
        self.quality = torch.as_tensor(np.asarray(quality, dtype=np.float64), dtype=dtype)

    def estimate(self, queries: Tensor, ran: Tensor) -> QualityEstimate:
        mean = self.quality[queries.to(self.quality.device)]
        return QualityEstimate(mean, std=torch.zeros_like(mean))


class OracleCostEstimator(_MovableTables):
    """The exact cost of every model, whatever ran."""

    def __init__(self, cost: np.ndarray, models: list[str], dtype: torch.dtype = torch.float32) -> None:
        self.models = list(models)
        self.cost = torch.as_tensor(np.asarray(cost, dtype=np.float64), dtype=dtype)

    def estimate(self, queries: Tensor, ran: Tensor) -> Tensor:
        return self.cost[queries.to(self.cost.device)]


def synthetic_estimators(dataset, noise: str | NoiseLevel = "low", fit_rows=None, seed: int = 0,
                         dtype: torch.dtype = torch.float32):
    """(quality, cost) synthetic estimators bound to every row of a RoutingDataset (module docstring).

    ``noise``: a preset name (``"low"``, ``"medium"``, ``"high"``: :data:`NOISE_PRESETS`) or a
    :class:`NoiseLevel`. ``fit_rows``: integer row ids in [0, N) (at least 2; default: every row)
    on which each model's linear recalibration and σ are fitted: pass the λ-fitting rows, so the test
    rows stay out of it. ``seed``: the noise draws (same seed, same estimators). ValueError for an
    unknown preset, bad ``fit_rows`` or non-finite quality/cost."""
    return (
        SyntheticQualityEstimator(dataset.quality, dataset.models, noise, fit_rows, seed, dtype),
        SyntheticCostEstimator(dataset.cost, dataset.models, noise, fit_rows, seed, dtype),
    )


def oracle_estimators(dataset, dtype: torch.dtype = torch.float32):
    """(quality, cost) oracle estimators bound to every row of a RoutingDataset."""
    return OracleQualityEstimator(dataset.quality, dataset.models, dtype), OracleCostEstimator(
        dataset.cost, dataset.models, dtype)
