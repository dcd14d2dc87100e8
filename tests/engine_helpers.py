"""Synthetic outcomes and estimators shared by the engine tests (simulation, λ fitting, λ shapes)."""

from __future__ import annotations

import numpy as np

from cascade_routing.evaluation.synthetic import SyntheticCostEstimator, SyntheticQualityEstimator


def make_data(n: int = 300, m: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(quality 0/1 [n, m], cost [n, m]): model j answers correctly with probability rising in j,
    costs geometric from 1e-4 to 5e-3 with ±30% per-query noise."""
    rng = np.random.default_rng(seed)
    skill = np.linspace(0.35, 0.85, m)
    quality = (rng.random((n, m)) < skill).astype(float)
    cost = np.geomspace(1e-4, 5e-3, m)[None, :] * rng.uniform(0.7, 1.3, (n, m))
    return quality, cost


def synthetic_pair(quality: np.ndarray, cost: np.ndarray, noise: str, fit_rows: int, seed: int = 0,
                   cost_noise: str | None = None):
    """Seeded synthetic (quality, cost) estimators over models m0..m{M-1}, fitted on rows [0, fit_rows);
    the cost estimator's noise is ``cost_noise`` (default: ``noise``)."""
    models = [f"m{i}" for i in range(quality.shape[1])]
    rows = np.arange(fit_rows)
    return (SyntheticQualityEstimator(quality, models, noise, rows, seed=seed),
            SyntheticCostEstimator(cost, models, cost_noise or noise, rows, seed=seed))
