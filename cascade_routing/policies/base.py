"""The policy contract shared by routing, cascading and cascade routing, and input validation.

A policy is stateless tensor code, batched over queries:

- ``decide(estimate, cost, ran, lam) -> long [B]``: the next model to run for each query, or -1 to
  stop. ``estimate`` is the quality belief given ``ran`` (bool [B, M]), ``cost`` the estimated cost
  [B, M] (USD), ``lam`` the cost trade-off λ >= 0 per query [B] (or a scalar).
- ``select(estimate, ran) -> long [B]``: the model whose answer is returned (-1 if none ran).
- ``max_steps(num_models)``: the most models a query can run.

Pure torch; no Lightning, no transformers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cascade_routing.interfaces import QualityEstimate


class PolicyError(ValueError):
    """Bad input to a policy or to λ fitting; the message names the problem."""


class BudgetUnreachable(PolicyError):
    """No λ brings the policy's mean cost on the fit rows down to the budget.

    ``min_cost`` is the mean cost at the largest λ tried (float32-safe), where every query runs only
    its cheapest model *by estimate*; that can cost more than the cheapest model's mean realised
    cost. A budget of ``min_cost`` can always be fitted.
    """

    def __init__(self, message: str, min_cost: float) -> None:
        super().__init__(message)
        self.min_cost = float(min_cost)


def check_inputs(estimate: QualityEstimate, cost: Tensor, ran: Tensor, lam: Tensor | float) -> Tensor:
    """Validate shapes, NaNs and signs; return ``lam`` as a [B] tensor on the estimate's device."""
    mean = estimate.mean
    b, m = mean.shape
    if cost.shape != (b, m):
        raise PolicyError(f"cost has shape {tuple(cost.shape)}, expected [B={b}, M={m}] like the quality mean")
    if ran.shape != (b, m) or ran.dtype != torch.bool:
        raise PolicyError(f"ran must be bool [B={b}, M={m}], got {ran.dtype} {tuple(ran.shape)}")
    for name, value in (("quality mean", mean), ("quality std", estimate.std), ("quality cov", estimate.cov),
                        ("cost", cost)):
        if value is not None and bool(torch.isnan(value).any()):
            row = int(torch.isnan(value).reshape(b, -1).any(1).nonzero()[0, 0])
            raise PolicyError(f"NaN in the {name} estimate (first at batch row {row})")
    if bool(torch.isinf(mean).any()) or bool(torch.isinf(cost).any()):
        raise PolicyError("infinite value in the quality mean or cost estimate")
    if estimate.std is not None and bool((estimate.std < 0).any()):
        raise PolicyError("negative quality std in the estimate")
    lam_t = torch.as_tensor(lam, dtype=mean.dtype, device=mean.device)
    if lam_t.dim() == 0:
        lam_t = lam_t.expand(b)
    if lam_t.shape != (b,):
        raise PolicyError(f"lam must be a scalar or [B={b}], got shape {tuple(lam_t.shape)}")
    if bool(torch.isnan(lam_t).any()):
        raise PolicyError("lam (λ) is NaN")
    if bool(torch.isinf(lam_t).any()):  # inf·0 = NaN in value = quality − λ·cost: quality 0 at cost 0
        raise PolicyError("lam (λ) must be finite, got inf")
    if bool((lam_t < 0).any()):
        raise PolicyError(f"lam (λ) must be >= 0, got {float(lam_t.min())}")
    return lam_t


def checked_lambda_shapes(shapes) -> tuple[tuple[float, ...], ...] | None:
    """``shapes`` (candidate per-step λ shapes, the first the default) as float tuples, or None when
    empty; PolicyError unless each is non-empty, >= 0, not NaN, with a positive entry."""
    if not shapes:
        return None
    out = tuple(tuple(float(x) for x in v) for v in shapes)
    for v in out:
        if not v or min(v) < 0 or max(v) <= 0 or any(math.isnan(x) for x in v):
            raise PolicyError(f"each λ shape must be non-empty, >= 0 with a positive entry, got {v}")
    return out


def select_best_ran(estimate: QualityEstimate, ran: Tensor) -> Tensor:
    """The run model with the highest post-hoc mean (lowest index on ties); -1 where nothing ran."""
    scores = estimate.mean.masked_fill(~ran, -torch.inf)
    best = scores.argmax(1)
    return torch.where(ran.any(1), best, torch.full_like(best, -1))


class Policy:
    """Base class; subclasses implement :meth:`decide` (and may override :meth:`select`)."""

    name = "policy"
    max_depth: int | None = None  # the most models one query may run; None: all of them
    # candidate per-step λ shapes for fit_lambda to choose among on calibration rows; None: constant λ
    lambda_shapes: tuple[tuple[float, ...], ...] | None = None
    # True when ``select`` always returns the model that ran last (then a final step's answer is
    # known before it arrives, and a server can stream it through)
    answer_is_last_run: bool = False

    def decide(self, estimate: QualityEstimate, cost: Tensor, ran: Tensor, lam: Tensor | float) -> Tensor:
        raise NotImplementedError

    def select(self, estimate: QualityEstimate, ran: Tensor) -> Tensor:
        return select_best_ran(estimate, ran)

    def on_columns(self, cols: list[int]) -> "Policy":
        """The policy for a call that passes only the model columns ``cols`` of the full model list
        (a server dropping failed backends); policies that name models by index re-index here."""
        return self

    def max_steps(self, num_models: int) -> int:
        """The most models a query can run: ``min(max_depth, num_models)``."""
        return num_models if self.max_depth is None else min(self.max_depth, num_models)
