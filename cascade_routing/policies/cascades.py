"""Cascades: run the models in their fixed order (cheapest first, the dataset's model order).

- :class:`ThresholdCascade` (the classic baseline): always run model 0; after running model j,
  continue iff its post-hoc mean ``q̂_j < 1 − λ`` (λ may differ per step: the caller passes the λ of
  the current step; ``lambda_shapes`` lists candidate per-step shapes for λ fitting). The answer is
  the last model run.
- :class:`OptimalCascade`: cascade routing restricted to prefixes of the order. After running
  models 0..t−1 (t >= 0), consider prefixes P_k = {0..k}, k >= t−1 (k = t−1 means stop, only when
  t >= 1), with ``value(P_k) = E[max_{j<=k} q_j] − λ Σ_{j=t..k} c_j``; run model t iff the best k >= t
  (ties: the shorter prefix). E[max] uses the same fixed draws as :class:`CascadeRouting`.
  The answer is the run model with the highest post-hoc mean.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cascade_routing.interfaces import QualityEstimate, bitmask
from cascade_routing.policies.base import (Policy, PolicyError, check_inputs, check_select_inputs, checked_lambda_shapes,
                                           checked_max_depth)
from cascade_routing.policies.supermodels import normal_draws, quality_samples


def _prefix_length(ran: Tensor) -> Tensor:
    """Number of models run per row; raises if the ran set is not a prefix of the model order."""
    t = ran.sum(1)
    expected = torch.arange(ran.shape[1], device=ran.device)[None, :] < t[:, None]
    if not bool((expected == ran).all()):
        row = int((expected != ran).any(1).nonzero()[0, 0])
        raise PolicyError(f"a cascade needs the ran set to be a prefix of the model order; row {row} is not")
    return t


class ThresholdCascade(Policy):
    """Continue while the last run model's post-hoc mean is below 1 − λ; answer = last model run."""

    name = "threshold_cascade"

    answer_is_last_run = True  # select() below

    def __init__(self, max_depth: int | None = None,
                 lambda_shapes: tuple[tuple[float, ...], ...] | None = None) -> None:
        self.max_depth = checked_max_depth(max_depth)
        self.lambda_shapes = checked_lambda_shapes(lambda_shapes)

    def __repr__(self) -> str:
        return (f"ThresholdCascade(max_depth={self.max_depth}"
                + (f", lambda_shapes={self.lambda_shapes}" if self.lambda_shapes else "") + ")")

    def decide(self, estimate: QualityEstimate, cost: Tensor, ran: Tensor, lam: Tensor | float, **_) -> Tensor:
        lam = check_inputs(estimate, cost, ran, lam)
        b, m = ran.shape
        t = _prefix_length(ran)
        last = (t - 1).clamp_min(0)
        last_q = estimate.mean.gather(1, last[:, None]).squeeze(1)
        go_on = (t == 0) | (last_q < 1 - lam)
        go_on &= t < self.max_steps(m)
        return torch.where(go_on, t, torch.full_like(t, -1))

    def select(self, estimate: QualityEstimate, ran: Tensor) -> Tensor:
        """The last model run (-1 where nothing ran); ``ran`` must be bool [B, M], a prefix of the
        order, with finite post-hoc means for the models that ran (as for the other policies)."""
        check_select_inputs(estimate, ran)
        return _prefix_length(ran) - 1  # -1 where nothing ran


class OptimalCascade(Policy):
    """Cascade routing over prefixes of the model order (see module docstring)."""

    name = "optimal_cascade"

    def __init__(self, max_depth: int | None = None, num_samples: int = 128, seed: int = 0,
                 tie_tol: float = 1e-6) -> None:
        self.max_depth = checked_max_depth(max_depth)
        self.num_samples = num_samples
        self.seed = seed
        self.tie_tol = tie_tol

    def __repr__(self) -> str:
        return f"OptimalCascade(max_depth={self.max_depth}, num_samples={self.num_samples}, seed={self.seed})"

    def decide(self, estimate: QualityEstimate, cost: Tensor, ran: Tensor, lam: Tensor | float,
               cache: dict | None = None, rows: Tensor | None = None, **_) -> Tensor:
        """Next model per query (-1 = stop). ``cache``/``rows``: optional memo of the prefix E[max]
        keyed by (ran-state, row), as in :meth:`CascadeRouting.decide` (valid while the estimator is
        deterministic in (row, ran))."""
        lam = check_inputs(estimate, cost, ran, lam)
        b, m = ran.shape
        t = _prefix_length(ran)
        depth = self.max_steps(m)
        if cache is not None and rows is not None:
            from cascade_routing.policies.cascade_routing import _cached_emax

            emax = _cached_emax(cache, m, bitmask(ran), rows, lambda sel: self._prefix_emax(estimate, sel),
                                kind="prefix_emax")
        else:
            emax = self._prefix_emax(estimate)
        k = torch.arange(m, device=cost.device)[None, :]
        added = torch.where(k >= t[:, None], cost, torch.zeros_like(cost)).cumsum(1)
        values = emax - lam[:, None] * added
        allowed = (k >= (t[:, None] - 1).clamp_min(0)) & (k < depth)
        allowed &= ~((k == t[:, None] - 1) & (t[:, None] == 0))
        values = values.masked_fill(~allowed, -math.inf)
        near = values >= values.amax(1, keepdim=True) - self.tie_tol
        best_k = torch.where(near, k.expand(b, m), torch.full_like(k.expand(b, m), m)).argmin(1)
        go_on = (best_k >= t) & (t < depth)
        return torch.where(go_on, t, torch.full_like(t, -1))

    def candidates(self, estimate: QualityEstimate, cost: Tensor, state: int, **_) -> tuple[Tensor, Tensor, Tensor]:
        """(emax [b, M], added [b, M], action [b, M]) of the prefixes for queries in ran-state ``state``
        (a prefix); disallowed prefixes have emax -inf. See :meth:`CascadeRouting.candidates`."""
        b, m = estimate.mean.shape
        t = bin(state).count("1")
        if state != (1 << t) - 1:
            raise PolicyError(f"a cascade needs the ran set to be a prefix of the model order; state {state:b} is not")
        depth = self.max_steps(m)
        emax = self._prefix_emax(estimate)
        k = torch.arange(m, device=cost.device)[None, :].expand(b, m)
        added = torch.where(k >= t, cost, torch.zeros_like(cost)).cumsum(1)
        allowed = (k >= max(t - 1, 0)) & (k < max(depth, t))
        if t >= depth:
            allowed = k == t - 1
        emax = emax.masked_fill(~allowed, -math.inf)
        action = torch.where(k >= t, torch.full_like(k, t), torch.full_like(k, -1))
        return emax, added, action

    def _prefix_emax(self, estimate: QualityEstimate, sel: Tensor | None = None) -> Tensor:
        """[B, M] (rows ``sel`` of the batch, default all): E[max of the prefix 0..k] for every k."""
        mean, std, cov = estimate.mean, estimate.std, estimate.cov
        if sel is not None:
            mean = mean[sel]
            std = None if std is None else std[sel]
            cov = None if cov is None else cov[sel]
        z = normal_draws(self.num_samples, mean.shape[1], self.seed, mean.device, mean.dtype)
        x = quality_samples(mean, z, std, cov)  # [B, M, K]
        emax = torch.empty_like(mean)
        running = x[:, 0, :]
        emax[:, 0] = running.mean(-1)
        for j in range(1, mean.shape[1]):
            running = torch.maximum(running, x[:, j, :])
            emax[:, j] = running.mean(-1)
        return emax
