"""Supermodel tables and the expected maximum of Gaussian quality beliefs.

A *supermodel* is a set of models; its quality is ``E[max_{m in S} q_m]`` under the Gaussian
belief of the quality estimator, its cost the sum of its members' costs.

Expected max is computed with fixed quasi-random normal draws ``z`` [K, M]: scrambled Sobol points
mapped through the inverse normal CDF, made antithetic (``z`` and ``-z``) so that every column has
mean exactly zero up to rounding (a one-model supermodel then has expected max equal to its mean).
Samples of the qualities are ``mean + std * z`` (independent beliefs) or ``mean + z @ L^T`` with
``L = cholesky(cov + jitter * I)`` (correlated beliefs). For every subset the sample max is built
level by level: ``max(S) = max(max(S without its largest member), q_largest)``, so each subset costs
one elementwise maximum over the K draws.

Pure torch; no Lightning, no transformers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from cascade_routing.policies import emax_numba
from cascade_routing.policies.base import PolicyError

MAX_EXHAUSTIVE_SUPERMODELS = 2**12


def count_supermodels(num_models: int, max_depth: int | None = None) -> int:
    """Number of non-empty subsets of ``num_models`` models with at most ``max_depth`` members."""
    depth = num_models if max_depth is None else min(max_depth, num_models)
    return sum(math.comb(num_models, k) for k in range(1, depth + 1))


@dataclass(frozen=True)
class SubsetTable:
    """All subsets of ``n`` slots with at most ``r`` members, ordered by size (level).

    ``members`` bool [S, n] (row 0 is the empty set); ``levels[k]`` = (start, stop) rows of the
    subsets with k members. Within level k the subsets are grouped by their largest slot j
    (increasing), and inside group j they follow the order of level k-1 restricted to subsets whose
    largest slot is < j, which is a *prefix* of level k-1 (of length ``prefix[k][j]``). Hence
    ``max(S) = max(max(S without j), x_j)`` is, for group j, one broadcast maximum of a prefix slice
    of level k-1 with x_j: no gathers. ``minus[s, j]`` is the row of subset s without slot j (-1 if
    j is not a member).
    """

    n: int
    r: int
    members: Tensor
    levels: tuple[tuple[int, int], ...]
    prefix: tuple[tuple[int, ...], ...]
    minus: Tensor


@lru_cache(maxsize=256)
def _subset_table_cpu(n: int, r: int) -> SubsetTable:
    r = max(0, min(r, n))
    subsets: list[tuple[int, ...]] = [()]
    levels = [(0, 1)]
    prefix: list[tuple[int, ...]] = [()]
    prev: list[tuple[int, ...]] = [()]
    for _k in range(1, r + 1):
        start = len(subsets)
        cur: list[tuple[int, ...]] = []
        counts = []
        for j in range(n):
            parents = [p for p in prev if (p[-1] if p else -1) < j]
            counts.append(len(parents))
            cur.extend(p + (j,) for p in parents)
        subsets.extend(cur)
        levels.append((start, len(subsets)))
        prefix.append(tuple(counts))
        prev = cur
    index = {s: i for i, s in enumerate(subsets)}
    members = torch.zeros(len(subsets), n, dtype=torch.bool)
    minus = torch.full((len(subsets), n), -1, dtype=torch.long)
    for i, s in enumerate(subsets):
        for j in s:
            members[i, j] = True
            minus[i, j] = index[tuple(x for x in s if x != j)]
    return SubsetTable(n, r, members, tuple(levels), tuple(prefix), minus)


_DEVICE_TABLES: dict[tuple[int, int, str], SubsetTable] = {}


def subset_table(n: int, r: int, device: torch.device | str = "cpu") -> SubsetTable:
    """Cached :class:`SubsetTable` for ``n`` slots and at most ``r`` members on ``device``."""
    key = (n, max(0, min(r, n)), str(torch.device(device)))
    table = _DEVICE_TABLES.get(key)
    if table is None:
        cpu = _subset_table_cpu(key[0], key[1])
        table = SubsetTable(cpu.n, cpu.r, cpu.members.to(device), cpu.levels, cpu.prefix, cpu.minus.to(device))
        _DEVICE_TABLES[key] = table
    return table


def supermodel_table(num_models: int, max_depth: int | None = None) -> Tensor:
    """All non-empty supermodels of ``num_models`` models with at most ``max_depth`` members: bool [S, M]."""
    depth = num_models if max_depth is None else max_depth
    return _subset_table_cpu(num_models, depth).members[1:].clone()


@lru_cache(maxsize=32)
def _normal_draws_cpu(num_samples: int, num_models: int, seed: int) -> Tensor:
    if num_samples < 2 or num_samples % 2:
        raise ValueError(f"num_samples must be an even number >= 2 (antithetic draws), got {num_samples}")
    engine = torch.quasirandom.SobolEngine(dimension=num_models, scramble=True, seed=seed)
    u = engine.draw(num_samples // 2, dtype=torch.float64)
    u = u.clamp(1e-12, 1 - 1e-12)
    z = torch.special.ndtri(u)
    return torch.cat([z, -z], dim=0)


def normal_draws(
    num_samples: int, num_models: int, seed: int = 0, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed antithetic scrambled-Sobol standard normal draws z [K, M] (same seed, same draws).

    Cached per (K, M, seed, device, dtype): the engine asks for them at every decision step."""
    key = ("draws", num_samples, num_models, seed, str(torch.device(device)), dtype)
    z = _DEVICE_TABLES.get(key)  # type: ignore[arg-type]
    if z is None:
        z = _normal_draws_cpu(num_samples, num_models, seed).to(device=device, dtype=dtype)
        _DEVICE_TABLES[key] = z  # type: ignore[index]
    return z


def members_as(table: SubsetTable, dtype: torch.dtype) -> Tensor:
    """``table.members`` as 0/1 values of ``dtype`` [S, n] (cached), for ``added cost = cost_free @ members.T``."""
    key = ("members", table.n, table.r, str(table.members.device), dtype)
    hit = _DEVICE_TABLES.get(key)  # type: ignore[arg-type]
    if hit is None:
        hit = table.members.to(dtype)
        _DEVICE_TABLES[key] = hit  # type: ignore[index]
    return hit


def quality_samples(
    mean: Tensor, z: Tensor, std: Tensor | None = None, cov: Tensor | None = None,
    jitter: float = 1e-9,
) -> Tensor:
    """Samples of the qualities [B, M, K] from the belief (mean [B, M], std [B, M] or cov [B, M, M]).

    ``std``: ``mean + std * z``. ``cov``: ``mean + z @ L^T`` with ``L = cholesky(cov + jitter I)``
    (the jitter is scaled by the largest diagonal entry). Neither: the mean, repeated.
    """
    b, m = mean.shape
    k = z.shape[0]
    if cov is not None:
        eye = torch.eye(m, dtype=cov.dtype, device=cov.device)
        scale = cov.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1.0)[:, None, None]
        chol, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
        if bool((info != 0).any()):
            row = int((info != 0).nonzero()[0, 0])
            raise PolicyError(f"quality covariance of batch row {row} is not positive semi-definite")
        # samples[b, m, k] = mean[b, m] + sum_j L[b, m, j] z[k, j]
        return mean[:, :, None] + torch.einsum("bmj,kj->bmk", chol.to(z.dtype), z)
    if std is not None:
        return mean[:, :, None] + std[:, :, None] * z.T[None, :, :]
    return mean[:, :, None].expand(b, m, k)


EMAX_BACKENDS = ("auto", "torch", "numba")


def emax_backend() -> str:
    """The E[max] table backend: ``CASCADE_ROUTING_EMAX_BACKEND`` = auto (default: the fused numba
    kernel for float32/float64 CPU tensors when numba loads, torch otherwise) | torch | numba."""
    name = os.environ.get("CASCADE_ROUTING_EMAX_BACKEND", "auto").strip().lower() or "auto"
    if name not in EMAX_BACKENDS:
        raise ValueError(f"CASCADE_ROUTING_EMAX_BACKEND={name!r}; choose one of {list(EMAX_BACKENDS)}")
    return name


@lru_cache(maxsize=256)
def _kernel_layout(n: int, r: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(prefix int64 [r+1, n], level starts int64 [r+1], widest level, number of subsets) of a table."""
    table = _subset_table_cpu(n, r)
    prefix = np.zeros((table.r + 1, n), dtype=np.int64)
    for level in range(1, table.r + 1):
        prefix[level] = table.prefix[level]
    starts = np.array([start for start, _ in table.levels], dtype=np.int64)
    widest = max(stop - start for start, stop in table.levels)
    return prefix, starts, widest, table.members.shape[0]


def use_fused_kernel(x: Tensor) -> bool:
    """Whether the numba kernels handle tensors like ``x`` (CPU, float32/float64; see :func:`emax_backend`)."""
    backend = emax_backend()
    if backend == "torch" or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if backend == "numba" and not emax_numba.AVAILABLE:
        raise RuntimeError("CASCADE_ROUTING_EMAX_BACKEND=numba but numba cannot be imported")
    return emax_numba.AVAILABLE


def expected_max_table(free_samples: Tensor, base: Tensor | None, table: SubsetTable) -> Tensor:
    """E[max] for every subset of ``table`` joined with a base set: [B, S].

    ``free_samples`` [B, n, K] are the samples of the n candidate models; ``base`` [B, K] is the
    sample max over models already in every supermodel (the models that ran), or None (empty base;
    the empty subset then gets -inf). Row s of the result is ``E[max(base, max_{j in s} x_j)]``.
    On CPU (float32/float64) the fused kernel of :mod:`cascade_routing.policies.emax_numba` computes
    it (see :func:`emax_backend`); elsewhere the torch ops below.
    """
    if use_fused_kernel(free_samples) and not free_samples.requires_grad:
        prefix, starts, widest, s_total = _kernel_layout(table.n, table.r)
        xf = free_samples.detach().contiguous().numpy()
        bs = None if base is None else base.detach().to(free_samples.dtype).contiguous().numpy()
        out = emax_numba.expected_max_table_numba(xf, bs, prefix, starts, widest, s_total, torch.get_num_threads())
        return torch.from_numpy(out)
    return _expected_max_table_torch(free_samples, base, table)


def _expected_max_table_torch(free_samples: Tensor, base: Tensor | None, table: SubsetTable) -> Tensor:
    """The torch path of :func:`expected_max_table` (any device)."""
    b, n, k = free_samples.shape
    s_total = table.members.shape[0]
    out = torch.empty(b, s_total, dtype=free_samples.dtype, device=free_samples.device)
    if base is None:
        out[:, 0] = -math.inf
        prev = None
    else:
        out[:, 0] = base.mean(-1)
        prev = base[:, None, :]
    for level in range(1, table.r + 1):
        start, stop = table.levels[level]
        if prev is None:  # level 1 without a base: the samples themselves
            cur = free_samples
            out[:, start:stop] = cur.mean(-1)
        elif level == table.r:  # top level: its samples are not needed later, reduce while cache-hot
            cur = None
            off = start
            for j, count in enumerate(table.prefix[level]):
                if count:
                    out[:, off:off + count] = torch.maximum(prev[:, :count, :], free_samples[:, j:j + 1, :]).mean(-1)
                    off += count
        else:
            cur = torch.empty(b, stop - start, k, dtype=free_samples.dtype, device=free_samples.device)
            off = 0
            for j, count in enumerate(table.prefix[level]):
                if count:
                    torch.maximum(prev[:, :count, :], free_samples[:, j:j + 1, :], out=cur[:, off:off + count, :])
                    off += count
            out[:, start:stop] = cur.mean(-1)
        prev = cur
    return out


def expected_max(mean: Tensor, std: Tensor | None = None, cov: Tensor | None = None,
                 num_samples: int = 128, seed: int = 0) -> Tensor:
    """E[max_m q_m] of one Gaussian belief per row (mean [B, M]) with the engine's fixed draws: [B]."""
    z = normal_draws(num_samples, mean.shape[1], seed, mean.device, mean.dtype)
    x = quality_samples(mean, z, std, cov)
    return x.amax(1).mean(-1)


def _table_aux(table: SubsetTable) -> tuple[Tensor, Tensor, Tensor]:
    """(level of each row [S], largest slot of each row [S] (-1 for the empty set), local index within
    its level [S]), cached on the table's device."""
    key = ("aux", table.n, table.r, str(table.members.device))
    hit = _DEVICE_TABLES.get(key)  # type: ignore[arg-type]
    if hit is None:
        s = table.members.shape[0]
        level = torch.zeros(s, dtype=torch.long)
        local = torch.zeros(s, dtype=torch.long)
        for k, (start, stop) in enumerate(table.levels):
            level[start:stop] = k
            local[start:stop] = torch.arange(stop - start)
        slots = torch.arange(table.n).expand(s, -1)
        last = torch.where(table.members.cpu(), slots, torch.full_like(slots, -1)).amax(1)
        dev = table.members.device
        hit = (level.to(dev), last.to(dev), local.to(dev))
        _DEVICE_TABLES[key] = hit  # type: ignore[index]
    return hit


def _extensions(table: SubsetTable, level: int, last_of: Tensor, pair_row: Tensor, pair_sub: Tensor, n: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Every extension of the surviving subsets of ``level - 1`` (query ``pair_row``, local index
    ``pair_sub``) by a model after their largest member: ``(parent position among the survivors,
    added model j, query row, child row in the table)``, each [E]; None when there is none."""
    dev = pair_row.device
    start_prev = table.levels[level - 1][0]
    start = table.levels[level][0]
    last = last_of[start_prev + pair_sub]  # largest slot of each parent
    counts = (n - 1 - last).clamp_min(0)
    if int(counts.sum()) == 0:
        return None
    parent = torch.repeat_interleave(torch.arange(pair_row.numel(), device=dev), counts)
    first = torch.cumsum(counts, 0) - counts
    j = last[parent] + 1 + (torch.arange(parent.numel(), device=dev) - first[parent])
    row = pair_row[parent]
    # child row in the table: group j of this level lists the parents (local order) with last < j
    offsets = torch.tensor([0] + list(np.cumsum(table.prefix[level])[:-1]), device=dev, dtype=torch.long)
    child = start + offsets[j] + pair_sub[parent]
    return parent, j, row, child


def _pruned(flat_out: Tensor, s_total: int, table: SubsetTable, row: Tensor, child: Tensor, val: Tensor,
            lam: Tensor, cost_free: Tensor, tol: float) -> Tensor:
    """bool [E]: children the pruning lemma rules out: for some member j, ``s \\ j`` was pruned (-inf)
    or the gain ``val − E[max(s \\ j)]`` is below ``λ c_j − tol``."""
    sub_val = flat_out[(row * s_total)[:, None] + table.minus.index_select(0, child).clamp_min(0)]  # [E, n]
    gain = val[:, None] - sub_val
    bad = table.members.index_select(0, child) & (
        torch.isinf(sub_val) | (gain < lam[row, None] * cost_free.index_select(0, row) - tol))
    return bad.any(1)


def expected_max_pruned(free_samples: Tensor, base: Tensor | None, table: SubsetTable, cost_free: Tensor,
                        lam: Tensor, tol: float) -> Tensor:
    """Like :func:`expected_max_table`, but skipping extensions ruled out by the pruning lemma.

    A subset s (level >= 1, or >= 2 without a base) is *pruned* if some member j has marginal gain
    ``E[max(s)] − E[max(s \\ j)] < λ c_j − tol`` or some ``s \\ j`` was pruned; pruned subsets and all
    their extensions are never sampled and get -inf. By submodularity of the (sample) max, every
    pruned subset is worse by more than ``tol`` than one of its own subsets, so the best supermodel
    is unchanged. Only the samples of surviving subsets are kept (compact [P, K] per level).
    """
    b, n, k = free_samples.shape
    dev = free_samples.device
    s_total = table.members.shape[0]
    level_of, last_of, _ = _table_aux(table)
    out = torch.full((b, s_total), -math.inf, dtype=free_samples.dtype, device=dev)
    if base is not None:
        out[:, 0] = base.mean(-1)
    if table.r == 0:
        return out
    # level 1: every singleton
    start1, stop1 = table.levels[1]
    cur = free_samples if base is None else torch.maximum(free_samples, base[:, None, :])  # [b, n, K]
    out[:, start1:stop1] = cur.mean(-1)
    alive = torch.ones(b, n, dtype=torch.bool, device=dev)
    if base is not None:
        alive = (out[:, start1:stop1] - out[:, :1]) >= lam[:, None] * cost_free - tol
    out[:, start1:stop1] = out[:, start1:stop1].masked_fill(~alive, -math.inf)
    pair_row, pair_sub = alive.nonzero(as_tuple=True)  # local index at level 1 == slot
    samples = cur.reshape(b * n, k).index_select(0, pair_row * n + pair_sub)  # [P, K]
    flat_x = free_samples.reshape(b * n, k)
    flat_out = out.view(-1)
    for level in range(2, table.r + 1):
        if pair_row.numel() == 0:
            break
        ext = _extensions(table, level, last_of, pair_row, pair_sub, n)
        if ext is None:
            break
        parent, j, row, child = ext
        x = torch.maximum(samples.index_select(0, parent), flat_x.index_select(0, row * n + j))  # [E, K]
        val = x.mean(-1)
        flat_out.index_copy_(0, row * s_total + child, val)
        drop = _pruned(flat_out, s_total, table, row, child, val, lam, cost_free, tol)
        flat_out.index_fill_(0, (row * s_total + child)[drop], -math.inf)
        if level == table.r:  # survivors of the top level are not extended
            break
        keep_idx = (~drop).nonzero().squeeze(1)
        start = table.levels[level][0]
        pair_row, pair_sub = row.index_select(0, keep_idx), (child - start).index_select(0, keep_idx)
        samples = x.index_select(0, keep_idx)
    return out
