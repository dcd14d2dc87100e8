"""A smooth relaxation of the whole multi-step policy, differentiable in per-step λ, and tuning of λ.

Relaxation: instead of taking the argmax over candidate supermodels, a query in ran-state s at step
t picks candidate S with probability ``softmax_S((emax_S − λ_t·added_S) / τ)`` and then runs the
next model of S (or stops). The probability of each ran-state is carried through the steps, per
query, so the expected quality (of the answer selected at the stopping state) and the expected cost
(true costs of the models run) are differentiable functions of λ. As τ → 0 the softmax becomes the
argmax and both converge to the exact policy (without ties). Approximation for large pools: state
branches whose probability for a query falls below ``min_mass`` stop there (their mass is kept, it
stops early), so the number of states visited stays bounded.

Tuning (:func:`tune_step_lambdas`): λ_t = exp(θ_t), Adam on θ for the Lagrangian
``−Q + μ (C/B − 1)`` with dual ascent on μ >= 0 and τ annealed geometrically; the result is used as a
λ *shape* and refitted exactly (bisection on its scale + γ mix) by
:func:`cascade_routing.policies.fitting.fit_lambda`. :func:`random_search_step_lambdas` is the
derivative-free comparison with the same number of policy evaluations (one relaxed forward+backward
pass = one exact simulation = one evaluation).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from cascade_routing.policies.base import PolicyError
from cascade_routing.policies.fitting import FittedLambda, fit_lambda
from cascade_routing.policies.rollout import simulate


def _ran_of(state: int, k: int, m: int) -> Tensor:
    """bool [k, m]: ``k`` rows whose ran-set is the bitmask ``state`` (bit j: model j ran)."""
    ran = torch.zeros(k, m, dtype=torch.bool)
    for j in range(m):
        if state >> j & 1:
            ran[:, j] = True
    return ran


def _answer_quality(policy, estimate, ran: Tensor, y: Tensor, idx: Tensor) -> Tensor:
    """Realised quality [k] of the answer ``policy.select`` returns for rows ``idx`` (0 where none ran)."""
    answer = policy.select(estimate, ran)
    return y[idx, answer.clamp_min(0)] * (answer >= 0)


def _advance_state(policy, quality_estimator, cost_estimator, y: Tensor, c: Tensor, rows: Tensor, state: int,
                   p: Tensor, alive: Tensor, lam_t: Tensor, tau: float, last: bool, cache: dict,
                   new: dict[int, Tensor], exp_q: Tensor, exp_c: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the queries ``alive`` in ran-state ``state`` with probability ``p`` [N]: the mass
    that stops adds its answer's quality to ``exp_q``; the mass that runs model a adds a's true cost
    to ``exp_c`` and moves to state ``state | 2^a`` in ``new``. At the ``last`` step all of it stops."""
    m = y.shape[1]
    ran = _ran_of(state, alive.numel(), m)
    est = quality_estimator.estimate(rows[alive], ran)
    q_ans = _answer_quality(policy, est, ran, y, alive)
    pa = p[alive]
    if last:
        return exp_q + (pa * q_ans).sum(), exp_c
    c_est = cost_estimator.estimate(rows[alive], ran).to(torch.float64)
    key = ("relax", state)
    if key not in cache:
        cache[key] = {}
    emax, added, action = policy.candidates(est, c_est.to(est.mean.dtype), state, cache=cache[key],
                                            rows=rows[alive])
    values = emax.to(torch.float64) - lam_t * added.to(torch.float64)
    probs = torch.softmax(values / tau, dim=1)
    act = torch.zeros(alive.numel(), m + 1, dtype=torch.float64).scatter_add(1, action + 1, probs)
    exp_q = exp_q + (pa * act[:, 0] * q_ans).sum()
    for a in range(m):
        pr = act[:, a + 1]
        if not bool((pr.detach() > 0).any()):
            continue
        move = pa * pr
        exp_c = exp_c + (move * c[alive, a]).sum()
        nxt = state | (1 << a)
        full = torch.zeros(y.shape[0], dtype=torch.float64).index_add(0, alive, move)
        new[nxt] = new[nxt] + full if nxt in new else full
    return exp_q, exp_c


def relaxed_quality_cost(policy, quality_estimator, cost_estimator, quality, cost, lam: Tensor, tau: float,
                         rows: Tensor | None = None, cache: dict | None = None, min_mass: float = 1e-6
                         ) -> tuple[Tensor, Tensor]:
    """(expected mean quality, expected mean cost), differentiable in ``lam`` [T] (step t uses lam[min(t, T-1)])."""
    if tau <= 0:
        raise PolicyError(f"temperature τ must be > 0, got {tau}")
    y = torch.as_tensor(np.asarray(quality), dtype=torch.float64)
    c = torch.as_tensor(np.asarray(cost), dtype=torch.float64)
    n, m = y.shape
    rows = torch.arange(n) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    lam = lam.reshape(-1)
    if cache is None:
        cache = {}
    states: dict[int, Tensor] = {0: torch.ones(n, dtype=torch.float64)}
    exp_q = torch.zeros((), dtype=torch.float64)
    exp_c = torch.zeros((), dtype=torch.float64)
    steps = policy.max_steps(m)
    for step in range(steps + 1):
        new: dict[int, Tensor] = {}
        lam_t = lam[min(step, lam.numel() - 1)]
        for state, p in states.items():
            alive = (p.detach() > min_mass).nonzero().squeeze(1)
            if alive.numel() > 0:
                exp_q, exp_c = _advance_state(policy, quality_estimator, cost_estimator, y, c, rows, state, p, alive,
                                              lam_t, tau, step == steps, cache, new, exp_q, exp_c)
        # mass below min_mass stops where it is
        for state, p in states.items():
            small = (p.detach() <= min_mass) & (p.detach() > 0)
            if bool(small.any()) and state:
                idx = small.nonzero().squeeze(1)
                ran = _ran_of(state, idx.numel(), m)
                q_ans = _answer_quality(policy, quality_estimator.estimate(rows[idx], ran), ran, y, idx)
                exp_q = exp_q + (p[idx] * q_ans).sum()
        states = new
        if not states:
            break
    return exp_q / n, exp_c / n


def _exact(policy, qe, ce, quality, cost, lam, rows, uniforms, cache):
    return simulate(policy, qe, ce, quality, cost, lam, uniforms, rows, cache)


def _constant_start(policy, quality_estimator, cost_estimator, quality, cost, budget: float, uniforms, rows,
                    cache: dict, init: FittedLambda | None) -> FittedLambda:
    """The constant-λ fit a per-step search starts from: ``init``, refused if it carries a guard's depth
    or model limit (that fit is not the whole policy at one λ), or one fitted here with one constant λ
    (an explicit shape: no λ shape candidates, no guards)."""
    if init is None:
        return fit_lambda(policy, quality_estimator, cost_estimator, quality, cost, budget, uniforms=uniforms,
                          rows=rows, shape=torch.ones(1, dtype=torch.float64), cache=cache)
    if init.max_depth is not None or init.models is not None or init.cascade:
        raise PolicyError(f"a per-step λ search starts from a constant-λ fit of the whole policy; init is a "
                          f"guard's fit (max_depth={init.max_depth}, models={init.models}, cascade={init.cascade}): "
                          "fit it with make_policy(..., step_ratios=None, routing_guard=False)")
    return init


def tune_step_lambdas(policy, quality_estimator, cost_estimator, quality, cost, budget: float, evaluations: int = 40,
                      rows: Tensor | None = None, uniforms: Tensor | None = None, tau_start: float = 0.05,
                      tau_end: float = 1e-3, lr: float = 0.1, init: FittedLambda | None = None,
                      min_mass: float = 1e-4) -> tuple[FittedLambda, dict]:
    """Per-step λ by gradient through the relaxation (module docstring); returns the exactly refitted
    FittedLambda and a log. ``init``: a constant-λ fit to start from (default: fitted here)."""
    steps = policy.max_steps(np.asarray(quality).shape[1])
    cache: dict = {}
    init = _constant_start(policy, quality_estimator, cost_estimator, quality, cost, budget, uniforms, rows, cache,
                           init)
    lam0 = max(float(init.lam_high.mean()), 1e-6)
    theta = torch.full((steps,), math.log(lam0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    mu = 1.0
    log = []
    for i in range(evaluations):
        tau = tau_start * (tau_end / tau_start) ** (i / max(1, evaluations - 1))
        q, c = relaxed_quality_cost(policy, quality_estimator, cost_estimator, quality, cost, theta.exp(), tau,
                                    rows, cache, min_mass)
        viol = c / budget - 1
        loss = -q + mu * viol
        opt.zero_grad()
        loss.backward()
        opt.step()
        mu = max(0.0, mu + 0.5 * float(viol.detach()))
        log.append({"tau": tau, "quality": float(q.detach()), "cost": float(c.detach()), "mu": mu})
    shape = theta.detach().exp()
    fitted = fit_lambda(policy, quality_estimator, cost_estimator, quality, cost, budget, uniforms=uniforms,
                        rows=rows, shape=shape / shape.max(), cache=cache)
    return fitted, {"log": log, "shape": shape.tolist()}


def random_search_step_lambdas(policy, quality_estimator, cost_estimator, quality, cost, budget: float,
                               evaluations: int = 40, rows: Tensor | None = None, uniforms: Tensor | None = None,
                               sigma: float = 0.5, seed: int = 0, init: FittedLambda | None = None
                               ) -> tuple[FittedLambda, dict]:
    """Derivative-free baseline: log-normal perturbations of the constant λ, one exact simulation each;
    keep the best quality with cost <= budget; refit exactly like :func:`tune_step_lambdas`."""
    steps = policy.max_steps(np.asarray(quality).shape[1])
    cache: dict = {}
    init = _constant_start(policy, quality_estimator, cost_estimator, quality, cost, budget, uniforms, rows, cache,
                           init)
    gen = torch.Generator().manual_seed(seed)
    base = torch.full((steps,), max(float(init.lam_high.mean()), 1e-6), dtype=torch.float64)
    best_shape, best_q = base, -math.inf
    for _ in range(evaluations):
        cand = base * torch.exp(sigma * torch.randn(steps, generator=gen, dtype=torch.float64))
        res = _exact(policy, quality_estimator, cost_estimator, quality, cost, cand, rows, uniforms, cache)
        if res.mean_cost <= budget and res.mean_quality > best_q:
            best_shape, best_q = cand, res.mean_quality
    fitted = fit_lambda(policy, quality_estimator, cost_estimator, quality, cost, budget, uniforms=uniforms,
                        rows=rows, shape=best_shape / best_shape.max(), cache=cache)
    return fitted, {"shape": best_shape.tolist(), "best_quality": best_q}
