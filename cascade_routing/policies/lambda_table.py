"""Which fitted λ a budget gets: the one rule shared by the artifact, the simulation and the server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")

#: relative slack on the requested budget, so a budget read back from a file (float rounding) still
#: finds the entry it was fitted at
BUDGET_RTOL = 1e-9


def lookup_fitted(table: Mapping[float, T], budget: float) -> tuple[float, T] | None:
    """``(b, table[b])`` for the largest fitted budget ``b <= budget · (1 + BUDGET_RTOL)``; None when
    every fitted budget is above ``budget`` (or the table is empty). Keys that are None are ignored."""
    below = [b for b in table if b is not None and b <= float(budget) * (1 + BUDGET_RTOL)]
    if not below:
        return None
    used = max(below)
    return used, table[used]
