"""The bisection of :func:`~cascade_routing.policies.fitting.fit_lambdas`, many fits at once.

One fit (a budget, a λ shape ``v``, an optional depth limit) is a generator, :func:`scale_search`:
it yields the scales s (λ_t = s·v_t) it needs simulated next and receives their results. The steps
are those of a plain bisection on s:

1. s = 0 and s = h₀ = 1 / mean cost (both at once; the ground-truth costs are finite and >= 0, so
   h₀ is finite and > 0, and a non-positive or non-finite upper end is refused rather than doubled
   forever); s = 0 within the budget ends the fit;
2. while the upper end is over budget: lo = hi, hi = 4·hi, up to λ = :data:`MAX_LAMBDA` (finite in
   float32); still over budget there raises :class:`~cascade_routing.policies.base.BudgetUnreachable`
   with the mean cost at that λ;
3. while ``it < max_iter`` and ``hi − lo > rel_tol·hi``: mid = (lo + hi) / 2 replaces the end on
   its side of the budget;
4. if the upper end spends the budget itself (within :data:`FLOOR_REL_TOL`) and the floor policy
   (λ = :data:`MAX_LAMBDA`: every query its cheapest model by estimate) spends as much on these rows,
   the fit *is* the floor policy: λ = MAX_LAMBDA, no mix. A budget raised to the reachable floor
   then runs the policy it was raised to, not the smallest λ that happens to coincide with it on the
   calibration rows (which, on new queries whose estimated gain per cost exceeds every calibration
   query's, runs costlier models and overshoots the budget);
5. with the overshoot correction (default): up to three more rounds simulate scales until the
   evaluated ones reach the window B(1 ± 0.1) of mean cost from both sides;
   :func:`~cascade_routing.policies.overshoot.expected_overshoot` estimates how much more than B new
   queries would spend at the bracket just found, and steps 2-4 rerun for the target B − that,
   starting from the tightest bracket among the scales simulated so far;

then γ as in the module docstring of :mod:`cascade_routing.policies.fitting`. :func:`drive` runs
many such generators in lockstep: each round, the next scales of every unfinished fit are simulated
as one batch (the calibration rows repeated once per scale, each copy with its own λ per step; at
most :data:`MAX_BATCH_ROWS` rows per simulation), so the per-step cost of a simulation (Python,
dispatch, validation) is paid once per round instead of once per scale and fit. Rows are
simulated independently and the E[max] tables come from the shared ``cache`` keyed by (ran-state,
row), so every fit ends with the same λ, γ and calibration figures as when each scale is simulated
on its own (``CASCADE_ROUTING_LAMBDA_FIT=sequential`` does that: the reference path, checked equal in
``tests/test_lambda_search.py``).

Monotonicity. With a constant λ the mean calibration cost falls, stepwise, as s grows on every
case tested (not proven for every policy), and the bracket found is then *the* crossing of the
budget. With a per-step shape (``v = (1, κ)``, κ > 1) it need not: a dearer escalation can make a
stronger, costlier first model the better plan, so a larger s can cost more (measured: about +8 %
for ``CascadeRouting(max_depth=5, pool=(0, 2, 4, 10))`` with shape (1, 4) on routerbench-subset; a
small synthetic case is in ``tests/test_policies_input_checks.py``).
The bisection does not rely on monotonicity for what it returns: every step keeps the invariant
"mean cost at lo > target >= mean cost at hi" on the calibration rows (target = the budget, or the
budget − overshoot), so the returned bracket meets the target at ``lam_high``, the γ mix
meets it on the calibration rows, and a floor fit (λ = MAX_LAMBDA) is only returned when it meets
the budget. What is lost is uniqueness: the bracket is *a* crossing, not necessarily the largest-
quality one, and a scale between other crossings may spend more than the budget.
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cascade_routing.policies.base import BudgetUnreachable, Policy, PolicyError

MAX_LAMBDA = 1e30  # largest λ tried: λ·cost must stay finite in float32 (the policies' usual dtype)
FLOOR_REL_TOL = 1e-5  # a budget within this of the upper end's cost is tested against the floor policy (step 4)
MAX_BATCH_ROWS = 8192  # rows per batched simulation (memory: rows × supermodels floats per step)
LAMBDA_FIT_MODES = ("batched", "sequential")


@dataclass
class Request:
    """Scales to simulate for one fit: λ_t = s·shape_t (the last entry for later steps), depth limit."""

    shape: Tensor
    max_depth: int | None
    scales: list[float]


def lambda_fit_mode() -> str:
    """``CASCADE_ROUTING_LAMBDA_FIT`` = batched (default) | sequential (one simulation per scale)."""
    mode = os.environ.get("CASCADE_ROUTING_LAMBDA_FIT", "batched").strip().lower() or "batched"
    if mode not in LAMBDA_FIT_MODES:
        raise ValueError(f"CASCADE_ROUTING_LAMBDA_FIT={mode!r}; choose one of {list(LAMBDA_FIT_MODES)}")
    return mode


def _simulated(v: Tensor, max_depth: int | None, scales: list[float], seen: dict) -> Generator[Request, list, list]:
    """Yield one :class:`Request` for ``scales``; record each result in ``seen`` {scale: result}."""
    results = yield Request(v, max_depth, scales)
    seen.update(zip(scales, results))
    return results


def _bisect(policy: Policy, v: Tensor, max_depth: int | None, seen: dict, target: float, lo: float, hi: float,
            max_iter: int, rel_tol: float) -> Generator[Request, list, tuple[float, float, int]]:
    """Steps 2-3 of the module docstring for the mean cost ``target`` from ``lo`` (over it) and ``hi``:
    returns the bracket (lo, hi) and the number of simulation rounds."""
    rounds = 0
    s_max = MAX_LAMBDA / float(v.max())
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi):
        # hi = 0 (or NaN) would stay 0 (NaN) under hi·4 and loop forever
        raise PolicyError(f"λ scale bracket must satisfy 0 <= lo < hi < inf, got lo={lo!r}, hi={hi!r} "
                          f"(are the calibration costs finite?)")
    while seen[hi].mean_cost > target:
        lo = hi
        if hi >= s_max:
            raise BudgetUnreachable(
                f"budget {target:.6g} not reachable by {policy!r} on these rows: even λ={lo:.3g} costs "
                f"{seen[lo].mean_cost:.6g} (queries still run their cheapest model by estimate)", seen[lo].mean_cost)
        hi = min(hi * 4.0, s_max)
        rounds += 1
        yield from _simulated(v, max_depth, [hi], seen)
    it = 0
    while it < max_iter and hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        (res,) = yield from _simulated(v, max_depth, [mid], seen)
        if res.mean_cost > target:
            lo = mid
        else:
            hi = mid
        it += 1
    return lo, hi, rounds + it


def scale_search(policy: Policy, cost: np.ndarray, budget: float, shape: Tensor | None, uniforms: Tensor,
                 max_iter: int, rel_tol: float, max_depth: int | None = None, overshoot_correction: bool = True
                 ) -> Generator[Request, list, "FittedLambda"]:  # noqa: F821
    """One fit as a generator (module docstring): yields :class:`Request` s, receives their
    :class:`~cascade_routing.policies.rollout.SimulationResult` s, returns the :class:`FittedLambda`.

    ``overshoot_correction``: after the bisection for ``budget``, estimate how far new queries overspend
    the crossing jump (:func:`~cascade_routing.policies.overshoot.expected_overshoot`, from the
    per-query costs of the evaluated scales plus those of
    :func:`~cascade_routing.policies.overshoot.window_scales`, simulated in up to
    :data:`~cascade_routing.policies.overshoot.WINDOW_ROUNDS` more rounds) and fit the mean
    calibration cost ``budget`` − that instead; ``info["overshoot"]`` holds it. A target the floor
    policy cannot meet fits the floor policy if that meets ``budget``, else ``budget`` itself."""
    from cascade_routing.policies.fitting import FittedLambda, _budget_gamma
    from cascade_routing.policies.overshoot import WINDOW_ROUNDS, expected_overshoot, window_scales

    v = torch.ones(1, dtype=torch.float64) if shape is None else torch.as_tensor(shape, dtype=torch.float64).reshape(-1)
    if v.numel() == 0 or bool((v < 0).any()) or bool(torch.isnan(v).any()) or float(v.max()) <= 0:
        raise PolicyError(f"λ shape must be non-empty, >= 0 with a positive entry, got {v.tolist()}")
    seen: dict = {}
    slack = 1e-9 * budget + 1e-15  # float rounding of mean costs
    s_max = MAX_LAMBDA / float(v.max())

    def floor_fit(rounds: int, overshoot: float) -> "FittedLambda":  # noqa: F821
        res_max = seen[s_max]  # λ = MAX_LAMBDA: every query its cheapest model by estimate
        return FittedLambda(s_max * v, s_max * v, 0.0, budget, res_max.mean_cost, res_max.mean_quality,
                            {"iterations": rounds, "shape": v.tolist(), "floor": True, "overshoot": overshoot,
                             "per_query_quality": res_max.quality.numpy()}, max_depth)

    hi = 1.0 / max(float(cost.mean()), 1e-12)
    res0, _ = yield from _simulated(v, max_depth, [0.0, hi], seen)
    if res0.mean_cost <= budget + slack:
        return FittedLambda(0.0 * v, 0.0 * v, 0.0, budget, res0.mean_cost, res0.mean_quality,
                            {"iterations": 0, "shape": v.tolist(), "per_query_quality": res0.quality.numpy()},
                            max_depth)
    lo, hi, rounds = yield from _bisect(policy, v, max_depth, seen, budget + slack, 0.0, hi, max_iter, rel_tol)
    rounds += 2
    target, overshoot = budget, 0.0
    if overshoot_correction:
        for _ in range(WINDOW_ROUNDS):
            extra = window_scales({s: r.cost.numpy() for s, r in seen.items()}, budget)
            if not extra:
                break
            yield from _simulated(v, max_depth, extra, seen)
            rounds += 1
        overshoot = expected_overshoot({s: r.cost.numpy() for s, r in seen.items()}, budget)
        if overshoot > 0.0:
            fitted_to_budget = lo, hi
            target = budget - overshoot
            cmp = target + 1e-9 * target + 1e-15
            hi = min((s for s, r in seen.items() if r.mean_cost <= cmp), default=max(seen))
            lo = max((s for s, r in seen.items() if s < hi and r.mean_cost > cmp), default=0.0)
            try:
                lo, hi, more = yield from _bisect(policy, v, max_depth, seen, cmp, lo, hi, max_iter, rel_tol)
                rounds += more
            except BudgetUnreachable:  # below the floor policy's cost: run the floor policy if it meets the budget
                if seen[s_max].mean_cost <= budget + slack:
                    return floor_fit(rounds, overshoot)
                (lo, hi), target, overshoot = fitted_to_budget, budget, 0.0  # the budget's own fit
    target_cmp = target + 1e-9 * target + 1e-15
    res_lo, res_hi = seen[lo], seen[hi]
    if hi < s_max and target - res_hi.mean_cost <= FLOOR_REL_TOL * target:
        # the budget is (numerically) what the upper end spends: if that is the floor policy's cost, store
        # the floor policy itself rather than the smallest λ that reproduces it on these rows
        if s_max not in seen:
            yield from _simulated(v, max_depth, [s_max], seen)
            rounds += 1
        # (with a λ shape the cost need not fall as s grows: keep the floor only if it meets the budget)
        if res_hi.mean_cost - slack <= seen[s_max].mean_cost <= budget + slack:
            return floor_fit(rounds, overshoot)
    gamma = _budget_gamma(res_lo.cost, res_hi.cost, uniforms, target_cmp)
    use_low = uniforms < gamma
    mix_cost = float(torch.where(use_low, res_lo.cost, res_hi.cost).mean())
    per_query_quality = torch.where(use_low, res_lo.quality, res_hi.quality)
    mix_quality = float(per_query_quality.mean())
    return FittedLambda(lo * v, hi * v, gamma, budget, mix_cost, mix_quality,
                        {"iterations": rounds, "cost_low": res_lo.mean_cost, "cost_high": res_hi.mean_cost,
                         "shape": v.tolist(), "overshoot": overshoot, "per_query_quality": per_query_quality.numpy()},
                        max_depth)


def drive(searches: list[Generator], policy: Policy, quality_estimator, cost_estimator, quality: np.ndarray,
          cost: np.ndarray, uniforms: Tensor, rows: Tensor | None, cache: dict) -> list:
    """Run the generators of :func:`scale_search` to their ends; their results, in order.

    Each round simulates the pending requests of all unfinished searches together
    (:func:`simulate_batched`), or one by one with ``CASCADE_ROUTING_LAMBDA_FIT=sequential``."""
    sequential = lambda_fit_mode() == "sequential"
    results: list = [None] * len(searches)
    pending: dict[int, Request] = {}

    def advance(i: int, sent) -> None:
        try:
            pending[i] = searches[i].send(sent)
        except StopIteration as stop:
            results[i] = stop.value
            pending.pop(i, None)

    for i in range(len(searches)):
        advance(i, None)
    while pending:
        order = list(pending)
        reqs = [pending[i] for i in order]
        if sequential:
            outs = [[_simulate_one(policy, quality_estimator, cost_estimator, quality, cost, uniforms, rows, cache,
                                   r.shape, r.max_depth, s) for s in r.scales] for r in reqs]
        else:
            outs = simulate_batched(reqs, policy, quality_estimator, cost_estimator, quality, cost, uniforms, rows,
                                    cache)
        for i, out in zip(order, outs):
            advance(i, out)
    return results


def _simulate_one(policy, quality_estimator, cost_estimator, quality, cost, uniforms, rows, cache, shape, max_depth,
                  scale):
    from cascade_routing.policies.rollout import simulate  # rollout imports fitting, which imports this module
    from cascade_routing.policies.fitting import FittedLambda

    lam = FittedLambda(scale * shape, scale * shape, 0.0, max_depth=max_depth)
    return simulate(policy, quality_estimator, cost_estimator, quality, cost, lam, uniforms, rows, cache)


def simulate_batched(reqs: list[Request], policy: Policy, quality_estimator, cost_estimator, quality: np.ndarray,
                     cost: np.ndarray, uniforms: Tensor, rows: Tensor | None, cache: dict) -> list[list]:
    """SimulationResults of every (request, scale): the N calibration rows repeated once per scale, with
    λ_t = s·shape_t per copy, simulated in batches of at most :data:`MAX_BATCH_ROWS` rows per depth limit."""
    from cascade_routing.policies.rollout import SimulationResult, simulate  # rollout imports fitting
    from cascade_routing.policies.fitting import FittedLambda

    n = quality.shape[0]
    rows = torch.arange(n) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    outs: list[list] = [[None] * len(r.scales) for r in reqs]
    points_per_batch = max(1, MAX_BATCH_ROWS // max(n, 1))
    by_depth: dict[int | None, list[tuple[int, int]]] = {}
    for i, r in enumerate(reqs):
        by_depth.setdefault(r.max_depth, []).extend((i, j) for j in range(len(r.scales)))
    for depth, points in by_depth.items():
        for start in range(0, len(points), points_per_batch):
            chunk = points[start:start + points_per_batch]
            width = max(reqs[i].shape.numel() for i, _ in chunk)
            lam_rows = torch.empty(len(chunk) * n, width, dtype=torch.float64)
            for k, (i, j) in enumerate(chunk):
                v = reqs[i].shape
                lam = reqs[i].scales[j] * v  # as FittedLambda(s·v) holds it; later steps reuse the last entry
                lam_rows[k * n:(k + 1) * n] = torch.cat([lam, lam[-1:].expand(width - v.numel())])
            p = len(chunk)
            res = simulate(policy, quality_estimator, cost_estimator, np.tile(quality, (p, 1)), np.tile(cost, (p, 1)),
                           FittedLambda(torch.zeros(1), torch.zeros(1), 0.0, max_depth=depth), uniforms.repeat(p),
                           rows.repeat(p), cache, lam_rows=lam_rows)
            for k, (i, j) in enumerate(chunk):
                part = slice(k * n, (k + 1) * n)
                outs[i][j] = SimulationResult(res.ran[part], res.order[part], res.answer[part],
                                              res.quality[part].clone(), res.cost[part].clone())
    return outs
