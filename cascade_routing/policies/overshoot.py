"""The expected overshoot of a budget fit: how much more than the budget a fitted λ spends on new queries.

Let g_i(s) be calibration query i's cost at λ scale s, S(s) = (1/N) Σ_i g_i(s) the mean calibration
cost the bisection of :mod:`cascade_routing.policies.lambda_search` fits, C(s) = E[g(s)] the mean
cost on new queries, and ε = S − C the sampling error (variance σ²(s)/N, σ² the per-query cost
variance). The fit picks T with S(T) = B. Expanding around s₀ with C(s₀) = B, in the
parametrisation where C is linear: T − s₀ ≈ −ε(s₀)/C′ and ε(T) ≈ ε(s₀) + ε′(s₀)(T − s₀), so

    E[C(T)] − B = −E[ε(T)] ≈ E[ε ε′] / C′ = (1/2N) dσ²/dC = (1/2N) d E[g²]/dC − C/N.

The fitted λ spends more than B on new queries wherever the per-query cost variance grows with
the mean cost, i.e. where a smaller λ makes a few queries much costlier rather than many a little.
A threshold cascade whose chain ends in a model 60 times the price of the first one escalates a
query all the way in one jump: on routerbench-subset's calibration halves (236 queries) its
uncorrected fit spends 4% over the budget on the other half. For queries that jump from zero cost
by d it reads E[d²]/(2N E[d]) − C/N: the renewal-theory overshoot of the jump that crosses the
level, less C/N.

:func:`expected_overshoot` estimates it from the per-query costs at the evaluated scales: the slope
of the mean squared cost against the mean cost between the scales at the edges of a window of
±``window``·B around the budget, brought within ±2·``window``·B by up to :data:`WINDOW_ROUNDS`
rounds of :func:`window_scales` (consecutive jumps of one query add up exactly in Σ g², so the
scales in between do not matter). A fit that targets B − E[overshoot] on the calibration rows spends
B on new queries on average. ``benchmarks/bench_overshoot.py`` measures it on calibration halves
(``benchmarks/results/overshoot/``).
"""

from __future__ import annotations

import numpy as np

OVERSHOOT_WINDOW = 0.1  # the slope is taken between the mean costs B(1 ± 0.1)
WINDOW_POINTS = 4  # scales added per gap that an edge of the window falls in (window_scales)
WINDOW_ROUNDS = 3  # at most this many rounds of them


def _sorted_points(points: dict[float, np.ndarray]) -> tuple[list[float], np.ndarray]:
    scales = sorted(points)
    return scales, np.array([float(np.mean(points[s])) for s in scales])


def _window_edges(means: np.ndarray, budget: float, window: float) -> tuple[int, int]:
    """Indices (a, b), a <= b, into the scales sorted ascending: a the largest scale still costing
    >= B(1 + window) (else the smallest), b the smallest costing <= B(1 − window) (else the largest)."""
    above = np.nonzero(means >= budget * (1 + window))[0]
    below = np.nonzero(means <= budget * (1 - window))[0]
    a = int(above.max()) if above.size else 0
    b = int(below.min()) if below.size else len(means) - 1
    return a, max(a, b)


def window_scales(points: dict[float, np.ndarray], budget: float, window: float = OVERSHOOT_WINDOW,
                  count: int = WINDOW_POINTS) -> list[float]:
    """Scales to simulate next so that the window's edges land within B(1 ± 2·window) of mean cost.

    An edge whose mean cost lies beyond that (the evaluated scales jump past it) gets ``count`` scales
    spread over the gap between it and its neighbour inside the window (geometric; linear from
    s = 0). Empty when both edges are close enough or are the ends of the evaluated scales (s = 0
    still costs less than B(1 + window), or the largest scale more than B(1 − window))."""
    scales, means = _sorted_points(points)
    a, b = _window_edges(means, budget, window)
    gaps = []
    if means[a] > budget * (1 + 2 * window) and a + 1 < len(scales):
        gaps.append((scales[a], scales[a + 1]))
    if means[b] < budget * (1 - 2 * window) and b >= 1:
        gaps.append((scales[b - 1], scales[b]))
    out: list[float] = []
    for lo, hi in gaps:
        if count <= 0 or hi <= lo:
            continue
        grid = np.linspace(lo, hi, count + 2) if lo <= 0 else np.geomspace(lo, hi, count + 2)
        out += [float(x) for x in grid[1:-1] if float(x) not in points and float(x) not in out]
    return out


def expected_overshoot(points: dict[float, np.ndarray], budget: float, window: float = OVERSHOOT_WINDOW) -> float:
    """(1/2N)·Δmean(g²)/Δmean(g) − B/N between the window's edges (module docstring), from
    ``points`` {scale: per-query cost [N]}. Clipped to [0, ``window``·B]: the correction only lowers
    the calibration target, and by no more than the window it was measured on. 0 when the mean cost
    does not change across the window."""
    scales, means = _sorted_points(points)
    a, b = _window_edges(means, budget, window)
    high, low = (np.asarray(points[scales[k]], dtype=np.float64) for k in (a, b))
    d_mean = float(high.mean() - low.mean())
    if d_mean <= 0.0:
        return 0.0
    n = high.size
    slope = float((high * high).mean() - (low * low).mean()) / d_mean
    return float(np.clip(slope / (2.0 * n) - budget / n, 0.0, window * budget))
