"""The four strategies by name, as the evaluation, the artifact export and the server build them.

``make_policy("cascade_routing")`` is cascade routing with ``max_depth`` 5 and free order (the
paper's RouterBench setting); the cascades and routing take no depth limit.
"""

from __future__ import annotations

from cascade_routing.policies.base import Policy, PolicyError
from cascade_routing.policies.cascade_routing import CascadeRouting
from cascade_routing.policies.cascades import OptimalCascade, ThresholdCascade
from cascade_routing.policies.routing import Routing

STRATEGIES: tuple[str, ...] = ("routing", "threshold_cascade", "optimal_cascade", "cascade_routing")


def make_policy(strategy: str, num_samples: int = 128, seed: int = 0, max_depth: int = 5) -> Policy:
    """The engine's policy for a strategy name; a clear error listing the names otherwise."""
    if strategy == "routing":
        return Routing()
    if strategy == "threshold_cascade":
        return ThresholdCascade()
    if strategy == "optimal_cascade":
        return OptimalCascade(num_samples=num_samples, seed=seed)
    if strategy == "cascade_routing":
        return CascadeRouting(max_depth=max_depth, force_order=False, num_samples=num_samples, seed=seed)
    raise PolicyError(f"unknown strategy {strategy!r}; choose from {list(STRATEGIES)}")
