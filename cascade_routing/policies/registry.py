"""The four strategies by name, as the evaluation, the artifact export and the server build them.

``make_policy("cascade_routing")`` is cascade routing with ``max_depth`` 5 and free order (the
paper's RouterBench setting) and per-step λ shapes ``(1, κ)`` for κ in
:data:`CASCADE_ROUTING_STEP_RATIOS`: λ fitting picks per budget, on the calibration rows, the κ
with the best calibration quality (κ = 1: one λ for every step; κ > 1: escalating after the first
answer costs more, κ → ∞ is routing). ``make_policy("threshold_cascade")`` gets the shapes
``(1, 1, κ)`` for the same κ: the threshold 1 − λ after the first model of the chain, 1 − κλ after
each later one, so a weak first model can be held to a stricter (κ > 1) or looser (κ < 1) bar than
the later ones (one threshold treats an answer the same whatever escalating from it would cost).
The optimal cascade and routing take no depth limit and one λ.
"""

from __future__ import annotations

from cascade_routing.policies.base import Policy, PolicyError
from cascade_routing.policies.cascade_routing import CascadeRouting
from cascade_routing.policies.cascades import OptimalCascade, ThresholdCascade
from cascade_routing.policies.pool import PooledPolicy, nondominated_pool
from cascade_routing.policies.routing import Routing

STRATEGIES: tuple[str, ...] = ("routing", "threshold_cascade", "optimal_cascade", "cascade_routing")
POOLED_STRATEGIES: tuple[str, ...] = ("threshold_cascade", "optimal_cascade", "cascade_routing")
CASCADE_ROUTING_STEP_RATIOS: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0, 4.0)  # κ = λ(step >= 1) / λ(step 0)
CASCADE_ROUTING_MAX_DEPTH = 5  # the most models cascade routing runs for one query (the paper's RouterBench setting)


def make_policy(strategy: str, num_samples: int = 128, seed: int = 0, max_depth: int = CASCADE_ROUTING_MAX_DEPTH,
                step_ratios: tuple[float, ...] | None = CASCADE_ROUTING_STEP_RATIOS,
                pool: tuple[int, ...] | None = None, routing_guard: bool = True) -> Policy:
    """The engine's policy for a strategy name; a clear error listing the names otherwise.

    ``step_ratios`` (cascade routing and the threshold cascade): the κ candidates of the λ shapes
    ``(1, κ)`` (cascade routing) or ``(1, 1, κ)`` (threshold cascade, whose step 0 always runs the
    chain's first model); the first κ is the default (1: one constant λ); ``None`` or ``()``: one
    constant λ. ``pool``: model indices the cascades and cascade routing may run (fitted
    by :func:`~cascade_routing.policies.pool.nondominated_pool` on calibration rows); ``None``: all.
    The cascades run the pool as their chain (:class:`PooledPolicy`); cascade routing may also add a
    model outside it for a query whose estimates no pool model dominates
    (:meth:`CascadeRouting.allowed`). Routing always keeps every model (:data:`POOLED_STRATEGIES`).
    ``routing_guard`` (cascade routing): λ fitting may fall back to depth 1 (routing), to the best
    single model the budget affords, or to the optimal cascade over the pool, at a budget where that
    beats the default by more than its noise on the calibration rows
    (:mod:`~cascade_routing.policies.fitting`)."""
    if strategy == "routing":
        return Routing()
    if strategy == "threshold_cascade":
        policy: Policy = ThresholdCascade(lambda_shapes=_shapes(step_ratios, (1.0, 1.0)))
    elif strategy == "optimal_cascade":
        policy = OptimalCascade(num_samples=num_samples, seed=seed)
    elif strategy == "cascade_routing":
        # cascade routing keeps a per-query exception to its pool (CascadeRouting.allowed)
        return CascadeRouting(max_depth=max_depth, force_order=False, num_samples=num_samples, seed=seed,
                              lambda_shapes=_shapes(step_ratios, (1.0,)), pool=pool, routing_guard=routing_guard)
    else:
        raise PolicyError(f"unknown strategy {strategy!r}; choose from {list(STRATEGIES)}")
    return policy if pool is None else PooledPolicy(policy, pool)


def _shapes(step_ratios: tuple[float, ...] | None, head: tuple[float, ...]) -> tuple[tuple[float, ...], ...] | None:
    """``head + (κ,)`` per κ (``(1.0,)``, one constant λ, for κ = 1), or None without ratios."""
    if not step_ratios:
        return None
    return tuple((1.0,) if float(k) == 1.0 else (*head, float(k)) for k in step_ratios)


def calibrated_policy(strategy: str, quality, cost, **kwargs) -> Policy:
    """:func:`make_policy` with the pool fitted on these calibration rows (``quality``/``cost`` [N, M]):
    the non-dominated models for the cascades and cascade routing, every model for routing."""
    pool = nondominated_pool(quality, cost) if strategy in POOLED_STRATEGIES else None
    return make_policy(strategy, pool=pool, **kwargs)
