"""Cascade routing (Dekoninck, Baader, Vechev, ICML 2025), batched over queries.

At every step, for a query whose models ``ran`` have run, consider every supermodel S ⊇ ran with
``|S| <= max_depth`` and score it

    value(S) = E[max_{m in S} q_m] - λ · Σ_{m in S \\ ran} c_m

(the costs of models that already ran are sunk and the same for every S, so they are left out).
Let S* be the best supermodel (ties within ``tie_tol``: the one adding the least cost, then the
lowest table row). If S* = ran the query stops (-1); otherwise the next model to run is the
cheapest (by estimated cost; lowest index on ties) member of S* \\ ran, or the lowest-index one with
``force_order=True`` (where S may only add models ranked after every model that ran).
With nothing run yet the empty supermodel is not allowed: some model is always run.

``greedy=True`` looks one step ahead only: S ∈ {ran} ∪ {ran ∪ {m}}.

``pool`` (model indices, fitted on calibration rows as the non-dominated models): S may only add pool
models, or a model that no pool model dominates for this query under its current estimate
(:meth:`CascadeRouting.allowed`). ``routing_guard=True``: λ fitting also fits this policy limited to
depth 1 (which is routing), the best single model the budget affords, and the optimal cascade over
the pool (:meth:`CascadeRouting.cascade_policy`), and keeps one for a budget only when it beats the
default on the calibration rows by more than its noise
(:func:`~cascade_routing.policies.fitting.choose_significant`); the chosen fit carries ``max_depth=1``
(and ``models``, the single model) or ``cascade=True`` (:meth:`CascadeRouting.for_fit` then runs the
cascade).

``lambda_shapes``: candidate per-step λ shapes; :func:`~cascade_routing.policies.fitting.fit_lambda`
keeps the one with the best calibration quality at each budget (the decision rule above is
unchanged; it is simply handed λ_t of step t).

Pruning lemma (``prune=True``): E[max] is submodular (per draw, max is), so if adding a member m to
S \\ {m} gains less than λ c_m, then S is strictly worse than S \\ {m}, and so is every superset of S
containing m. With ``prune=True`` such supermodels and all their extensions are never sampled
(:func:`~cascade_routing.policies.supermodels.expected_max_pruned`); the decision provably does not
change (a pruned S is below one of its own subsets by more than ``tie_tol``). Measured on 2 CPU
cores it saves time only when most supermodels are pruned (large λ): the compacted gathers cost more
than the dense level-by-level maxima otherwise, so the default is ``prune=False``; the memo used
while fitting λ is only available without pruning, whose tables depend on λ.

λ fitting decides the same (ran-state, query) pairs at many λ. With a memo (``cache``, ``rows``)
each pair's E[max] table is searched once for the supermodels it can ever pick at any λ (its
cost–E[max] staircase, with the pool and order constraints applied; see
:mod:`cascade_routing.policies.frontier`), and every later decision chooses among those few rows:
the same decision as the full search, for every λ.

Queries sharing a ran-state are processed together: the samples of the not-yet-run candidate models
are gathered, the sample max over the ran models is the base, and E[max] of every candidate subset is
built level by level (see :mod:`cascade_routing.policies.supermodels`), chunked over queries so the
working memory stays under ``chunk_bytes``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from cascade_routing.interfaces import QualityEstimate, bitmask
from cascade_routing.policies.base import Policy, PolicyError, check_inputs, checked_lambda_shapes, checked_max_depth
from cascade_routing.policies import emax_numba
from cascade_routing.policies.frontier import cached_pairs, staircase
from cascade_routing.policies.cascades import OptimalCascade
from cascade_routing.policies.pool import PooledPolicy, check_pool_fits, checked_pool, reindex_pool
from cascade_routing.policies.supermodels import (
    MAX_EXHAUSTIVE_SUPERMODELS,
    count_supermodels,
    expected_max_pruned,
    members_as,
    expected_max_table,
    normal_draws,
    quality_samples,
    subset_table,
    use_fused_kernel,
)


class CascadeRouting(Policy):
    """Cascade routing over supermodels; see the module docstring for the decision rule."""

    name = "cascade_routing"

    def __init__(
        self,
        max_depth: int | None = None,
        force_order: bool = False,
        greedy: bool = False,
        num_samples: int = 128,
        seed: int = 0,
        prune: bool = False,
        tie_tol: float = 1e-6,
        chunk_bytes: int = 2**25,
        max_supermodels: int = MAX_EXHAUSTIVE_SUPERMODELS,
        lambda_shapes: tuple[tuple[float, ...], ...] | None = None,
        pool: tuple[int, ...] | None = None,
        routing_guard: bool = False,
    ) -> None:
        self.max_depth = checked_max_depth(max_depth)
        self.lambda_shapes = checked_lambda_shapes(lambda_shapes)
        self.pool = None if pool is None else checked_pool(pool)
        self.routing_guard = routing_guard
        self.force_order = force_order
        self.greedy = greedy
        self.num_samples = num_samples
        self.seed = seed
        self.prune = prune
        self.tie_tol = tie_tol
        self.chunk_bytes = chunk_bytes
        self.max_supermodels = max_supermodels

    def __repr__(self) -> str:
        return (f"CascadeRouting(max_depth={self.max_depth}, force_order={self.force_order}, "
                f"greedy={self.greedy}, num_samples={self.num_samples}, seed={self.seed}, prune={self.prune}"
                + (f", lambda_shapes={self.lambda_shapes}" if self.lambda_shapes else "")
                + (f", pool={list(self.pool)}" if self.pool is not None else "")
                + (", routing_guard=True" if self.routing_guard else "") + ")")

    def check_pool(self, num_models: int) -> None:
        """Raise if exhaustive search over the pool is too large (no max_depth, no greedy)."""
        if self.max_depth is None and not self.greedy:
            total = count_supermodels(num_models)
            if total > self.max_supermodels:
                depth = 1
                while count_supermodels(num_models, depth + 1) <= self.max_supermodels:
                    depth += 1
                raise PolicyError(
                    f"pool of {num_models} models has {total} supermodels, more than the {self.max_supermodels} "
                    f"allowed for exhaustive search; pass max_depth (e.g. max_depth={depth}: "
                    f"{count_supermodels(num_models, depth)} supermodels) or greedy=True (one-step look-ahead)"
                )

    # ------------------------------------------------------------------ decision
    def decide(
        self,
        estimate: QualityEstimate,
        cost: Tensor,
        ran: Tensor,
        lam: Tensor | float,
        cache: dict | None = None,
        rows: Tensor | None = None,
        max_depth: int | None = None,
    ) -> Tensor:
        """Next model per query (-1 = stop). ``cache``/``rows``: optional memo of each (ran-state, row)
        pair's staircase (module docstring), valid only while the estimators are deterministic in
        (row, ran) and for this policy; ``rows`` are the queries' row ids in the estimator's table.
        ``max_depth``: a tighter depth limit for this call (a fitted λ may carry one: depth 1 is
        routing, see :class:`FittedLambda`)."""
        lam = check_inputs(estimate, cost, ran, lam)
        b, m = estimate.mean.shape
        self.check_pool(m)
        depth = self.max_steps(m) if max_depth is None else min(self.max_steps(m), int(max_depth))
        out = torch.full((b,), -1, dtype=torch.long, device=cost.device)
        if b == 0:
            return out
        steps = ran.sum(1)
        active = steps < depth
        memo = cache is not None and rows is not None and not self.prune
        allowed = None if memo else self.allowed(estimate, cost, ran)
        for t in torch.unique(steps[active]).tolist():
            idx = torch.nonzero(active & (steps == t)).squeeze(1)
            if memo:  # λ fitting: choose among each pair's staircase, found once per (state, row)
                stairs = self._cached_staircase(estimate, cost, ran, idx, t, cache, rows, depth)
                if stairs is not None:
                    emax, added, action = stairs
                    out[idx] = action.gather(1, self._best(emax, added, lam[idx], None)[:, None]).squeeze(1)
                continue
            group = self._group(estimate, cost, ran, idx, t, None, None, lam[idx] if self.prune else None, depth)
            if group is None:
                continue
            emax, added, invalid, free_idx, table = group
            invalid = self._with_barred(invalid, allowed, idx, free_idx, table, cost.dtype)
            best = self._best(emax, added, lam[idx], invalid)
            out[idx] = self._next_model(table.members[best], cost[idx].gather(1, free_idx), free_idx)
        return out

    def _with_barred(self, invalid: Tensor | None, allowed: Tensor | None, idx: Tensor, free_idx: Tensor, table,
                     dtype: torch.dtype) -> Tensor | None:
        """``invalid`` [b, S] also marking the supermodels that add a model ``allowed`` [B, M] bars."""
        if allowed is None:
            return invalid
        barred = (~allowed[idx].gather(1, free_idx)).to(dtype)
        blocked = (barred @ members_as(table, dtype).T) > 0
        return blocked if invalid is None else invalid | blocked

    def _cached_staircase(self, estimate: QualityEstimate, cost: Tensor, ran: Tensor, idx: Tensor, t: int,
                          cache: dict, rows: Tensor, depth: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """(emax, added cost, action) [b, w] of the supermodels rows ``idx`` (all ran ``t`` models) can
        ever pick (:func:`~cascade_routing.policies.frontier.staircase`; action = the model run next,
        -1 = stop; padding: emax -inf), memoised per (ran-state, row) in ``cache``; None if no row can
        run another model. The memo's key holds what the staircase depends on besides the pair: the
        table (width), the pool and the order constraint."""
        table = self._table(ran.shape[1], t, depth, cost.device)
        if table is None:
            return None
        slot = ("staircase", table.members.shape[0], self.pool, self.force_order)
        return cached_pairs(cache, slot, bitmask(ran[idx]), rows[idx],
                            lambda sel: self._staircase_rows(estimate, cost, ran, idx[sel], t, depth),
                            pads=(-math.inf, 0.0, -1))

    def _staircase_rows(self, estimate: QualityEstimate, cost: Tensor, ran: Tensor, idx: Tensor, t: int,
                        depth: int) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_cached_staircase` computed for rows ``idx``."""
        emax, added, invalid, free_idx, table = self._group(estimate, cost, ran, idx, t, None, None, None, depth)
        allowed = self.allowed(estimate.take(rows=idx), cost[idx], ran[idx])
        invalid = self._with_barred(invalid, allowed, torch.arange(idx.numel(), device=idx.device), free_idx, table,
                                    cost.dtype)
        picks, present = staircase(emax, added, invalid)
        key = free_idx.to(cost.dtype) if self.force_order else cost[idx].gather(1, free_idx)
        action = _first_member(table.members[picks], key, free_idx).masked_fill(~present, -1)
        return (emax.gather(1, picks).masked_fill(~present, -math.inf),
                added.gather(1, picks).masked_fill(~present, 0.0), action)

    def _best(self, emax: Tensor, added: Tensor, lam: Tensor, invalid: Tensor | None) -> Tensor:
        """Row of S* per query: among ``values = emax − λ·added`` (-inf where invalid) within ``tie_tol``
        of the best, the least added cost, then the lowest row. One fused pass on CPU (numba)."""
        if use_fused_kernel(emax) and added.dtype == emax.dtype:
            inv = None if invalid is None else invalid.contiguous().numpy()
            best = emax_numba.choose(emax.contiguous().numpy(), added.contiguous().numpy(),
                                     lam.to(emax.dtype).contiguous().numpy(), inv, self.tie_tol)
            return torch.from_numpy(best)
        values = emax - lam[:, None] * added
        if invalid is not None:
            values = values.masked_fill(invalid, -math.inf)
        best_val = values.amax(1, keepdim=True)
        near = values >= best_val - self.tie_tol
        return torch.where(near, added, torch.full_like(added, math.inf)).argmin(1)  # least added cost

    def cascade_policy(self) -> Policy:
        """The optimal cascade this policy contains: over its pool in model-index order (every model
        without a pool), with the same E[max] draws; the cascade guard's candidate."""
        cascade = OptimalCascade(num_samples=self.num_samples, seed=self.seed, tie_tol=self.tie_tol)
        return cascade if self.pool is None else PooledPolicy(cascade, self.pool)

    def for_fit(self, fitted) -> Policy:
        """:meth:`cascade_policy` for a fit the cascade guard chose (``FittedLambda.cascade``), else this policy."""
        return self.cascade_policy() if getattr(fitted, "cascade", False) else self

    def on_columns(self, cols: list[int]) -> "CascadeRouting":
        """This policy for a call that passes only the model columns ``cols`` (e.g. a server dropping
        failed backends): the pool re-indexed to those columns (no pool if none of it is left)."""
        if self.pool is None:
            return self
        pool = reindex_pool(self.pool, cols)
        clone = copy.copy(self)
        clone.pool = pool or None
        return clone

    def allowed(self, estimate: QualityEstimate, cost: Tensor, ran: Tensor) -> Tensor | None:
        """bool [B, M]: models this query may add, or None (no pool: every model).

        A pool model, or a model that no pool model dominates *for this query* under the current
        estimate (another pool model with estimated cost <= and mean >=). Routing's argmax is never
        such a dominated model, so with ``max_depth=1`` the pool changes no decision of routing.
        """
        if self.pool is None:
            return None
        b, m = cost.shape
        check_pool_fits(self.pool, m)
        in_pool = torch.zeros(m, dtype=torch.bool, device=cost.device)
        in_pool[list(self.pool)] = True
        mean = estimate.mean
        # dominated[b, j]: some pool model p != j has cost_p <= cost_j and mean_p >= mean_j
        cheaper = cost[:, :, None] <= cost[:, None, :]  # [B, p, j]
        better = mean[:, :, None] >= mean[:, None, :]
        others = ~torch.eye(m, dtype=torch.bool, device=cost.device)
        dominated = (cheaper & better & others & in_pool[None, :, None]).any(1)
        return in_pool[None, :] | ~dominated

    def _next_model(self, chosen: Tensor, cost_free: Tensor, free_idx: Tensor) -> Tensor:
        """The model run next for chosen subsets (bool [b, n] over the free slots); -1 if empty."""
        key = free_idx.to(cost_free.dtype) if self.force_order else cost_free
        return _first_member(chosen[:, None, :], key, free_idx).squeeze(1)

    def _group(self, estimate, cost, ran, idx, t, cache, rows, prune_lam: Tensor | None = None,
               depth: int | None = None):
        """For rows ``idx`` that all ran ``t`` models: (emax [b, S], added cost [b, S], invalid [b, S] or None,
        free_idx [b, n], table) over the subsets of each row's not-yet-run models (in index order),
        or None if no row can run another model. ``prune_lam`` [b]: skip extensions by the pruning
        lemma at these λ (pruned subsets get emax -inf; the cache is not used since pruning depends on λ)."""
        b_all, m = ran.shape
        table = self._table(m, t, self.max_steps(m) if depth is None else depth, cost.device)
        if table is None:
            return None
        n = m - t
        dev = cost.device
        order = torch.argsort(ran[idx].to(torch.int8), dim=1, stable=True)  # free models first, by index
        free_idx, ran_idx = order[:, :n], order[:, n:]
        members_f = members_as(table, cost.dtype)
        z = normal_draws(self.num_samples, m, self.seed, dev, estimate.mean.dtype)
        if prune_lam is not None:
            cost_free = cost[idx].gather(1, free_idx)
            emax = self._emax(estimate, idx, free_idx, ran_idx, table, z, (cost_free, prune_lam))
        elif cache is not None and rows is not None:
            states = bitmask(ran[idx])
            # keyed by the table width too: a depth-limited call (FittedLambda.max_depth) has other tables
            emax = _cached_emax(cache, table.members.shape[0], states, rows[idx], lambda sel: self._emax(
                estimate, idx[sel], free_idx[sel], ran_idx[sel], table, z))
        else:
            emax = self._emax(estimate, idx, free_idx, ran_idx, table, z)
        added = cost[idx].gather(1, free_idx) @ members_f.T
        if self.force_order and t > 0:
            bad_slot = free_idx < ran_idx.amax(1, keepdim=True)
            invalid = (bad_slot.to(cost.dtype) @ members_f.T) > 0
        else:
            invalid = None  # every supermodel is allowed
        return emax, added, invalid, free_idx, table

    def _table(self, m: int, t: int, depth: int, device):
        """The subset table of a query that ran ``t`` of ``m`` models (None: it may run no other)."""
        n, r = m - t, depth - t
        if self.greedy:
            r = min(r, 1)
        return subset_table(n, r, device) if n > 0 and r > 0 else None

    def _emax(self, estimate: QualityEstimate, idx: Tensor, free_idx: Tensor, ran_idx: Tensor, table,
              z: Tensor, prune: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """E[max] [len(idx), S] of ran ∪ s for every subset s of each row's free models, chunked."""
        fused = prune is None and use_fused_kernel(estimate.mean)
        if fused:  # the kernel keeps one level per row in its own scratch: only the samples are held
            per_row = max(1, (table.n + 1) * z.shape[0] * estimate.mean.element_size())
        else:
            widest = max(stop - start for start, stop in table.levels)
            per_row = max(1, widest * z.shape[0] * estimate.mean.element_size() * 3)
        # pruned search keeps only surviving subsets: bigger chunks, fewer ops (worst case still bounded x4)
        chunk = max(1, (self.chunk_bytes * (4 if prune is not None else 1)) // per_row)
        zt = z.T  # [M, K]
        has_base = ran_idx.shape[1] > 0
        parts = []
        for lo in range(0, len(idx), chunk):
            sub = idx[lo:lo + chunk]
            f_idx, r_idx = free_idx[lo:lo + chunk], ran_idx[lo:lo + chunk]
            mean = estimate.mean[sub]
            if fused and estimate.cov is None:
                std = estimate.std[sub] if estimate.std is not None else torch.zeros_like(mean)
                xf_np, base_np = emax_numba.independent_samples(
                    mean.numpy(), std.numpy(), f_idx.contiguous().numpy(), r_idx.contiguous().numpy(),
                    zt.contiguous().numpy())
                xf = torch.from_numpy(xf_np)
                base = None if base_np is None else torch.from_numpy(base_np)
            elif estimate.cov is None:
                # independent beliefs: sample only the needed columns, each row its own columns
                std = estimate.std[sub] if estimate.std is not None else torch.zeros_like(mean)
                xf = mean.gather(1, f_idx)[:, :, None] + std.gather(1, f_idx)[:, :, None] * zt[f_idx]
                base = None
                if has_base:
                    xr = mean.gather(1, r_idx)[:, :, None] + std.gather(1, r_idx)[:, :, None] * zt[r_idx]
                    base = xr.amax(1)
            else:
                x = quality_samples(mean, z, None, estimate.cov[sub])  # [c, M, K]
                k = x.shape[2]
                xf = x.gather(1, f_idx[:, :, None].expand(-1, -1, k))
                base = x.gather(1, r_idx[:, :, None].expand(-1, -1, k)).amax(1) if has_base else None
            if prune is None:
                parts.append(expected_max_table(xf.contiguous(), base, table))
            else:
                parts.append(expected_max_pruned(xf.contiguous(), base, table, prune[0][lo:lo + chunk],
                                                 prune[1][lo:lo + chunk], self.tie_tol))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def candidates(self, estimate: QualityEstimate, cost: Tensor, state: int, cache: dict | None = None,
                   rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """For queries all in ran-state ``state``: (emax [b, C], added cost [b, C], action long [b, C]) of
        every candidate supermodel; action = the model run next if it is chosen (-1 = stop); not
        allowed candidates have emax -inf. Used by the smooth relaxation (no λ here)."""
        b, m = estimate.mean.shape
        dev = cost.device
        ran = torch.zeros(b, m, dtype=torch.bool, device=dev)
        for j in range(m):
            if state >> j & 1:
                ran[:, j] = True
        t = bin(state).count("1")
        idx = torch.arange(b, device=dev)
        group = self._group(estimate, cost, ran, idx, t, cache, rows) if t < self.max_steps(m) else None
        if group is None:
            zero = torch.zeros(b, 1, dtype=estimate.mean.dtype, device=dev)
            return zero, zero.clone(), torch.full((b, 1), -1, dtype=torch.long, device=dev)
        emax, added, invalid, free_idx, table = group
        if invalid is not None:
            emax = emax.masked_fill(invalid, -math.inf)
        s = table.members.shape[0]
        chosen = table.members[None].expand(b, s, -1)
        cost_free = cost.gather(1, free_idx)
        key = free_idx.to(cost.dtype) if self.force_order else cost_free
        action = _first_member(chosen, key, free_idx)
        return emax, added, action

    def _pruned(self, emax: Tensor, cost_free: Tensor, lam: Tensor, table) -> Tensor:
        """bool [b, S]: supermodels with a member whose marginal gain is below λ·cost by > tie_tol."""
        minus = table.minus  # [S, n]
        parent_val = emax[:, minus.clamp_min(0)]  # [b, S, n]
        gain = emax[:, :, None] - parent_val
        margin = gain - lam[:, None, None] * cost_free[:, None, :]
        bad = (margin < -self.tie_tol) & table.members[None]
        return bad.any(2)


def _cached_emax(cache: dict, width: int, states: Tensor, row_ids: Tensor, compute, kind: str = "emax") -> Tensor:
    """E[max] rows [B, width] of (ran-state, row) pairs from ``cache`` under ``(kind, width)``, computing
    (in one call, once per distinct pair) only the pairs not yet stored
    (:func:`~cascade_routing.policies.frontier.cached_pairs`)."""
    return cached_pairs(cache, (kind, width), states, row_ids, lambda sel: (compute(sel),), pads=(math.nan,))[0]


def _first_member(chosen: Tensor, key: Tensor, free_idx: Tensor) -> Tensor:
    """long [b, s]: for chosen subsets ``chosen`` bool [b, s, n] over the free slots, the model run next:
    the member with the least ``key`` [b, n] (cost, or index with ``force_order``), lowest slot on
    ties; -1 for an empty subset (stop)."""
    slot = torch.where(chosen, key[:, None, :], torch.full_like(key[:, None, :], math.inf)).argmin(2)
    nxt = free_idx.gather(1, slot)
    return torch.where(chosen.any(2), nxt, torch.full_like(nxt, -1))
