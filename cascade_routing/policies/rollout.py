"""The rollout: offline simulation of a policy on queries whose every model outcome is known.

It lives in the policy stage because λ fitting is defined through it (the fitted λ is the one whose
rollout meets the budget); :mod:`cascade_routing.evaluation` re-exports it.

The loop is over steps, never over queries: at step t every still-active query gets its belief
given what ran, the policy decides (next model or stop; :func:`~cascade_routing.policies.step.decide_step`,
the step the online router runs too), the chosen models are marked as run. When
every query stopped, the policy selects the answer model; realised quality is the ground truth of
the answer model and realised cost the sum of the true costs of every model that ran.

λ for step t and query i: ``lam_low[t]`` if ``u_i < gamma`` else ``lam_high[t]`` (the last entry
is reused for later steps), see :class:`cascade_routing.policies.fitting.FittedLambda`.
Device-agnostic: tensors live where the estimators put them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies.base import (Policy, PolicyError, check_estimator_models, check_ground_truth,
                                           check_policy, checked_rows, checked_uniforms)
from cascade_routing.policies.fitting import FittedLambda, as_fitted
from cascade_routing.policies.step import decide_step, max_steps_at, select_step


@dataclass
class SimulationResult:
    """Per query: ``ran`` bool [N, M], ``order`` long [N, T] (models in run order, -1 padded),
    ``answer`` long [N] (-1 if nothing ran), realised ``quality`` [N] and ``cost`` [N]."""

    ran: Tensor
    order: Tensor
    answer: Tensor
    quality: Tensor
    cost: Tensor

    @property
    def mean_quality(self) -> float:
        return float(self.quality.double().mean())

    @property
    def mean_cost(self) -> float:
        return float(self.cost.double().mean())

    @property
    def num_run(self) -> Tensor:
        return self.ran.sum(1)


def _as_tensor(x, name: str, dtype=torch.float64) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(dtype)
    if t.dim() != 2:
        raise PolicyError(f"{name} must be [N, M], got shape {tuple(t.shape)}")
    return t


def rollout_inputs(quality, cost, rows) -> tuple[Tensor, Tensor, Tensor]:
    """Ground truth ``quality`` and ``cost`` as float64 [N, M] of the same shape (M >= 1; quality
    finite in [0, 1], cost finite >= 0: :func:`~cascade_routing.policies.base.check_ground_truth`),
    and the queries' ``rows`` in the estimators' table as long [N] >= 0 (default 0..N-1)."""
    quality = _as_tensor(quality, "quality")
    cost = _as_tensor(cost, "cost")
    n, m = quality.shape
    if cost.shape != (n, m):
        raise PolicyError(f"cost has shape {tuple(cost.shape)}, quality {tuple(quality.shape)}")
    if n:  # an empty stream is left to the caller (simulate refuses it)
        check_ground_truth(quality, cost, "ground-truth")
    rows = checked_rows(rows, n)
    return quality, cost, rows


def _estimate(estimator, kind: str, rows: Tensor, ran: Tensor, m: int):
    """``estimator.estimate(rows, ran)``, with a PolicyError for row ids outside its table (an
    IndexError from the estimator) or an output that is not [B, M]."""
    try:
        out = estimator.estimate(rows, ran)
    except IndexError as e:
        raise PolicyError(f"the {kind} estimator could not look up query rows {int(rows.min())}..{int(rows.max())} "
                          f"(rows must be row ids of its table): {e}") from e
    expected = QualityEstimate if kind == "quality" else Tensor
    if not isinstance(out, expected):
        raise PolicyError(f"the {kind} estimator returned {type(out).__name__}, expected a {expected.__name__} "
                          "(are the quality and cost estimators passed in that order?)")
    shape = tuple((out.mean if kind == "quality" else out).shape)
    if shape != (rows.shape[0], m):
        raise PolicyError(f"the {kind} estimator returned shape {shape}, expected [B={rows.shape[0]}, M={m}] like "
                          f"the ground-truth quality/cost")
    return out


def simulate(
    policy: Policy,
    quality_estimator,
    cost_estimator,
    quality,
    cost,
    fitted: FittedLambda | float | Tensor,
    uniforms: Tensor | None = None,
    rows: Tensor | None = None,
    cache: dict | None = None,
    seed: int = 0,
    lam_rows: Tensor | None = None,
) -> SimulationResult:
    """Run ``policy`` on N queries with ground truth ``quality``/``cost`` [N, M] (quality finite in
    [0, 1], cost finite >= 0) and return a :class:`SimulationResult`.

    ``fitted``: the λ to run at, a :class:`~cascade_routing.policies.fitting.FittedLambda` (from
    :func:`~cascade_routing.policies.fitting.fit_lambda`), a scalar λ >= 0, or a per-step vector λ [T].
    ``rows`` (integer [N], >= 0): row ids of these queries in the estimators' table (default 0..N-1).
    ``uniforms`` [N] in [0, 1]: the per-query draws for the λ tie mix (default: seeded by ``seed``).
    ``cache``: optional memo of supermodel E[max] tables (cascade routing), reused across calls with
    the same policy and estimators (e.g. while fitting λ). ``lam_rows`` [N, T] (float64): λ of each
    query per step instead of ``fitted``'s (step t >= T uses column T-1; ``fitted`` still gives the
    depth limit), so many λ values run in one batch (:mod:`cascade_routing.policies.lambda_search`).
    Bad input (shapes, NaN, negative λ or cost, rows outside the estimators' table, an estimator
    returning the wrong type or shape) raises :class:`~cascade_routing.policies.base.PolicyError`.
    """
    check_policy(policy)
    quality, cost, rows = rollout_inputs(quality, cost, rows)
    n, m = quality.shape
    if n == 0:
        raise PolicyError(f"no queries to simulate: quality and cost are {tuple(quality.shape)}")
    check_estimator_models(quality_estimator, cost_estimator, m)
    fitted = as_fitted(fitted)
    if uniforms is None:
        gen = torch.Generator().manual_seed(seed)
        uniforms = torch.rand(n, generator=gen, dtype=torch.float64)
    uniforms = checked_uniforms(uniforms, n)
    use_low = uniforms < fitted.gamma
    if lam_rows is not None and (lam_rows.dim() != 2 or lam_rows.shape[0] != n or lam_rows.shape[1] == 0):
        raise PolicyError(f"lam_rows must be [N={n}, T >= 1], got shape {tuple(lam_rows.shape)}")

    runs = policy.for_fit(fitted)  # what decides at this fit (a guard's simpler policy may replace it)
    steps = max_steps_at(policy, fitted, m)
    ran = torch.zeros(n, m, dtype=torch.bool)
    order = torch.full((n, steps), -1, dtype=torch.long)
    active = torch.ones(n, dtype=torch.bool)
    device = None
    for step in range(steps):
        idx = torch.nonzero(active).squeeze(1)
        if idx.numel() == 0:
            break
        q_rows = rows[idx]
        est = _estimate(quality_estimator, "quality", q_rows, ran[idx] if device is None else ran[idx].to(device), m)
        device = est.mean.device
        c_est = _estimate(cost_estimator, "cost", q_rows.to(device), ran[idx].to(device), m)
        nxt, _ = decide_step(policy, est, c_est, ran[idx], fitted, use_low[idx],
                             lam_rows=None if lam_rows is None else lam_rows[idx], cache=cache, rows=q_rows)
        go = nxt >= 0
        ran[idx[go], nxt[go]] = True
        order[idx, step] = nxt
        active[idx[~go]] = False
    est = _estimate(quality_estimator, "quality", rows.to(device) if device else rows,
                    ran.to(device) if device else ran, m)
    answer = select_step(runs, est, ran)
    got = answer >= 0
    realised_q = torch.zeros(n, dtype=torch.float64)
    realised_q[got] = quality[got.nonzero().squeeze(1), answer[got]]
    realised_c = (cost * ran).sum(1)
    return SimulationResult(ran, order, answer, realised_q, realised_c)
