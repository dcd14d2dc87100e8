"""The supermodels cascade routing can ever pick at a (ran-state, query), and a memo keyed by such pairs.

Cascade routing picks, per query, the supermodel row s* that maximises ``v_s(λ) = e_s − λ·a_s``
(E[max] e, added cost a; invalid rows are −inf) with the tie rule: among ``{s : v_s ≥ max v − tol}``
the least ``a``, then the lowest row. Order the rows by (a, row) and call s *dominated* when an
earlier row s' has ``e_s' ≥ e_s``. For every λ ≥ 0, ``v_s'(λ) ≥ v_s(λ)`` (also after float rounding:
``fl(λ·a)`` is monotone in ``a`` and ``fl(e − p)`` in both arguments), so whenever s is near the
best, s' is too and comes first under the tie rule: a dominated row is never picked, and the best
value is always attained by an undominated one. The undominated rows (the cost–E[max] staircase:
strictly increasing ``e`` along increasing ``a``) therefore give the same s* as all rows, for every
λ and every ``tol``. They are λ-independent, so λ fitting, which decides the same (state, query)
pairs at many λ, finds them once per pair and then chooses among a handful of rows instead of every
supermodel. With no uncertainty (E[max] = max of means) the staircase has at most n + 1 rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def staircase(emax: Tensor, added: Tensor, invalid: Tensor | None) -> tuple[Tensor, Tensor]:
    """(rows long [b, w], present bool [b, w]): each query's undominated supermodel rows (module
    docstring) in increasing row order, padded to the widest query (``present`` False there; the
    padded row ids are 0)."""
    b, s = emax.shape
    e = emax if invalid is None else emax.masked_fill(invalid, -math.inf)
    order = torch.argsort(added, dim=1, stable=True)  # by added cost, then row
    e_sorted = e.gather(1, order)
    earlier_best = torch.cummax(e_sorted, 1).values
    earlier_best = torch.cat([torch.full_like(e_sorted[:, :1], -math.inf), earlier_best[:, :-1]], 1)
    keep = torch.zeros_like(e_sorted, dtype=torch.bool).scatter_(1, order, e_sorted > earlier_best)
    del order, e_sorted, earlier_best  # [b, S] temporaries: λ fitting finds thousands of rows at once
    width = max(1, int(keep.sum(1).max())) if b else 1
    query, row = keep.nonzero(as_tuple=True)  # row-major: each query's kept rows in increasing order
    slot = keep.cumsum(1)[query, row] - 1
    rows = torch.zeros(b, width, dtype=torch.long, device=emax.device)
    present = torch.zeros(b, width, dtype=torch.bool, device=emax.device)
    rows[query, slot] = row
    present[query, slot] = True
    return rows, present


def cached_pairs(cache: dict, slot: tuple, states: Tensor, row_ids: Tensor,
                 compute: Callable[[Tensor], tuple[Tensor, ...]], pads: tuple[float, ...]) -> tuple[Tensor, ...]:
    """Per (ran-state, row) pair, the tensors ``compute`` gives for it, from ``cache[slot]``, computing
    (in one call, once per distinct pair) only the pairs not yet stored.

    ``compute(sel)`` gets batch positions (one per distinct missing pair, in batch order) and returns
    tensors [len(sel), w, ...]; the width w may differ between calls: narrower rows are padded with
    ``pads[i]`` (one per tensor) to the widest stored so far. Stored as (sorted pair keys int64 [P],
    their rows in the value buffers [P], value buffers [capacity, width, ...], rows used) with pair key
    ``state · 2^32 + row``: a lookup is one ``searchsorted`` and one gather per tensor; new pairs are
    appended (capacity doubles when full), so storing them never copies the stored values unless
    the width grows.
    """
    keys = states.to(torch.long) * 2**32 + row_ids.to(device=states.device, dtype=torch.long)
    stored = cache.get(slot)
    if stored is None:
        hit = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
        pos = hit.long()
    else:
        sorted_keys, where, vals, used = stored
        pos = torch.searchsorted(sorted_keys, keys).clamp_max(sorted_keys.numel() - 1)
        hit = sorted_keys[pos] == keys
        if bool(hit.all()):
            return tuple(v.index_select(0, where[pos]) for v in vals)
    miss = (~hit).nonzero().squeeze(1)
    # the same pair may be missing in several rows (λ fitting batches copies of the rows): compute it once
    new_keys, inverse = torch.unique(keys[miss], return_inverse=True)
    first = torch.full((new_keys.numel(),), miss.numel(), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, torch.arange(miss.numel(), device=keys.device), "amin")
    by_position = torch.argsort(first)
    computed = compute(miss[first[by_position]])
    k = new_keys.numel()
    if stored is None:
        sorted_keys, where, used = new_keys.new_empty(0), new_keys.new_empty(0), 0
        vals = tuple(c.new_full((max(k, 64), *c.shape[1:]), pad) for c, pad in zip(computed, pads))
    width = max(vals[0].shape[1], computed[0].shape[1])
    capacity = vals[0].shape[0] if used + k <= vals[0].shape[0] else max(2 * vals[0].shape[0], used + k)
    vals = tuple(_grown(v, capacity, width, pad, used) for v, pad in zip(vals, pads))
    fresh = []
    for v, c, pad in zip(vals, computed, pads):
        aligned = c.new_full((k, width, *c.shape[2:]), pad)
        aligned[by_position, : c.shape[1]] = c  # aligned with new_keys
        v[used:used + k] = aligned
        fresh.append(aligned)
    outs = []
    for v, f in zip(vals, fresh):
        out = v.new_empty(keys.numel(), *v.shape[1:])
        if stored is not None:
            out[hit] = v.index_select(0, where[pos[hit]])
        out[miss] = f[inverse]
        outs.append(out)
    all_keys = torch.cat([sorted_keys, new_keys])
    all_where = torch.cat([where, torch.arange(used, used + k, device=keys.device)])
    order = torch.argsort(all_keys)
    cache[slot] = (all_keys[order], all_where[order], vals, used + k)
    return tuple(outs)


def _grown(buffer: Tensor, capacity: int, width: int, pad: float, used: int) -> Tensor:
    """``buffer`` with at least ``capacity`` rows and ``width`` columns (its first ``used`` rows kept,
    new cells ``pad``); the same tensor when it is big enough already."""
    if buffer.shape[0] >= capacity and buffer.shape[1] >= width:
        return buffer
    grown = buffer.new_full((capacity, width, *buffer.shape[2:]), pad)
    grown[:used, : buffer.shape[1]] = buffer[:used]
    return grown
