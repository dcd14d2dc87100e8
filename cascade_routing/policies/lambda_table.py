"""Which fitted λ a budget gets: the one rule shared by the artifact, the simulation and the server."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

#: relative slack on the requested budget, so a budget read back from a file, a float32, or a
#: display rounded to 6 significant digits (metrics labels, stats, error messages: at most 5e-6
#: relative) still finds the entry it was fitted at; fitted budgets lie much further apart
BUDGET_RTOL = 1e-5


def checked_budget(budget: Any) -> float:
    """``budget`` as a float; ``ValueError`` unless it is a real number (a Python or numpy scalar, or
    a one-element tensor / array; not a bool or a string), finite and >= 0 -- the one rule of λ
    fitting, the artifact's tables and the server."""
    if getattr(budget, "ndim", None) == 0 or getattr(budget, "shape", None) == (1,):
        budget = budget.item()
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r} ({type(budget).__name__})")
    value = float(budget)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"budget must be a finite number >= 0, got {value}")
    return value


def lookup_fitted(table: Mapping[float, T], budget: float) -> tuple[float, T] | None:
    """``(b, table[b])`` for the largest fitted budget ``b <= budget · (1 + BUDGET_RTOL)``; None when
    every fitted budget is above ``budget`` (or the table is empty). Keys that are None are ignored;
    ``budget`` is checked by :func:`checked_budget`."""
    budget = checked_budget(budget)
    below = [b for b in table if b is not None and b <= budget * (1 + BUDGET_RTOL)]
    if not below:
        return None
    used = max(below)
    return used, table[used]
