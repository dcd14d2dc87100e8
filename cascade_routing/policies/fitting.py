"""Fitting λ to a cost budget on calibration rows.

Constant λ (or a fixed per-step shape ``v``, λ_t = s·v_t) by bisection on the scale. With a
constant λ the mean calibration cost falls (stepwise) as λ grows on every case tested. With a
per-step shape it is *not* guaranteed to: a dearer escalation (κ > 1) can make a stronger, costlier
first model the better plan, so the cost can rise with the scale (see
:mod:`cascade_routing.policies.lambda_search`). Either way, bisection stops with a bracket
``lam_low < lam_high`` where the mean calibration cost at ``lam_low`` is above the (overshoot-
corrected) budget and at ``lam_high`` at or below it: every step keeps this invariant, so the budget
is met on the calibration rows at the returned bracket (and by the γ mix below) whether or not the
cost is monotone; what is lost is only that the crossing found is unique. Ground truth must be
finite, quality in [0, 1] and cost >= 0 (PolicyError otherwise). Then a per-query mix: query i uses
``lam_low`` iff ``u_i < gamma``, with ``u_i`` from
:func:`query_uniforms` (a stable hash of its text) or seeded draws. ``gamma`` is the largest value
for which the *realised* mean calibration cost with these very ``u_i`` is at or below the budget,
so the budget is met on calibration as tightly as the per-query costs allow (the gap is below one
query's cost difference divided by N).

Overshoot correction (default): new queries at the fitted λ spend about the mean calibration cost just
*after* the jump that crossed the budget, i.e. the budget plus that jump's overshoot. The fit therefore
targets ``budget − E[overshoot]`` on the calibration rows (:mod:`cascade_routing.policies.overshoot`),
so that the expected cost on new queries is the budget. ``overshoot_correction=False`` meets the budget
on the calibration rows instead (the paper's protocol, used by the Table 1 reproduction).

λ shape selection: a policy may carry ``lambda_shapes`` (candidate per-step shapes ``v``, e.g.
``(1, κ)``: the first model is chosen at λ = s, every later step at λ = s·κ). With no explicit
``shape``, :func:`fit_lambda` fits the scale for every candidate on the same calibration rows and
keeps the first candidate (the default, e.g. the constant λ) unless another one beats it by more
than its own noise: a paired bootstrap over the calibration queries' realised qualities
(:func:`choose_significant`); among those that do, the highest mean calibration quality wins (all
meet the budget; ties: the earlier candidate). κ > 1 makes post-hoc escalation dearer than the first choice, κ → ∞ is
routing, κ = 1 the constant λ. Only calibration rows are used, so this is model selection on the
calibration split; the chosen vectors are stored in the :class:`FittedLambda` (serving reads them).

Guards (a policy with ``routing_guard``, cascade routing): three simpler policies join the candidates
of every budget, kept by the same rule, only when they beat the default by more than its noise (a
fallback on any calibration difference would switch on noise where the calibration split is small):

- routing: the same policy limited to depth 1, its λ fitted to the same budget on the same rows;
- the best single model it can afford: the model with the highest mean calibration quality among
  those whose mean calibration cost is within the budget, run alone for every query
  (:func:`single_model_fit`; ``FittedLambda.models`` = that model, depth 1). Its cost on new queries
  is its mean cost, with no λ jump to overshoot, so it is compared at the budget itself;
- the optimal cascade it contains (``policy.cascade_policy()``: the pool as the chain), its λ fitted
  to the same budget on the same rows (``FittedLambda.cascade``; ``policy.for_fit`` runs it). Under
  beliefs without uncertainty cascade routing's first step is routing: it gives no value to seeing
  a cheap model's answer before deciding, which the cascade always gets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from cascade_routing.interfaces import checked_queries
from cascade_routing.policies.lambda_table import checked_budget
from cascade_routing.policies.base import (BudgetUnreachable, Policy, PolicyError, check_estimator_models,
                                           check_ground_truth, check_policy, checked_rows, checked_uniforms)
from cascade_routing.policies.significance import DEFAULT_LEVEL, significantly_better


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
    models: tuple[int, ...] | None = None  # the only models this fit may run (the single-model guard); None: all
    cascade: bool = False  # run the optimal cascade the policy contains (the cascade guard; Policy.for_fit)

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
        if self.models is not None:
            models = tuple(self.models)
            if not models or any(isinstance(j, bool) or int(j) != j or j < 0 for j in models) \
                    or len(set(models)) != len(models):
                raise PolicyError(f"models must be distinct model indices >= 0, got {list(models)}")
            self.models = tuple(int(j) for j in models)

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
        if self.models is not None:
            out["models"] = list(self.models)
        if self.cascade:
            out["cascade"] = True
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "FittedLambda":
        # float64: λ spans orders of magnitude and float32 would move decisions at the tie point.
        low = torch.tensor(d["lam_low"], dtype=torch.float64)
        high = torch.tensor(d["lam_high"], dtype=torch.float64)
        return cls(low, high, d.get("gamma", 0.0), d.get("budget"),
                   d.get("calibration_cost"), d.get("calibration_quality"), max_depth=d.get("max_depth"),
                   models=None if d.get("models") is None else tuple(d["models"]),
                   cascade=bool(d.get("cascade", False)))


def as_fitted(lam) -> FittedLambda:
    """A FittedLambda from a FittedLambda, a scalar λ or a per-step vector λ [T] (each >= 0, not NaN);
    PolicyError for anything else (a string, a [B, T] table: per-query λ is not a fit)."""
    if isinstance(lam, FittedLambda):
        return lam
    if isinstance(lam, (str, bytes)):
        raise PolicyError(f"λ must be a FittedLambda, a number or a per-step vector of numbers, got {lam!r}")
    try:
        t = torch.as_tensor(lam, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise PolicyError(f"λ must be a FittedLambda, a number or a per-step vector of numbers, got "
                          f"{type(lam).__name__}: {err}") from None
    if t.dim() > 1:
        raise PolicyError(f"λ must be a scalar or a per-step vector [T], got shape {tuple(t.shape)}")
    t = t.reshape(-1)
    return FittedLambda(t, t.clone(), 0.0)


def _checked_data(quality, cost) -> tuple[np.ndarray, np.ndarray]:
    """Calibration ``quality`` and ``cost`` as float64 arrays [N, M] (N, M >= 1), finite, quality in
    [0, 1] and cost >= 0 (:func:`~cascade_routing.policies.base.check_ground_truth`; an infinite cost
    would make the bisection's starting scale 0)."""
    q = np.asarray(quality.cpu() if isinstance(quality, Tensor) else quality, dtype=np.float64)
    c = np.asarray(cost.cpu() if isinstance(cost, Tensor) else cost, dtype=np.float64)
    check_ground_truth(torch.tensor(q), torch.tensor(c), "calibration")  # copies: q may be read-only
    return q, c


def _check_budget(c: np.ndarray, budget: float) -> None:
    """PolicyError unless ``budget`` is a finite number >= 0 (:func:`~cascade_routing.policies.
    lambda_table.checked_budget`) and at least the cheapest model's mean cost."""
    try:
        budget = checked_budget(budget)
    except ValueError as err:
        raise PolicyError(str(err)) from None
    cheapest = float(c.mean(0).min())
    if budget < cheapest * (1 - 1e-9):
        raise PolicyError(
            f"budget {budget:.6g} is below the mean cost of the cheapest model ({cheapest:.6g}) on the "
            f"calibration rows: no policy can meet it")


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
    overshoot_correction: bool = True,
) -> FittedLambda:
    """Fit λ so that the mean calibration cost meets ``budget`` (see module docstring).

    ``quality``/``cost`` [N, M]: ground truth of the calibration queries; ``rows``: their row ids in
    the estimators' table (default 0..N-1); ``queries``: their texts (for :func:`query_uniforms`;
    else ``uniforms`` or seeded draws). ``shape`` [T] >= 0: fit λ_t = s·shape_t. Without ``shape``:
    the policy's ``lambda_shapes`` candidates, best by calibration quality (module docstring), or
    a constant λ when it has none. ``overshoot_correction``: see the module docstring.

    ``budget``: a finite number >= 0, at least the cheapest model's mean cost on these rows
    (:class:`~cascade_routing.policies.base.PolicyError` otherwise); a budget below what the policy
    can spend at any λ (every query its cheapest model by estimate) raises
    :class:`~cascade_routing.policies.base.BudgetUnreachable`, whose ``min_cost`` can be fitted.
    Bad ``rows``, ``uniforms`` (N values in [0, 1]), ``shape`` or ground truth raise PolicyError.
    """
    return fit_lambdas(policy, quality_estimator, cost_estimator, quality, cost, [budget], queries,
                       uniforms=uniforms, rows=rows, shape=shape, cache=cache, max_iter=max_iter, rel_tol=rel_tol,
                       seed=seed, overshoot_correction=overshoot_correction)[0]


def fit_lambdas(
    policy: Policy,
    quality_estimator,
    cost_estimator,
    quality,
    cost,
    budgets,
    queries: list[str] | None = None,
    *,
    uniforms: Tensor | None = None,
    rows: Tensor | None = None,
    shape: Tensor | None = None,
    cache: dict | None = None,
    max_iter: int = 40,
    rel_tol: float = 1e-5,
    seed: int = 0,
    overshoot_correction: bool = True,
) -> list[FittedLambda]:
    """:func:`fit_lambda` for every budget of ``budgets`` on the same calibration rows, one fit each.

    The fits are the same as one :func:`fit_lambda` call per budget; their bisections (every budget ×
    λ shape × routing-guard candidate) advance in lockstep, and each round simulates all their next
    λ values as one batch of rows (:mod:`cascade_routing.policies.lambda_search`).
    """
    from cascade_routing.policies.lambda_search import drive, scale_search  # the bisection, batched

    check_policy(policy)
    budgets = list(budgets)
    if not budgets:
        return []
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 0:
        raise PolicyError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    q, c = _checked_data(quality, cost)  # once, not per budget
    for b in budgets:
        _check_budget(c, b)
    budgets = [float(b) for b in budgets]
    n = q.shape[0]
    check_estimator_models(quality_estimator, cost_estimator, q.shape[1])
    rows = None if rows is None else checked_rows(rows, n)
    if uniforms is None:
        uniforms = query_uniforms(checked_queries(queries)) if queries is not None else torch.rand(
            n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    uniforms = torch.as_tensor(uniforms, dtype=torch.float64)
    if uniforms.shape != (n,):
        got = uniforms.shape[0] if uniforms.dim() == 1 else f"shape {tuple(uniforms.shape)} of"
        raise PolicyError(f"{got} uniforms/texts for {n} calibration queries")
    uniforms = checked_uniforms(uniforms, n)
    if cache is None:
        cache = {}
    shapes = getattr(policy, "lambda_shapes", None) if shape is None else None
    guard = shape is None and bool(getattr(policy, "routing_guard", False))
    if not shapes and not guard:
        candidates: list[tuple[Tensor | None, int | None]] = [(shape, None)]
    else:
        candidates = [(None if cand is None else torch.as_tensor(cand, dtype=torch.float64), None)
                      for cand in (shapes or [None])]
        if guard:  # the routing the policy generalises: the same policy limited to depth 1
            candidates.append((None, 1))
    searches = [scale_search(policy, c, b, v, uniforms, max_iter, rel_tol, depth, overshoot_correction)
                for b in budgets for v, depth in candidates]
    fits = drive(searches, policy, quality_estimator, cost_estimator, q, c, uniforms, rows, cache)
    if len(candidates) == 1:
        return fits
    cascades = _cascade_fits(policy, quality_estimator, cost_estimator, q, c, budgets, uniforms, rows, max_iter,
                             rel_tol, overshoot_correction) if guard else [None] * len(budgets)
    out = []
    for i, budget in enumerate(budgets):
        group = fits[i * len(candidates):(i + 1) * len(candidates)]
        single = single_model_fit(q, c, budget, fallback=group[-1]) if guard else None
        extra = [f for f in (single, cascades[i]) if f is not None]
        best = choose_significant(group + extra, seed=seed)
        best.info["shape_scores"] = [round(float(f.calibration_quality), 6) for f in group]
        if guard:  # the routing the policy contains, fitted to the same budget: its calibration quality
            best.info["routing_score"] = best.info["shape_scores"][-1]
        if single is not None:
            best.info["single_model"] = {"model": single.models[0], "score": round(single.calibration_quality, 6)}
        if cascades[i] is not None:
            best.info["cascade_score"] = round(float(cascades[i].calibration_quality), 6)
        out.append(best)
    return out


def _cascade_fits(policy: Policy, quality_estimator, cost_estimator, q: np.ndarray, c: np.ndarray, budgets: list[float],
                  uniforms: Tensor, rows: Tensor | None, max_iter: int, rel_tol: float, overshoot_correction: bool
                  ) -> list[FittedLambda | None]:
    """The cascade guard's candidate per budget: ``policy.cascade_policy()`` fitted to it on the same
    rows (``cascade=True``), None where the policy has no cascade or the budget is below the cascade's
    floor (its chain's first model on these rows)."""
    make = getattr(policy, "cascade_policy", None)
    if make is None:
        return [None] * len(budgets)
    cascade = make()
    first = getattr(cascade, "pool", (0,))[0]
    floor = float(c[:, first].mean()) * (1 + 1e-9)
    reachable = [i for i, b in enumerate(budgets) if b >= floor]
    out: list[FittedLambda | None] = [None] * len(budgets)
    while reachable:
        try:
            fits = fit_lambdas(cascade, quality_estimator, cost_estimator, q, c, [budgets[i] for i in reachable],
                               uniforms=uniforms, rows=rows, max_iter=max_iter, rel_tol=rel_tol,
                               overshoot_correction=overshoot_correction)
            break
        except BudgetUnreachable as err:  # the cascade's floor on these rows: drop the budgets below it
            reachable = [i for i in reachable if budgets[i] >= err.min_cost * (1 + 1e-9)]
    else:
        return out
    for i, fit in zip(reachable, fits):
        out[i] = dataclasses.replace(fit, cascade=True)
    return out


def single_model_fit(quality: np.ndarray, cost: np.ndarray, budget: float,
                     fallback: FittedLambda | None = None) -> FittedLambda | None:
    """The best model alone as a fit: among the models whose mean calibration cost is within ``budget``
    (relative slack 1e-9), the one with the highest mean calibration quality (ties: the lower index),
    run for every query (``models=(j,)``, depth 1); None if no model is within the budget.
    ``quality``/``cost`` [N, M]: the calibration rows.

    λ and γ do not change the decision while that model is a candidate (some model always runs).
    They are those of ``fallback`` (the routing candidate fitted to the same budget), so a server whose
    backend for the model failed routes among the others at the budget's routing λ; 0 without one.
    The model is chosen and then tested on the same calibration rows, which favours it slightly; the
    paired bootstrap's 10% level is what keeps that from deciding on noise."""
    mean_cost, mean_quality = cost.mean(0), quality.mean(0)
    affordable = np.nonzero(mean_cost <= budget * (1 + 1e-9) + 1e-15)[0]
    if affordable.size == 0:
        return None
    j = int(affordable[np.argmax(mean_quality[affordable])])
    zero = torch.zeros(1, dtype=torch.float64)
    lam_low, lam_high, gamma = ((zero, zero.clone(), 0.0) if fallback is None
                                else (fallback.lam_low.clone(), fallback.lam_high.clone(), fallback.gamma))
    return FittedLambda(lam_low, lam_high, gamma, budget, float(mean_cost[j]), float(mean_quality[j]),
                        {"per_query_quality": quality[:, j].copy()}, max_depth=1, models=(j,))


def fit_reachable_lambdas(policy: Policy, quality_estimator, cost_estimator, quality, cost, budgets,
                          **kwargs) -> tuple[list[FittedLambda], list[float]]:
    """:func:`fit_lambdas` for ``budgets``, each raised to what the policy can spend where it is below.

    A budget under the policy's reachable floor on these rows (a cascade always runs its chain's first
    model; every policy runs at least each query's cheapest model by estimate) makes
    :func:`fit_lambdas` raise :class:`~cascade_routing.policies.base.BudgetUnreachable` with that
    floor; such budgets are raised to it and the fit is repeated. Returns (the fits, the budgets
    fitted, in the order of ``budgets``); ``kwargs`` go to :func:`fit_lambdas`.
    """
    fitted_budgets = [float(b) for b in budgets]
    while True:
        try:
            return fit_lambdas(policy, quality_estimator, cost_estimator, quality, cost, fitted_budgets,
                               **kwargs), fitted_budgets
        except BudgetUnreachable as e:
            reachable = e.min_cost * (1 + 1e-9)
            if all(b >= reachable for b in fitted_budgets):
                raise
            fitted_budgets = [max(b, reachable) for b in fitted_budgets]


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
