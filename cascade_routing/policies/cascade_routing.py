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

Pruning lemma (``prune=True``): E[max] is submodular (per draw, max is), so if adding a member m to
S \\ {m} gains less than λ c_m, then S is strictly worse than S \\ {m}, and so is every superset of S
containing m. Pruned supermodels are masked out; the decision provably does not change (a pruned S
is below the best value by more than ``tie_tol``).

Queries sharing a ran-state are processed together: the samples of the not-yet-run candidate models
are gathered, the sample max over the ran models is the base, and E[max] of every candidate subset is
built level by level (see :mod:`cascade_routing.policies.supermodels`), chunked over queries so the
working memory stays under ``chunk_bytes``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cascade_routing.estimators.base import QualityEstimate
from cascade_routing.policies.base import Policy, PolicyError, check_inputs
from cascade_routing.policies.supermodels import (
    MAX_EXHAUSTIVE_SUPERMODELS,
    count_supermodels,
    expected_max_table,
    normal_draws,
    quality_samples,
    subset_table,
)


def ran_states(ran: Tensor) -> Tensor:
    """Bitmask (int64) of each row's ran set: bit m set iff model m ran."""
    weights = 2 ** torch.arange(ran.shape[1], device=ran.device, dtype=torch.long)
    return (ran.long() * weights).sum(1)


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
        chunk_bytes: int = 2**28,
        max_supermodels: int = MAX_EXHAUSTIVE_SUPERMODELS,
    ) -> None:
        if max_depth is not None and max_depth < 1:
            raise PolicyError(f"max_depth must be >= 1, got {max_depth}")
        self.max_depth = max_depth
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
                f"greedy={self.greedy}, num_samples={self.num_samples}, seed={self.seed}, prune={self.prune})")

    def max_steps(self, num_models: int) -> int:
        return num_models if self.max_depth is None else min(self.max_depth, num_models)

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
    ) -> Tensor:
        """Next model per query (-1 = stop). ``cache``/``rows``: optional memo of E[max] tables keyed by
        ran-state, valid only while the estimator is deterministic in (row, ran); ``rows`` are the
        queries' row ids in the estimator's table (used as cache keys)."""
        lam = check_inputs(estimate, cost, ran, lam)
        b, m = estimate.mean.shape
        self.check_pool(m)
        depth = self.max_steps(m)
        out = torch.full((b,), -1, dtype=torch.long, device=cost.device)
        if b == 0:
            return out
        states = ran_states(ran)
        steps = ran.sum(1)
        active = steps < depth
        if not bool(active.any()):
            return out
        uniq = torch.unique(states[active])
        z = None
        for state in uniq.tolist():
            idx = torch.nonzero(active & (states == state)).squeeze(1)
            ran_models = [j for j in range(m) if state >> j & 1]
            free = [j for j in range(m) if not state >> j & 1]
            if self.force_order and ran_models:
                free = [j for j in free if j > max(ran_models)]
            r = depth - len(ran_models)
            if self.greedy:
                r = min(r, 1)
            if not free or r <= 0:
                continue
            if z is None:
                z = normal_draws(self.num_samples, m, self.seed, cost.device, estimate.mean.dtype)
            out[idx] = self._decide_state(estimate, cost, lam, idx, ran_models, free, r, z, state, cache, rows)
        return out

    def _emax(self, estimate: QualityEstimate, idx: Tensor, ran_models: list[int], free: list[int],
              table, z: Tensor) -> Tensor:
        """E[max] [len(idx), S] of ran ∪ s for every subset s of ``free`` in ``table``, chunked."""
        dev = estimate.mean.device
        free_t = torch.tensor(free, dtype=torch.long, device=dev)
        ran_t = torch.tensor(ran_models, dtype=torch.long, device=dev)
        widest = max(stop - start for start, stop in table.levels)
        per_row = max(1, widest * z.shape[0] * estimate.mean.element_size() * 3)
        chunk = max(1, self.chunk_bytes // per_row)
        parts = []
        for lo in range(0, len(idx), chunk):
            sub = idx[lo:lo + chunk]
            mean = estimate.mean[sub]
            std = None if estimate.std is None else estimate.std[sub]
            cov = None if estimate.cov is None else estimate.cov[sub]
            if cov is None:
                # independent beliefs: only the needed columns are sampled
                cols = torch.cat([ran_t, free_t])
                x = quality_samples(mean[:, cols], z[:, cols], None if std is None else std[:, cols])
                base = x[:, : len(ran_models)].amax(1) if ran_models else None
                xf = x[:, len(ran_models):]
            else:
                x = quality_samples(mean, z, std, cov)
                base = x.index_select(1, ran_t).amax(1) if ran_models else None
                xf = x.index_select(1, free_t)
            parts.append(expected_max_table(xf.contiguous(), base, table))
        return torch.cat(parts, 0)

    def _decide_state(self, estimate, cost, lam, idx, ran_models, free, r, z, state, cache, rows) -> Tensor:
        dev = cost.device
        table = subset_table(len(free), r, dev)
        if cache is not None and rows is not None:
            emax = _cached_emax(self, cache, state, rows[idx], lambda sel: self._emax(
                estimate, idx[sel], ran_models, free, table, z))
        else:
            emax = self._emax(estimate, idx, ran_models, free, table, z)
        free_t = torch.tensor(free, dtype=torch.long, device=dev)
        cost_free = cost[idx][:, free_t]  # [b, n]
        members = table.members.to(cost_free.dtype)  # [S, n]
        added = cost_free @ members.T  # [b, S]
        values = emax - lam[idx, None] * added
        if self.prune:
            values = values.masked_fill(self._pruned(emax, cost_free, lam[idx], table), -math.inf)
        best_val = values.amax(1, keepdim=True)
        near = values >= best_val - self.tie_tol
        best = torch.where(near, added, torch.full_like(added, math.inf)).argmin(1)  # least added cost
        chosen = table.members[best]  # [b, n]
        if self.force_order:
            key = torch.arange(len(free), device=dev, dtype=cost_free.dtype).expand_as(cost_free)
        else:
            key = cost_free
        slot = torch.where(chosen, key, torch.full_like(key, math.inf)).argmin(1)
        return torch.where(chosen.any(1), free_t[slot], torch.full_like(slot, -1))

    def candidates(self, estimate: QualityEstimate, cost: Tensor, state: int, cache: dict | None = None,
                   rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """For queries all in ran-state ``state``: (emax [b, C], added cost [b, C], action long [b, C]) of
        every candidate supermodel; action = the model run next if it is chosen (-1 = stop); not
        allowed candidates have emax -inf. Used by the smooth relaxation (no λ here)."""
        b, m = estimate.mean.shape
        dev = cost.device
        depth = self.max_steps(m)
        ran_models = [j for j in range(m) if state >> j & 1]
        free = [j for j in range(m) if not state >> j & 1]
        if self.force_order and ran_models:
            free = [j for j in free if j > max(ran_models)]
        r = depth - len(ran_models)
        if self.greedy:
            r = min(r, 1)
        if not free or r <= 0:
            zero = torch.zeros(b, 1, dtype=estimate.mean.dtype, device=dev)
            return zero, zero.clone(), torch.full((b, 1), -1, dtype=torch.long, device=dev)
        z = normal_draws(self.num_samples, m, self.seed, dev, estimate.mean.dtype)
        table = subset_table(len(free), r, dev)
        idx = torch.arange(b, device=dev)
        if cache is not None and rows is not None:
            emax = _cached_emax(self, cache, state, rows, lambda sel: self._emax(
                estimate, idx[sel], ran_models, free, table, z))
        else:
            emax = self._emax(estimate, idx, ran_models, free, table, z)
        free_t = torch.tensor(free, dtype=torch.long, device=dev)
        cost_free = cost[:, free_t]
        added = cost_free @ table.members.to(cost_free.dtype).T
        key = (torch.arange(len(free), device=dev, dtype=cost_free.dtype).expand_as(cost_free)
               if self.force_order else cost_free)
        masked = torch.where(table.members[None], key[:, None, :], torch.full_like(key[:, None, :], math.inf))
        slot = masked.argmin(2)  # [b, S]
        action = torch.where(table.members.any(1)[None], free_t[slot], torch.full_like(slot, -1))
        return emax, added, action

    def _pruned(self, emax: Tensor, cost_free: Tensor, lam: Tensor, table) -> Tensor:
        """bool [b, S]: supermodels with a member whose marginal gain is below λ·cost by > tie_tol."""
        minus = table.minus  # [S, n]
        parent_val = emax[:, minus.clamp_min(0)]  # [b, S, n]
        gain = emax[:, :, None] - parent_val
        margin = gain - lam[:, None, None] * cost_free[:, None, :]
        bad = (margin < -self.tie_tol) & table.members[None]
        return bad.any(2)


def _cached_emax(policy: CascadeRouting, cache: dict, state: int, row_ids: Tensor, compute) -> Tensor:
    """E[max] rows for ``row_ids`` from ``cache[state]``, computing only rows not yet stored."""
    entry = cache.get(state)
    if entry is None:
        entry = cache[state] = {}
    missing = [i for i, r in enumerate(row_ids.tolist()) if r not in entry]
    if missing:
        sel = torch.tensor(missing, dtype=torch.long, device=row_ids.device)
        fresh = compute(sel)
        for i, val in zip(missing, fresh):
            entry[int(row_ids[i])] = val
    return torch.stack([entry[r] for r in row_ids.tolist()])
