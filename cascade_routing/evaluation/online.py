"""Offline simulation of a request stream served with the online λ controller.

:func:`simulate_controlled` plays the queries in stream order, one request at a time, exactly as a
server with :class:`~cascade_routing.policies.controller.BudgetController` serves a sequential
stream: request k is decided with the fitted λ times the multiplier after the controller observed
the realised costs of requests 0..k-1 (``observed_before`` generalises this to concurrent
traffic: request k saw the first ``observed_before[k]`` costs in ``completion`` order). Each request
is simulated by :func:`~cascade_routing.policies.rollout.simulate` on its own row, so with a
multiplier of 1 throughout it equals the fixed-λ simulation query by query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cascade_routing.policies.rollout import SimulationResult, rollout_inputs, simulate
from cascade_routing.policies.base import Policy, PolicyError
from cascade_routing.policies.controller import BudgetController, ControllerConfig, scale_fitted
from cascade_routing.policies.fitting import FittedLambda


@dataclass
class ControlledResult:
    """The per-request outcome (``result``, in stream order) and the λ multiplier each request used."""

    result: SimulationResult
    lam_factor: Tensor  # float64 [N]
    version: Tensor  # long [N]: costs the controller had observed when the request's λ was taken

    @property
    def mean_cost(self) -> float:
        return self.result.mean_cost

    @property
    def mean_quality(self) -> float:
        return self.result.mean_quality


def simulate_controlled(
    policy: Policy,
    quality_estimator,
    cost_estimator,
    quality,
    cost,
    fitted: FittedLambda,
    budget: float,
    config: ControllerConfig | None = None,
    uniforms: Tensor | None = None,
    rows: Tensor | None = None,
    cache: dict | None = None,
    observed_before: "list[int] | None" = None,
    completion: "list[int] | None" = None,
) -> ControlledResult:
    """Serve N queries (stream order = row order of ``quality``/``cost`` [N, M]) with the controller.

    ``rows``/``uniforms``/``cache``: as for :func:`simulate`. ``budget``: the controller's target.
    ``observed_before`` [N] and ``completion`` (a permutation of 0..N-1, the order in which the
    controller observed the requests' costs): for concurrent traffic; request k's λ multiplier is the
    controller state after the costs of ``completion[:observed_before[k]]``, each of which must be a
    request before k. Default: sequential (``observed_before[k] = k``, ``completion = 0..N-1``).
    """
    q, c, rows, uniforms, observed_before, completion = _stream_inputs(quality, cost, rows, uniforms,
                                                                       observed_before, completion)
    n, m = q.shape
    controller = BudgetController(budget, config)
    costs: list[float | None] = [None] * n
    fed = 0
    ran = torch.zeros(n, m, dtype=torch.bool)
    steps = policy.max_steps(m)
    order = torch.full((n, steps), -1, dtype=torch.long)
    answer = torch.full((n,), -1, dtype=torch.long)
    real_q = torch.zeros(n, dtype=torch.float64)
    real_c = torch.zeros(n, dtype=torch.float64)
    factors = torch.ones(n, dtype=torch.float64)
    versions = torch.zeros(n, dtype=torch.long)
    for k in range(n):
        fed = _observe_until(controller, costs, completion, fed, int(observed_before[k]), k)
        factor, version = controller.take()
        factors[k], versions[k] = factor, version
        r = simulate(policy, quality_estimator, cost_estimator, q[k:k + 1], c[k:k + 1],
                     scale_fitted(fitted, factor), uniforms[k:k + 1], rows[k:k + 1], cache)
        ran[k], answer[k], real_q[k], real_c[k] = r.ran[0], r.answer[0], r.quality[0], r.cost[0]
        order[k, : r.order.shape[1]] = r.order[0]
        costs[k] = float(r.cost[0])
    return ControlledResult(SimulationResult(ran, order, answer, real_q, real_c), factors, versions)


def _stream_inputs(quality, cost, rows, uniforms, observed_before, completion
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int], list[int]]:
    """:func:`simulate_controlled`'s inputs checked and with their defaults (all rows; sequential
    observation)."""
    q, c, rows = rollout_inputs(quality, cost, rows)
    n = q.shape[0]
    if n == 0:
        raise PolicyError("empty stream: no queries to serve")
    if uniforms is None:
        raise PolicyError("pass uniforms (query_uniforms of the stream's texts) so the λ mix matches a server")
    uniforms = torch.as_tensor(uniforms, dtype=torch.float64)
    if uniforms.shape != (n,):
        raise PolicyError(f"uniforms must be [N={n}], got shape {tuple(uniforms.shape)}")
    if observed_before is None:
        observed_before = list(range(n))
    if completion is None:
        completion = list(range(n))
    if len(observed_before) != n or sorted(completion) != list(range(n)):
        raise PolicyError("observed_before must have N entries and completion must be a permutation of 0..N-1")
    return q, c, rows, uniforms, observed_before, completion


def _observe_until(controller: BudgetController, costs: list[float | None], completion: list[int], fed: int,
                   want: int, k: int) -> int:
    """Feed the controller the costs of ``completion[fed:want]`` before request ``k`` is decided;
    returns ``want``. Each must be a request before k that was served, and ``want`` never decreases."""
    if want < fed:
        raise PolicyError(f"observed_before must not decrease (request {k}: {want} after {fed})")
    while fed < want:
        j = completion[fed]
        if j >= k or costs[j] is None:
            raise PolicyError(f"request {k} saw the cost of request {j}, which had not been served yet")
        controller.observe(costs[j])
        fed += 1
    return fed


def settling_index(values, target: float, tolerance: float) -> int | None:
    """First index n such that ``|values[k] - target| <= tolerance`` for every k >= n (None if the
    last value is outside)."""
    x = np.asarray(values, dtype=np.float64)
    ok = np.abs(x - target) <= tolerance
    if x.size == 0 or not ok[-1]:
        return None
    bad = np.nonzero(~ok)[0]
    return 0 if bad.size == 0 else int(bad[-1]) + 1


def convergence_index(costs, budget: float, window: int = 50, tolerance: float = 0.1) -> int | None:
    """First request index n such that the trailing ``window``-mean spend stays within
    ±``tolerance`` of ``budget`` from n to the end of ``costs`` (None if it never settles)."""
    x = np.asarray(costs, dtype=np.float64)
    if x.size < window:
        return None
    means = np.convolve(x, np.ones(window) / window, mode="valid")  # means[i] covers i..i+window-1
    first_ok = settling_index(means / budget, 1.0, tolerance)
    return None if first_ok is None else first_ok + window - 1
