"""Per-token prices fitted to recorded costs (numpy only): the cost model and the replay backend use it."""

from __future__ import annotations

import numpy as np


def nonneg_lstsq(x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """argmin_{a,b >= 0} ||a x1 + b x2 - y||² (2 variables: check the interior and both edges)."""
    x = np.stack([x1, x2], 1)
    cands = []
    sol, *_ = np.linalg.lstsq(x, y, rcond=None)
    if (sol >= 0).all():
        cands.append((float(sol[0]), float(sol[1])))
    for j in range(2):
        d = float(x[:, j] @ x[:, j])
        coef = max(0.0, float(x[:, j] @ y) / d) if d > 0 else 0.0
        cands.append((coef, 0.0) if j == 0 else (0.0, coef))
    return min(cands, key=lambda ab: float(((x @ np.asarray(ab)) - y) @ ((x @ np.asarray(ab)) - y)))
