"""Fitting λ to a cost budget on calibration rows.

Constant λ (or a fixed per-step shape ``v``, λ_t = s·v_t) by bisection on the scale: the mean
calibration cost decreases (stepwise) as λ grows. Bisection stops with a bracket
``lam_low < lam_high`` where the mean cost at ``lam_low`` is above the budget and at ``lam_high`` at
or below it. Then a per-query mix: query i uses ``lam_low`` iff ``u_i < gamma``, with ``u_i`` from
:func:`query_uniforms` (a stable hash of its text) or seeded draws. ``gamma`` is the largest value
for which the *realised* mean calibration cost with these very ``u_i`` is at or below the budget,
so the budget is met on calibration as tightly as the per-query costs allow (the gap is below one
query's cost difference divided by N).

λ shape selection: a policy may carry ``lambda_shapes`` (candidate per-step shapes ``v``, e.g.
``(1, κ)``: the first model is chosen at λ = s, every later step at λ = s·κ). With no explicit
``shape``, :func:`fit_lambda` fits the scale for every candidate on the same calibration rows and
keeps the first candidate (the default, e.g. the constant λ) unless another one beats it by more
than its own noise: a paired bootstrap over the calibration queries' realised qualities
(:func:`choose_significant`); among those that do, the highest mean calibration quality wins (all
meet the budget; ties: the earlier candidate). κ > 1 makes post-hoc escalation dearer than the first choice, κ → ∞ is
routing, κ = 1 the constant λ. Only calibration rows are used, so this is model selection on the
calibration split; the chosen vectors are stored in the :class:`FittedLambda` (serving reads them).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from cascade_routing.policies.base import BudgetUnreachable, Policy, PolicyError
from cascade_routing.policies.significance import DEFAULT_LEVEL, significantly_better

# Largest λ the bisection tries: λ·cost must stay finite in float32 (the policies' usual dtype).
MAX_LAMBDA = 1e30


def query_uniforms(texts: list[str]) -> Tensor:
    """u in [0, 1) per query: the first 8 bytes of SHA-256(UTF-8 text) as an integer / 2**64 (float64).

    Stable across processes and machines, so offline simulation and a live server mix λ identically.
    """
    vals = [int.from_bytes(hashlib.sha256(str(t).encode("utf-8")).digest()[:8], "big") / 2.0**64 for t in texts]
    return torch.tensor(vals, dtype=torch.float64)


@dataclass
class FittedLambda:
    """λ per step (``lam_low``/``lam_high`` [T]; step t >= T uses the last entry) and the mix ``gamma``:
    a query uses ``lam_low`` iff its uniform is below ``gamma``."""

    lam_low: Tensor
    lam_high: Tensor
    gamma: float = 0.0
    budget: float | None = None
    calibration_cost: float | None = None
    calibration_quality: float | None = None
    info: dict = field(default_factory=dict)
    max_depth: int | None = None  # a depth limit fitted with λ (1: the routing guard of cascade routing)

    def __post_init__(self) -> None:
        self.lam_low = torch.as_tensor(self.lam_low, dtype=torch.float64).reshape(-1)
        self.lam_high = torch.as_tensor(self.lam_high, dtype=torch.float64).reshape(-1)
        if self.lam_low.shape != self.lam_high.shape or self.lam_low.numel() == 0:
            raise PolicyError("lam_low and lam_high must be non-empty and of the same length")
        for name, lam in (("lam_low", self.lam_low), ("lam_high", self.lam_high)):
            if bool(torch.isnan(lam).any()) or bool((lam < 0).any()):
                raise PolicyError(f"{name} must be >= 0 and not NaN, got {lam.tolist()}")
        if not 0.0 <= float(self.gamma) <= 1.0:
            raise PolicyError(f"gamma must be in [0, 1], got {self.gamma}")
        self.gamma = float(self.gamma)
        if self.max_depth is not None and int(self.max_depth) < 1:
            raise PolicyError(f"max_depth must be >= 1, got {self.max_depth}")

    def decide_kwargs(self) -> dict:
        """Extra arguments for ``policy.decide`` under this fit (the fitted depth limit, if any)."""
        return {} if self.max_depth is None else {"max_depth": int(self.max_depth)}

    def lam_for(self, step: int, use_low: Tensor) -> Tensor:
        """λ [B] at ``step`` for queries flagged ``use_low`` (bool [B])."""
        t = min(step, self.lam_low.numel() - 1)
        return torch.where(use_low, self.lam_low[t], self.lam_high[t])

    def to_dict(self) -> dict:
        out = {"lam_low": self.lam_low.tolist(), "lam_high": self.lam_high.tolist(), "gamma": self.gamma,
               "budget": self.budget, "calibration_cost": self.calibration_cost,
               "calibration_quality": self.calibration_quality}
        if self.max_depth is not None:
            out["max_depth"] = int(self.max_depth)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "FittedLambda":
        # float64: λ spans orders of magnitude and float32 would move decisions at the tie point.
        low = torch.tensor(d["lam_low"], dtype=torch.float64)
        high = torch.tensor(d["lam_high"], dtype=torch.float64)
        return cls(low, high, d.get("gamma", 0.0), d.get("budget"),
                   d.get("calibration_cost"), d.get("calibration_quality"), max_depth=d.get("max_depth"))


def as_fitted(lam) -> FittedLambda:
    """A FittedLambda from a FittedLambda, a scalar λ or a per-step vector λ."""
    if isinstance(lam, FittedLambda):
        return lam
    t = torch.as_tensor(lam, dtype=torch.float64).reshape(-1)
    return FittedLambda(t, t.clone(), 0.0)


def _check(quality, cost, budget: float) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(quality.cpu() if isinstance(quality, Tensor) else quality, dtype=np.float64)
    c = np.asarray(cost.cpu() if isinstance(cost, Tensor) else cost, dtype=np.float64)
    if q.ndim != 2 or c.shape != q.shape or q.shape[0] == 0:
        raise PolicyError(f"quality and cost must both be [N >= 1, M], got {q.shape} and {c.shape}")
    if np.isnan(q).any() or np.isnan(c).any():
        raise PolicyError("NaN in calibration quality or cost")
    if budget is None or not math.isfinite(budget) or budget < 0:
        raise PolicyError(f"budget must be a finite number >= 0, got {budget}")
    cheapest = float(c.mean(0).min())
    if budget < cheapest * (1 - 1e-9):
        raise PolicyError(
            f"budget {budget:.6g} is below the mean cost of the cheapest model ({cheapest:.6g}) on the "
            f"calibration rows: no policy can meet it")
    return q, c


def fit_lambda(
    policy: Policy,
    quality_estimator,
    cost_estimator,
    quality,
    cost,
    budget: float,
    queries: list[str] | None = None,
    *,
    uniforms: Tensor | None = None,
    rows: Tensor | None = None,
    shape: Tensor | None = None,
    cache: dict | None = None,
    max_iter: int = 40,
    rel_tol: float = 1e-5,
    seed: int = 0,
) -> FittedLambda:
    """Fit λ so that the mean calibration cost meets ``budget`` (see module docstring).

    ``quality``/``cost`` [N, M]: ground truth of the calibration queries; ``rows``: their row ids in
    the estimators' table (default 0..N-1); ``queries``: their texts (for :func:`query_uniforms`;
    else ``uniforms`` or seeded draws). ``shape`` [T] >= 0: fit λ_t = s·shape_t. Without ``shape``:
    the policy's ``lambda_shapes`` candidates, best by calibration quality (module docstring), or
    a constant λ when it has none.
    """
    q, c = _check(quality, cost, budget)
    n = q.shape[0]
    if uniforms is None:
        uniforms = query_uniforms(queries) if queries is not None else torch.rand(
            n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    uniforms = torch.as_tensor(uniforms, dtype=torch.float64)
    if uniforms.shape != (n,):
        raise PolicyError(f"{uniforms.shape[0]} uniforms/texts for {n} calibration queries")
    if cache is None:
        cache = {}
    shapes = getattr(policy, "lambda_shapes", None) if shape is None else None
    guard = shape is None and bool(getattr(policy, "routing_guard", False))
    args = (policy, quality_estimator, cost_estimator, q, c, budget, uniforms, rows, cache, max_iter, rel_tol)
    if not shapes and not guard:
        return _fit_scale(*args, shape)
    fits = [_fit_scale(*args, None if cand is None else torch.as_tensor(cand, dtype=torch.float64))
            for cand in (shapes or [None])]
    if guard:  # the routing the policy generalises: the same policy limited to depth 1
        fits.append(_fit_scale(*args, None, max_depth=1))
    best = choose_significant(fits, seed=seed)
    best.info["shape_scores"] = [round(float(f.calibration_quality), 6) for f in fits]
    return best


def choose_significant(fits: list["FittedLambda"], level: float = DEFAULT_LEVEL, seed: int = 0) -> "FittedLambda":
    """The first fit (the default) unless another beats it by more than its noise on the same rows.

    Candidates whose per-query calibration quality beats the default's in a paired bootstrap
    (:func:`~cascade_routing.policies.significance.significantly_better` at ``level``) are eligible;
    among them the highest mean calibration quality wins (ties: the earlier). ``info["chosen_by"]``
    says which rule decided.
    """
    default = fits[0]
    eligible = [f for f in fits[1:] if f.calibration_quality > default.calibration_quality
                and significantly_better(f.info["per_query_quality"], default.info["per_query_quality"], level,
                                         seed=seed)]
    best = default
    for f in eligible:
        if f.calibration_quality > best.calibration_quality + 1e-12:
            best = f
    best.info["chosen_by"] = "default" if best is default else f"paired bootstrap (level {level})"
    return best


def _fit_scale(policy, quality_estimator, cost_estimator, q, c, budget, uniforms, rows, cache, max_iter, rel_tol,
               shape, max_depth: int | None = None) -> FittedLambda:
    """Bisection on the scale s of λ_t = s·shape_t and the γ mix (see module docstring); ``max_depth``
    is fitted along (stored in the result)."""
    from cascade_routing.policies.rollout import simulate  # rollout imports this module

    v = torch.ones(1, dtype=torch.float64) if shape is None else torch.as_tensor(shape, dtype=torch.float64).reshape(-1)
    if bool((v < 0).any()) or bool(torch.isnan(v).any()) or float(v.max()) <= 0:
        raise PolicyError(f"λ shape must be >= 0 with a positive entry, got {v.tolist()}")

    def run(scale: float):
        lam = FittedLambda(scale * v, scale * v, 0.0, max_depth=max_depth)
        return simulate(policy, quality_estimator, cost_estimator, q, c, lam, uniforms, rows, cache)

    slack = 1e-9 * budget + 1e-15  # float rounding of mean costs
    budget_cmp = budget + slack
    res0 = run(0.0)
    if res0.mean_cost <= budget_cmp:
        return FittedLambda(0.0 * v, 0.0 * v, 0.0, budget, res0.mean_cost, res0.mean_quality,
                            {"iterations": 0, "shape": v.tolist(), "per_query_quality": res0.quality.numpy()},
                            max_depth)
    lo, res_lo = 0.0, res0
    hi = 1.0 / max(float(c.mean()), 1e-12)
    res_hi = run(hi)
    grow = 0
    while res_hi.mean_cost > budget_cmp:
        lo, res_lo = hi, res_hi
        if hi * float(v.max()) >= MAX_LAMBDA:
            raise BudgetUnreachable(
                f"budget {budget:.6g} not reachable by {policy!r} on these rows: even λ={lo:.3g} costs "
                f"{res_lo.mean_cost:.6g} (queries still run their cheapest model by estimate)", res_lo.mean_cost)
        hi = min(hi * 4.0, MAX_LAMBDA / float(v.max()))
        grow += 1
        res_hi = run(hi)
    it = 0
    while it < max_iter and hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        res = run(mid)
        if res.mean_cost > budget_cmp:
            lo, res_lo = mid, res
        else:
            hi, res_hi = mid, res
        it += 1
    gamma = _budget_gamma(res_lo.cost, res_hi.cost, uniforms, budget_cmp)
    use_low = uniforms < gamma
    mix_cost = float(torch.where(use_low, res_lo.cost, res_hi.cost).mean())
    per_query_quality = torch.where(use_low, res_lo.quality, res_hi.quality)
    mix_quality = float(per_query_quality.mean())
    return FittedLambda(lo * v, hi * v, gamma, budget, mix_cost, mix_quality,
                        {"iterations": it + grow + 2, "cost_low": res_lo.mean_cost, "cost_high": res_hi.mean_cost,
                         "shape": v.tolist(), "per_query_quality": per_query_quality.numpy()}, max_depth)


def _budget_gamma(cost_low: Tensor, cost_high: Tensor, uniforms: Tensor, budget: float) -> float:
    """Largest γ with mean(where(u < γ, cost_low, cost_high)) <= budget (realised on these u)."""
    n = uniforms.numel()
    order = torch.argsort(uniforms)
    u_sorted = uniforms[order]
    delta = (cost_low - cost_high)[order]
    mean_cost = float(cost_high.mean()) + torch.cumsum(delta, 0) / n  # cost when the first k+1 use low
    ok = (mean_cost <= budget + 1e-12).nonzero().squeeze(1)
    if ok.numel() == 0:
        return 0.0
    k = int(ok.max())
    return 1.0 if k == n - 1 else float(u_sorted[k + 1])
