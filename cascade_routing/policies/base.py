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
import numbers

import torch
from torch import Tensor

from cascade_routing.interfaces import QualityEstimate, checked_row_ids


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


def _first_row(bad: Tensor) -> int:
    """The first batch row with a flagged entry in ``bad`` [B, ...] (only called when one is flagged)."""
    return int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0, 0])


def _first_cell(bad: Tensor) -> tuple[int, int]:
    """(row, column) of the first flagged entry of ``bad`` [B, M] (only called when one is flagged)."""
    row, col = bad.nonzero()[0]
    return int(row), int(col)


def _check_ran(ran: Tensor, b: int, m: int, like: str) -> None:
    """PolicyError unless ``ran`` is bool [B, M] (``like``: what it must match, for the message)."""
    if ran.shape != (b, m) or ran.dtype != torch.bool:
        raise PolicyError(f"ran must be bool [B={b}, M={m}] like {like}, got {ran.dtype} {tuple(ran.shape)}")


def _check_finite(name: str, value: Tensor) -> None:
    """PolicyError naming ``name`` and the first batch row unless every entry of ``value`` is finite."""
    if bool(torch.isfinite(value).all()):
        return
    nan = torch.isnan(value)
    if bool(nan.any()):
        raise PolicyError(f"NaN in the {name} estimate (first at batch row {_first_row(nan)})")
    raise PolicyError(f"infinite value in the {name} estimate (first at batch row {_first_row(torch.isinf(value))})")


def check_model_count(m: int) -> None:
    """PolicyError when there are no model columns (M = 0): no policy can run or answer anything."""
    if m == 0:
        raise PolicyError("no models: the quality estimate has M = 0 model columns")


def check_inputs(estimate: QualityEstimate, cost: Tensor, ran: Tensor, lam: Tensor | float) -> Tensor:
    """Validate shapes, NaN/inf and signs; return ``lam`` as a [B] tensor on the estimate's device.

    PolicyError (naming the input and, where cheap, the first bad row) for: M = 0 models; ``cost``
    not [B, M]; ``ran`` not bool [B, M]; NaN or ±inf in the quality mean, std, cov or cost (an
    infinite std makes every E[max] infinite and cascade routing would silently run nothing);
    a negative quality std or cost estimate; ``lam`` not a scalar or [B], NaN, inf or negative.
    """
    mean = estimate.mean
    b, m = mean.shape
    check_model_count(m)
    if cost.shape != (b, m):
        raise PolicyError(f"cost has shape {tuple(cost.shape)}, expected [B={b}, M={m}] like the quality mean")
    _check_ran(ran, b, m, "the quality mean")
    for name, value in (("quality mean", mean), ("quality std", estimate.std), ("quality cov", estimate.cov),
                        ("cost", cost)):
        if value is not None:
            _check_finite(name, value)
    if estimate.std is not None and bool((estimate.std < 0).any()):
        raise PolicyError(f"negative quality std in the estimate (first at batch row {_first_row(estimate.std < 0)})")
    if bool((cost < 0).any()):
        row, col = _first_cell(cost < 0)
        raise PolicyError(f"negative cost estimate {float(cost[row, col])!r} at batch row {row}, model {col}")
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


def check_select_inputs(estimate: QualityEstimate, ran: Tensor) -> None:
    """Validate ``select``'s inputs: PolicyError unless there is at least one model, ``ran`` is bool
    [B, M] like the post-hoc mean, and the post-hoc mean of every model that ran is finite (argmax
    would take a NaN for the best answer)."""
    mean = estimate.mean
    b, m = mean.shape
    check_model_count(m)
    _check_ran(ran, b, m, "the post-hoc quality mean")
    bad = ran & ~torch.isfinite(mean)
    if bool(bad.any()):
        row, col = _first_cell(bad)
        raise PolicyError(f"non-finite post-hoc quality mean {float(mean[row, col])!r} of model {col}, which ran, "
                          f"at batch row {row}")


def check_ground_truth(quality: Tensor, cost: Tensor, what: str) -> None:
    """Ground truth ``quality`` and ``cost`` (float [N, M] of the same shape, N, M >= 1) of ``what``
    (e.g. "calibration"): PolicyError naming the input, row and model unless every quality is finite
    in [0, 1] and every cost finite and >= 0 (the dataset contract, ``cascade_routing.data``).
    An infinite cost would make λ fitting's starting scale 0 and a simulated mean cost inf."""
    if quality.dim() != 2 or cost.shape != quality.shape or quality.shape[0] == 0 or quality.shape[1] == 0:
        raise PolicyError(f"{what} quality and cost must both be [N >= 1, M >= 1], got {tuple(quality.shape)} "
                          f"and {tuple(cost.shape)}")
    for name, value, bad_of, rule in (
            ("quality", quality, lambda x: ~((x >= 0) & (x <= 1)), "finite and in [0, 1]"),
            ("cost", cost, lambda x: ~((x >= 0) & torch.isfinite(x)), "finite and >= 0")):
        bad = bad_of(value)  # NaN fails every comparison, so it is flagged too
        if bool(bad.any()):
            row, col = _first_cell(bad)
            v = float(value[row, col])
            raise PolicyError(f"{what} {name} must be {rule}; row {row}, model {col} has "
                              f"{'NaN' if math.isnan(v) else repr(v)} ({int(bad.sum())} such cells)")


def checked_rows(rows, n: int) -> Tensor:
    """Query row ids in the estimators' table as long [N] on the device of ``rows`` (default 0..N-1);
    PolicyError unless they are N integers >= 0 (:func:`~cascade_routing.interfaces.checked_row_ids`:
    a negative id would silently index from the end of the table, a fractional one be truncated to
    another row). The upper bound is the estimator's to check: its table is not known here."""
    if rows is None:
        return torch.arange(n)
    device = rows.device if isinstance(rows, Tensor) else None
    try:
        ids = checked_row_ids(rows, None, "rows")
    except ValueError as e:
        raise PolicyError(str(e)) from e
    if ids.shape != (n,):
        raise PolicyError(f"rows must be [N={n}] (one row id per query), got shape {tuple(ids.shape)}")
    return torch.from_numpy(ids).to(device)


def check_estimator_models(quality_estimator, cost_estimator, m: int) -> None:
    """PolicyError naming both shapes when an estimator's ``models`` do not number the M ground-truth
    columns (estimators without a ``models`` list are checked on their outputs instead)."""
    for kind, est in (("quality", quality_estimator), ("cost", cost_estimator)):
        models = getattr(est, "models", None)
        if models is not None and len(models) != m:
            raise PolicyError(f"ground-truth quality/cost have M={m} model columns but the {kind} estimator has "
                              f"{len(models)} models {list(models)}")


def checked_max_depth(max_depth: int | None) -> int | None:
    """``max_depth`` as an int (None: no limit); PolicyError unless it is an integer >= 1 (a policy that
    may run no model answers nothing; a fraction or a bool would silently become another depth)."""
    if max_depth is None:
        return None
    if isinstance(max_depth, bool) or not isinstance(max_depth, numbers.Integral):
        raise PolicyError(f"max_depth must be an integer >= 1 or None, got {max_depth!r} ({type(max_depth).__name__})")
    if max_depth < 1:
        raise PolicyError(f"max_depth must be >= 1, got {max_depth}")
    return int(max_depth)


def checked_uniforms(uniforms, n: int) -> Tensor:
    """The per-query λ-mix draws as float64 [N]; PolicyError unless they are N values in [0, 1] (a
    NaN would silently put its query on ``lam_high`` whatever γ is)."""
    u = torch.as_tensor(uniforms, dtype=torch.float64)
    if u.shape != (n,):
        raise PolicyError(f"uniforms must be [N={n}] (one per query), got shape {tuple(u.shape)}")
    bad = ~((u >= 0) & (u <= 1))  # NaN fails both comparisons
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise PolicyError(f"uniforms must lie in [0, 1]; query {i} has {float(u[i])!r}")
    return u


def check_policy(policy) -> None:
    """PolicyError unless ``policy`` is a policy object (has ``decide`` and ``select``), e.g. a
    strategy name passed where :func:`~cascade_routing.policies.registry.make_policy` of it belongs."""
    if not (callable(getattr(policy, "decide", None)) and callable(getattr(policy, "select", None))):
        hint = f" (for a strategy name use make_policy({policy!r}))" if isinstance(policy, str) else ""
        raise PolicyError(f"policy must be a Policy such as CascadeRouting(...), got {type(policy).__name__}{hint}")


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
    """The run model with the highest post-hoc mean (lowest index on ties); -1 where nothing ran.
    Inputs are checked by :func:`check_select_inputs`."""
    check_select_inputs(estimate, ran)
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

    def for_fit(self, fitted) -> "Policy":
        """The policy that runs under the fitted λ ``fitted``: this one, unless the fit says a simpler
        policy this one contains replaces it at that budget (cascade routing's cascade guard)."""
        return self

    def max_steps(self, num_models: int) -> int:
        """The most models a query can run: ``min(max_depth, num_models)``."""
        return num_models if self.max_depth is None else min(self.max_depth, num_models)
