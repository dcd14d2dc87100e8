"""One decision step of a fitted policy: the step the offline rollout and the online router share.

Offline (:func:`~cascade_routing.policies.rollout.simulate`) and online
(:class:`~cascade_routing.serving.router.CascadeRouter`) both call :func:`decide_step` and
:func:`select_step`, so a server makes the simulation's decisions by construction.

For B rows with quality beliefs ``estimate`` [B, M], cost estimates ``cost`` [B, M], ran-masks
``ran`` bool [B, M] and λ-mix flags ``use_low`` bool [B]:

- row i is at step ``t_i = Σ_m ran[i, m]`` (the number of models that answered so far);
- its λ is ``fitted.lam_for(t_i, use_low_i)``, or ``lam_rows[i, min(t_i, T - 1)]`` when a per-row
  λ table ``lam_rows`` [B, T] is given (many λ values simulated in one batch);
- rows at the same step are decided together:
  ``policy.decide(estimate, cost, ran, λ, **fitted.decide_kwargs())`` (next model, -1 = stop).

``candidates`` bool [B, M] (default: every model) restricts a row to a subset of the models (a
server dropping models whose endpoint failed): rows with the same candidate set are decided by
``policy.on_columns(cols)`` on the columns ``cols`` of that set only, and the chosen indices are
mapped back to the full model list; a row with no candidate left stops (λ reported as 0). A fit
that names its ``models`` (the single-model guard) limits every row's candidates to them; a row
none of whose ``models`` is a candidate keeps its own candidates (a server whose backend for that
model failed still answers, deciding among the others at the fit's λ and depth). The policy decides
through ``policy.for_fit(fitted)`` (at a cascade-guard fit, the cascade it contains).

Pure torch; no Lightning, no transformers.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies.base import Policy, PolicyError


class FittedLike(Protocol):
    """What a decision step needs of a fitted λ (:class:`~cascade_routing.policies.fitting.FittedLambda`)."""

    gamma: float
    budget: float | None

    def lam_for(self, step: int, use_low: Tensor) -> Tensor: ...

    def decide_kwargs(self) -> dict: ...


def candidate_groups(candidates: Tensor | None, num_models: int) -> list[tuple[Tensor | None, list[int]]]:
    """Rows grouped by candidate set: ``(row positions or None for all rows, candidate columns)``."""
    if candidates is None or bool(candidates.all()):
        return [(None, list(range(num_models)))]
    patterns: dict[tuple[bool, ...], list[int]] = {}
    for i, pattern in enumerate(candidates.tolist()):
        patterns.setdefault(tuple(pattern), []).append(i)
    return [(torch.tensor(rows, dtype=torch.long), [j for j, ok in enumerate(pattern) if ok])
            for pattern, rows in patterns.items()]


def _restrict(policy: Policy, estimate: QualityEstimate, cost: Tensor | None, ran: Tensor,
              local: Tensor | None, cols: list[int]) -> tuple[Policy, QualityEstimate, Tensor | None, Tensor]:
    """The policy, beliefs, cost and ran-masks of the rows ``local`` (None: all) on the columns ``cols``."""
    full = len(cols) == ran.shape[1]
    if local is not None:
        estimate = estimate.take(local)
        cost = None if cost is None else cost[local.to(cost.device)]
        ran = ran[local]
    if not full:
        estimate = estimate.take(cols=cols)
        cost = None if cost is None else cost[:, torch.as_tensor(cols, dtype=torch.long, device=cost.device)]
        ran = ran[:, cols]
    return (policy if full else policy.on_columns(cols)), estimate, cost, ran


def _to_full(choice: Tensor, cols: list[int], num_models: int) -> Tensor:
    """Model indices among ``cols`` mapped back to the full model list (-1 stays -1)."""
    if len(cols) == num_models:
        return choice
    cols_t = torch.as_tensor(cols, dtype=torch.long)
    return torch.where(choice >= 0, cols_t[choice.clamp_min(0)], choice)


def decide_step(
    policy: Policy,
    estimate: QualityEstimate,
    cost: Tensor,
    ran: Tensor,
    fitted: FittedLike,
    use_low: Tensor,
    *,
    candidates: Tensor | None = None,
    lam_rows: Tensor | None = None,
    cache: dict | None = None,
    rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(next model long [B] (-1 = stop), λ used float64 [B])``, both on the CPU; see module docstring.

    ``ran``, ``use_low``, ``candidates`` and ``lam_rows`` live on the CPU; ``estimate`` and ``cost``
    wherever the estimators put them (the policy runs there). ``cache``/``rows``: the policy's
    E[max] memo and the rows' ids in the estimators' table (every row must have every model as a
    candidate: the memo is keyed by ran-sets over the full model list).
    """
    b, m = ran.shape
    device, dtype = estimate.mean.device, estimate.mean.dtype
    cost = cost.to(dtype)
    runs = policy.for_fit(fitted)
    if runs is not policy:  # a guard's simpler policy (the cascade) runs at this budget
        policy, cache = runs, None  # the memo belongs to the policy that filled it
    models = getattr(fitted, "models", None)  # fits written before the single-model guard have none
    if models is not None:
        candidates = limited_candidates(candidates, models, b, m)
        cache = None  # the memo is keyed by ran-sets over every model
    out = torch.full((b,), -1, dtype=torch.long)  # rows with no candidate left stop, at λ 0
    lams = torch.zeros(b, dtype=torch.float64)
    for local, cols in candidate_groups(candidates, m):
        if not cols:
            continue
        if cache is not None and len(cols) != m:
            raise PolicyError("an E[max] cache needs every model as a candidate; rows with dropped models have none")
        sub_policy, sub_est, sub_cost, sub_ran = _restrict(policy, estimate, cost, ran, local, cols)
        for t, at in _step_groups(sub_ran.sum(1)):
            pos = local if at is None else at if local is None else local[at]  # None: every row
            if lam_rows is None:
                lam = fitted.lam_for(t, _pick(use_low, pos))
            else:
                lam = _pick(lam_rows[:, min(t, lam_rows.shape[1] - 1)], pos)
            lam = lam.to(device=device, dtype=dtype)
            kwargs = {} if cache is None else {"cache": cache, "rows": _pick(rows, pos).to(device)}
            kwargs.update(fitted.decide_kwargs())
            est_t = sub_est if at is None else sub_est.take(at)
            cost_t = sub_cost if at is None else sub_cost[at.to(sub_cost.device)]
            ran_t = sub_ran if at is None else sub_ran[at]
            nxt = sub_policy.decide(est_t, cost_t, ran_t.to(device), lam, **kwargs).cpu()
            go = nxt >= 0
            if bool(ran_t[go, nxt[go]].any()):
                raise PolicyError(f"policy {policy!r} chose a model that already ran")
            if pos is None:  # one group holds every row
                return _to_full(nxt, cols, m), lam.double().cpu()
            out[pos] = _to_full(nxt, cols, m)
            lams[pos] = lam.double().cpu()
    return out, lams


def max_steps_at(policy: Policy, fitted: FittedLike, num_models: int) -> int:
    """The most models a query may run under ``fitted``: ``max_steps`` of the policy that runs at this
    fit (``policy.for_fit(fitted)``), capped by the fit's depth limit."""
    steps = policy.for_fit(fitted).max_steps(num_models)
    depth = getattr(fitted, "max_depth", None)
    return steps if depth is None else min(steps, int(depth))


def limited_candidates(candidates: Tensor | None, models: tuple[int, ...], b: int, m: int) -> Tensor:
    """bool [B, M]: ``candidates`` (None: every model) limited to ``models``; a row left with none of
    them keeps its own candidates (module docstring)."""
    if any(j >= m for j in models):
        raise PolicyError(f"the fit names models {list(models)}, but there are only {m} models")
    own = torch.ones(b, m, dtype=torch.bool) if candidates is None else candidates
    keep = torch.zeros(m, dtype=torch.bool)
    keep[list(models)] = True
    limited = own & keep
    return torch.where(limited.any(1, keepdim=True), limited, own)


def _pick(x: Tensor, pos: Tensor | None) -> Tensor:
    """``x[pos]``, or ``x`` itself for every row (``pos`` None)."""
    return x if pos is None else x[pos]


def _step_groups(steps: Tensor) -> list[tuple[int, Tensor | None]]:
    """``(step, row positions or None for all rows)`` per distinct value of ``steps`` [B]."""
    first = int(steps[0])
    if bool((steps == first).all()):
        return [(first, None)]
    return [(int(t), (steps == t).nonzero().squeeze(1)) for t in torch.unique(steps).tolist()]


def select_step(policy: Policy, estimate: QualityEstimate, ran: Tensor, candidates: Tensor | None = None) -> Tensor:
    """The answer model per row (long [B] on the CPU, -1 where no candidate ran): ``policy.select``
    over each row's candidate models (``candidates`` as in :func:`decide_step`)."""
    b, m = ran.shape
    out = torch.full((b,), -1, dtype=torch.long)
    for local, cols in candidate_groups(candidates, m):
        if not cols:
            continue
        sub_policy, sub_est, _, sub_ran = _restrict(policy, estimate, None, ran, local, cols)
        choice = sub_policy.select(sub_est, sub_ran.to(estimate.mean.device)).cpu()
        out[slice(None) if local is None else local] = _to_full(choice, cols, m)
    return out
