"""Seeded, optionally stratified partition of row indices into named splits.

The rounding rule: groups (task labels) are processed in sorted order; for each group the number
of rows given to split ``s`` is chosen so that the running total of split ``s`` stays within one
row of the running ideal ``sum_g n_g * f_s`` (largest-remainder apportionment of the running
deficit). So every split's size is within one row of ``N * f_s`` overall and within one row of
``n_g * f_s`` inside each group. Rows inside a group are shuffled by ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cascade_routing.data.errors import DatasetError


class SplitError(DatasetError):
    """Bad split fractions or a split that cannot be made non-empty."""


def _validate_fractions(fractions: dict[str, float], where: str) -> dict[str, float]:
    if not isinstance(fractions, dict) or not fractions:
        raise SplitError(f"{where}: fractions must be a non-empty dict name -> share, got {fractions!r}")
    out: dict[str, float] = {}
    for name, frac in fractions.items():
        if not isinstance(name, str) or not name:
            raise SplitError(f"{where}: split name {name!r} is not a non-empty string")
        try:
            value = float(frac)
        except (TypeError, ValueError):
            raise SplitError(f"{where}: fraction of split {name!r} is not a number: {frac!r}") from None
        if not np.isfinite(value) or value <= 0:
            raise SplitError(f"{where}: fraction of split {name!r} must be > 0, got {frac!r}")
        out[name] = value
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise SplitError(f"{where}: split fractions must sum to 1, got {total!r} ({out})")
    return out


def _apportion(n: int, desired: np.ndarray) -> np.ndarray:
    """Integers >= 0 summing to ``n``, each within one of ``desired`` (which sums to ``n``)."""
    want = np.maximum(desired, 0.0)
    base = np.floor(want).astype(np.int64)
    while base.sum() > n:  # only when some desired were negative and got clamped
        base[int(np.argmax(base))] -= 1
    rest = n - int(base.sum())
    if rest > 0:
        order = np.argsort(-(want - base), kind="stable")
        base[order[:rest]] += 1
    return base


def partition_indices(
    num_rows: int,
    fractions: dict[str, float],
    groups: Sequence[str] | None = None,
    seed: int = 0,
    where: str = "split",
) -> dict[str, np.ndarray]:
    """Disjoint sorted index arrays, one per split name, covering ``range(num_rows)``."""
    fracs = _validate_fractions(fractions, where)
    names = list(fracs)
    shares = np.array([fracs[n] for n in names], dtype=np.float64)
    if num_rows < len(names):
        raise SplitError(
            f"{where}: cannot make {len(names)} non-empty splits {names} from {num_rows} queries"
        )
    rng = np.random.default_rng(seed)
    labels = list(groups) if groups is not None else ["" for _ in range(num_rows)]
    if len(labels) != num_rows:
        raise SplitError(f"{where}: {len(labels)} group labels for {num_rows} rows")
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(labels):
        by_group.setdefault(g, []).append(i)
    assigned = np.zeros(len(names), dtype=np.int64)
    cum_ideal = np.zeros(len(names), dtype=np.float64)
    parts: list[list[int]] = [[] for _ in names]
    for g in sorted(by_group):
        rows = np.asarray(by_group[g], dtype=np.int64)
        rows = rows[rng.permutation(len(rows))]
        cum_ideal += len(rows) * shares
        counts = _apportion(len(rows), cum_ideal - assigned)
        start = 0
        for s, c in enumerate(counts):
            parts[s].extend(rows[start : start + c].tolist())
            start += int(c)
        assigned += counts
    # Guarantee every split is non-empty: move one random row from the largest split.
    for s in range(len(names)):
        if not parts[s]:
            donor = int(np.argmax([len(p) for p in parts]))
            take = int(rng.integers(len(parts[donor])))
            parts[s].append(parts[donor].pop(take))
    return {name: np.sort(np.asarray(parts[s], dtype=np.int64)) for s, name in enumerate(names)}
