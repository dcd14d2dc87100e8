"""Fused CPU kernel for the E[max] supermodel table (numba), used by
:func:`cascade_routing.policies.supermodels.expected_max_table` on CPU tensors.

Same recursion as the torch path: ``max(S) = max(max(S without its largest member), x_largest)``,
level by level over the :class:`~cascade_routing.policies.supermodels.SubsetTable` order. The
difference is the memory traffic: per query row the kernel keeps one level's samples in a scratch
buffer (``widest level x K`` values, a few hundred kB: cache-resident) and takes the maximum and the
sum over the K draws in the same loop, instead of materialising ``[rows, subsets, K]`` tensors and
reducing them in a second pass. The kernel releases the GIL; with ``threads > 1`` the rows are split
into contiguous blocks run on a shared thread pool (no OpenMP runtime next to torch's, no spinning
workers between calls).

The sum over the K draws is accumulated in the input dtype with reassociation allowed (vectorised),
so values can differ from torch's ``mean`` in the last bit; decisions (compared with ``tie_tol``)
are checked equal to the torch path in ``tests/test_engine_emax_kernel.py`` and by the benchmarks.
Compiled on first use and cached on disk (``NUMBA_CACHE_DIR`` or ``__pycache__``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # numba is a dependency, but the engine must keep working (torch path) where it cannot load
    from numba import njit

    AVAILABLE = True
except Exception:  # pragma: no cover - exercised only where numba is missing or broken
    AVAILABLE = False


if AVAILABLE:

    @njit(cache=True, fastmath={"reassoc"}, nogil=True)
    def _kernel(x, base, has_base, prefix, starts, widest, out, lo, hi):  # pragma: no cover - compiled
        k = x.shape[2]
        n = x.shape[1]
        r = prefix.shape[0] - 1
        inv_k = x.dtype.type(1.0) / x.dtype.type(k)
        for i in range(lo, hi):
            prev = np.empty((widest, k), x.dtype)
            cur = np.empty((widest, k), x.dtype)
            if has_base:
                acc = x.dtype.type(0.0)
                for t in range(k):
                    v = base[i, t]
                    prev[0, t] = v
                    acc += v
                out[i, 0] = acc * inv_k
            else:  # empty base: max(-inf, x_j) = x_j; the empty subset itself is not allowed
                for t in range(k):
                    prev[0, t] = -np.inf
                out[i, 0] = -np.inf
            for level in range(1, r + 1):
                off = 0
                top = level == r
                for j in range(n):
                    for p in range(prefix[level, j]):
                        acc = x.dtype.type(0.0)
                        for t in range(k):
                            a = prev[p, t]
                            c = x[i, j, t]
                            v = a if a > c else c
                            if not top:
                                cur[off + p, t] = v
                            acc += v
                        out[i, starts[level] + off + p] = acc * inv_k
                    off += prefix[level, j]
                prev, cur = cur, prev
        return out


    @njit(cache=True, nogil=True)
    def _independent_samples(mean, std, free_idx, ran_idx, zt, xf, base):  # pragma: no cover - compiled
        # xf[i, j, t] = mean[i, f] + std[i, f] * z[t, f] with f = free_idx[i, j] (two roundings, as torch);
        # base[i, t] = max over the ran columns of the same samples
        b, n = free_idx.shape
        nr = ran_idx.shape[1]
        k = zt.shape[1]
        for i in range(b):
            for j in range(n):
                f = free_idx[i, j]
                mu = mean[i, f]
                sd = std[i, f]
                for t in range(k):
                    xf[i, j, t] = mu + sd * zt[f, t]
            for q in range(nr):
                f = ran_idx[i, q]
                mu = mean[i, f]
                sd = std[i, f]
                for t in range(k):
                    v = mu + sd * zt[f, t]
                    if q == 0 or v > base[i, t]:
                        base[i, t] = v

    @njit(cache=True, nogil=True)
    def _choose(emax, added, lam, invalid, has_invalid, tol, best):  # pragma: no cover - compiled
        # per row: values = emax - lam * added (-inf where invalid); among values >= max - tol the
        # least added cost, first row on ties (torch's argmin)
        b, s = emax.shape
        values = np.empty(s, emax.dtype)
        for i in range(b):
            top = emax.dtype.type(-np.inf)
            for c in range(s):
                v = emax[i, c] - lam[i] * added[i, c]
                if has_invalid and invalid[i, c]:
                    v = emax.dtype.type(-np.inf)
                values[c] = v
                if v > top:
                    top = v
            thr = top - tol  # in the input dtype, like torch's `max - tol`
            arg = 0
            low = added.dtype.type(np.inf)
            for c in range(s):
                if values[c] >= thr and added[i, c] < low:
                    low = added[i, c]
                    arg = c
            best[i] = arg


def independent_samples(mean: np.ndarray, std: np.ndarray, free_idx: np.ndarray, ran_idx: np.ndarray,
                        zt: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples of the free models ``x[i, j, t] = mean[i, f] + std[i, f] · z[t, f]`` (f = free_idx[i, j])
    [B, n, K] and the sample max over the ran models [B, K] (None if nothing ran), in one pass."""
    b, n = free_idx.shape
    k = zt.shape[1]
    xf = np.empty((b, n, k), dtype=mean.dtype)
    base = np.empty((b, k), dtype=mean.dtype)
    _independent_samples(mean, std, free_idx, ran_idx, zt, xf, base)
    return xf, (base if ran_idx.shape[1] else None)


def choose(emax: np.ndarray, added: np.ndarray, lam: np.ndarray, invalid: np.ndarray | None,
           tie_tol: float) -> np.ndarray:
    """Row of the best supermodel per query: ``argmin added`` over ``{values >= max(values) − tie_tol}``
    with ``values = emax − λ·added`` (-inf where ``invalid``); the first row on ties. int64 [B]."""
    best = np.empty(emax.shape[0], dtype=np.int64)
    has_invalid = invalid is not None
    inv = invalid if has_invalid else np.zeros((0, 0), dtype=np.bool_)
    _choose(emax, added, lam, inv, has_invalid, emax.dtype.type(tie_tol), best)
    return best


def expected_max_table_numba(free_samples: np.ndarray, base: np.ndarray | None, prefix: np.ndarray,
                             starts: np.ndarray, widest: int, num_subsets: int, threads: int) -> np.ndarray:
    """E[max] [B, S] for every subset (SubsetTable order) joined with ``base``; see the module docstring.

    ``free_samples`` [B, n, K] and ``base`` [B, K] (or None: empty base, row 0 gets -inf), C-contiguous,
    float32 or float64; ``prefix`` int64 [r+1, n] (``SubsetTable.prefix`` with row 0 all zeros
    except that level 1 counts the empty parent), ``starts`` int64 [r+1] level start rows.
    """
    if not AVAILABLE:
        raise RuntimeError("numba is not available; use the torch path")
    b, _, k = free_samples.shape
    out = np.empty((b, num_subsets), dtype=free_samples.dtype)
    has_base = base is not None
    base_arr = base if has_base else np.empty((0, k), dtype=free_samples.dtype)
    args = (free_samples, base_arr, has_base, prefix, starts, widest, out)
    blocks = max(1, min(threads, b // _MIN_ROWS_PER_THREAD))
    if blocks == 1:
        _kernel(*args, 0, b)
        return out
    edges = np.linspace(0, b, blocks + 1).astype(np.int64)
    futures = [_pool(blocks).submit(_kernel, *args, int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    for f in futures:
        f.result()
    return out


_MIN_ROWS_PER_THREAD = 8
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="emax")
    return pool
