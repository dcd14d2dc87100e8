"""Routing: pick one model per query before running anything.

``decide``: with nothing run, the model maximising ``q̂_m − λ·ĉ_m`` (ex-ante mean; ties: the cheaper,
then the lower index); once a model ran, stop. ``select``: the model that ran.
Equal to cascade routing with ``max_depth=1``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies.base import Policy, check_inputs


class Routing(Policy):
    """argmax_m q̂_m − λ ĉ_m, one model per query."""

    name = "routing"

    def __init__(self, tie_tol: float = 1e-6) -> None:
        self.tie_tol = tie_tol

    def __repr__(self) -> str:
        return "Routing()"

    def max_steps(self, num_models: int) -> int:
        return 1

    def decide(self, estimate: QualityEstimate, cost: Tensor, ran: Tensor, lam: Tensor | float, **_) -> Tensor:
        lam = check_inputs(estimate, cost, ran, lam)
        values = estimate.mean - lam[:, None] * cost
        near = values >= values.amax(1, keepdim=True) - self.tie_tol
        choice = torch.where(near, cost, torch.full_like(cost, math.inf)).argmin(1)
        return torch.where(ran.any(1), torch.full_like(choice, -1), choice)
