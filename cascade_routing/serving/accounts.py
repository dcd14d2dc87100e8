"""Spend accounts: what every request spent, per API key and in total, kept in a counter store.

Each finished request (answered, failed, timed out, cut by a disconnect or a shutdown) is recorded once in its key's
account and in the server-wide account ``"*"`` with ``cost`` = the sum of the costs of the answers
it received (an upstream call cut short by a deadline or a client disconnect has no known cost and
is counted in ``cancelled_calls:<model>`` instead). Counters (all increments, see
:mod:`cascade_routing.serving.store`): ``requests``, ``answered``, ``errors``, ``timeouts``,
``disconnects``, ``shutdowns``, ``cost``, ``cost:<outcome>``, ``requests@<budget>`` / ``cost@<budget>`` per fitted budget used,
``runs:<model>``, ``answers:<model>``, ``failures:<model>``, ``cancelled_calls:<model>``.

The snapshot's ``within_budget`` compares, for every budget used, the mean cost of the requests
routed at that budget with that budget (a request that chose a lower budget is held to its own,
so it never makes the account look over budget).
"""

from __future__ import annotations

import time
from typing import Any

from cascade_routing.serving.store import CounterStore, MemoryStore

ALL = "*"

OUTCOMES = ("answered", "errors", "timeouts", "disconnects", "shutdowns")


class SpendLedger:
    """Records per-request spend in a :class:`CounterStore` and summarises it."""

    def __init__(self, store: CounterStore | None = None, budget: float | None = None) -> None:
        self.store = store if store is not None else MemoryStore()
        self.budget = budget
        self.started = time.time()

    def record(self, account: str | None, budget: float | None, outcome: str, cost: float,
               models_run: list[str] = (), answer_model: str | None = None,  # type: ignore[assignment]
               failed: list[str] = (), cancelled: list[str] = ()) -> None:  # type: ignore[assignment]
        """One finished request: ``outcome`` in :data:`OUTCOMES`; ``cost`` its spend in USD."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        inc: dict[str, float] = {"requests": 1, outcome: 1, "cost": cost, f"cost:{outcome}": cost}
        if budget is not None:
            inc[f"requests@{budget!r}"] = 1
            inc[f"cost@{budget!r}"] = cost
        for m in models_run:
            inc[f"runs:{m}"] = inc.get(f"runs:{m}", 0) + 1
        if answer_model is not None:
            inc[f"answers:{answer_model}"] = 1
        for m in failed:
            inc[f"failures:{m}"] = inc.get(f"failures:{m}", 0) + 1
        for m in cancelled:
            inc[f"cancelled_calls:{m}"] = inc.get(f"cancelled_calls:{m}", 0) + 1
        for name in {ALL, account or ALL}:
            self.store.add(name, inc)

    def spent(self, account: str) -> float:
        """Total USD recorded for ``account``."""
        return self.store.read(account).get("cost", 0.0)

    def snapshot(self, account: str = ALL, budget: float | None = None) -> dict[str, Any]:
        """Summary of one account; ``budget`` = the cap it is held to (default: the server's)."""
        raw = self.store.read(account)
        budget = self.budget if budget is None else budget
        requests = int(raw.get("requests", 0))
        total = raw.get("cost", 0.0)
        by_budget: dict[str, dict[str, Any]] = {}
        for key, value in raw.items():
            if key.startswith("requests@"):
                b = key.split("@", 1)[1]
                n = int(value)
                cost = raw.get(f"cost@{b}", 0.0)
                mean = cost / n if n else 0.0
                by_budget[b] = {"requests": n, "total_cost": cost, "mean_cost": mean,
                                "within_budget": mean <= float(b) * (1 + 1e-9)}

        def per_model(prefix: str) -> dict[str, int]:
            return {k[len(prefix):]: int(v) for k, v in sorted(raw.items()) if k.startswith(prefix)}

        mean = total / requests if requests else 0.0
        return {
            "budget": budget,
            "requests": requests,
            "answered": int(raw.get("answered", 0)),
            "errors": int(raw.get("errors", 0)),
            "timeouts": int(raw.get("timeouts", 0)),
            "disconnects": int(raw.get("disconnects", 0)),
            "shutdowns": int(raw.get("shutdowns", 0)),
            "total_cost": total,
            "cost_by_outcome": {o: raw.get(f"cost:{o}", 0.0) for o in OUTCOMES},
            "mean_cost": mean,
            "within_budget": all(b["within_budget"] for b in by_budget.values()),
            "budget_used_fraction": None if not budget else mean / budget,
            "by_budget": by_budget,
            "runs": per_model("runs:"),
            "answers": per_model("answers:"),
            "failures": per_model("failures:"),
            "cancelled_calls": per_model("cancelled_calls:"),
            "uptime_s": time.time() - self.started,
        }
