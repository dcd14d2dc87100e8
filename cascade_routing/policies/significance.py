"""Paired bootstrap: does a candidate beat the default by more than its own noise?

Every choice made on calibration data (λ shapes, uncertainty modes, guards) compares a candidate
with a default on the *same* queries. The per-query differences ``d_i = a_i − b_i`` are resampled
with replacement ``num_resamples`` times; the candidate is *significantly better* when the
``1 − level`` quantile of the resampled mean difference is above zero (one-sided test at ``level``).
Pure numpy; no Lightning, no transformers.
"""

from __future__ import annotations

import numpy as np

DEFAULT_LEVEL = 0.9  # one-sided: the candidate wins in >= 90% of resamples
DEFAULT_RESAMPLES = 1000


def bootstrap_mean_quantile(diff: np.ndarray, q: float, num_resamples: int = DEFAULT_RESAMPLES,
                            seed: int = 0) -> float:
    """The ``q`` quantile of the bootstrap distribution of ``mean(diff)`` (queries resampled)."""
    diff = np.asarray(diff, dtype=np.float64).reshape(-1)
    if diff.size == 0:
        raise ValueError("paired bootstrap needs at least one query")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(num_resamples, diff.size))
    return float(np.quantile(diff[idx].mean(1), q))


def significantly_better(candidate: np.ndarray, default: np.ndarray, level: float = DEFAULT_LEVEL,
                         num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> bool:
    """True iff the ``1 − level`` bootstrap quantile of mean(candidate − default) is > 0 (paired)."""
    candidate = np.asarray(candidate, dtype=np.float64)
    default = np.asarray(default, dtype=np.float64)
    if candidate.shape != default.shape:
        raise ValueError(f"paired samples must have the same shape, got {candidate.shape} and {default.shape}")
    diff = candidate - default
    if not np.any(diff):
        return False
    return bootstrap_mean_quantile(diff, 1.0 - level, num_resamples, seed) > 0.0
