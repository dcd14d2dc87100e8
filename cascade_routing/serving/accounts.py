"""Spend accounts: what every request spent, per API key and in total, kept in a counter store.

Each finished request (answered, failed, timed out, cut by a disconnect or a shutdown) is recorded once in its key's
account and in the server-wide account ``"*"`` with ``cost`` = the sum of the costs of the answers
it received, plus the estimated cost of a streamed answer that broke after part of it arrived
(:attr:`~cascade_routing.serving.router.RouteProgress.partial`: the provider bills that part; an
upstream call cut short by a deadline or a client disconnect has no known cost and is counted in
``cancelled_calls:<model>`` instead). Counters (all increments, see
:mod:`cascade_routing.serving.store`): ``requests``, ``answered``, ``errors``, ``timeouts``,
``disconnects``, ``shutdowns``, ``cost``, ``cost:<outcome>``, ``requests@<budget>`` / ``cost@<budget>`` per fitted budget used,
``runs:<model>``, ``answers:<model>``, ``failures:<model>`` (calls that failed after retries; a model
the request never called, e.g. ``attempt_limit`` / ``circuit_open``, is not counted),
``cancelled_calls:<model>``.

:class:`SpendReservations` keeps an API key's ``max_spend`` under concurrency: every admitted
request of a limited key reserves its worst-case cost until it is recorded (then its real cost
counts instead), and a request is admitted only while ``spent + reserved < max_spend``. So, per
server process, the key's spend exceeds ``max_spend`` by less than the cost of the last request
admitted, as long as no request costs more than its reservation (the server's
``worst_case_cost``); a request that does adds its excess. Reservations live in the process: with
N processes sharing the store (``--workers N``, replicas) the bound is N requests' worth.

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
        """Total USD recorded for ``account`` (the store's ``cost`` counter alone: read twice per request of
        a key with ``max_spend``, before and after its body)."""
        return self.store.read_field(account, "cost")

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


class Reservation:
    """One request's hold on its key's remaining quota; :meth:`release` (idempotent) gives it back."""

    def __init__(self, owner: "SpendReservations", account: str, amount: float) -> None:
        self._owner, self.account, self.amount = owner, account, amount
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._owner._release(self)


class SpendReservations:
    """What the requests in flight in this process have reserved per account (see module docstring).

    Not thread-safe: the server calls it from its event loop only."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, float]] = {}  # account -> (reservations, USD)

    def held(self, account: str) -> float:
        """USD reserved by ``account``'s requests in flight."""
        return self._held.get(account, (0, 0.0))[1]

    def reserve(self, account: str, amount: float) -> Reservation:
        """Hold ``amount`` USD (>= 0) for one request of ``account`` until the reservation is released."""
        if not amount >= 0:
            raise ValueError(f"a reservation must be >= 0 USD, got {amount}")
        count, total = self._held.get(account, (0, 0.0))
        self._held[account] = (count + 1, total + amount)
        return Reservation(self, account, amount)

    def _release(self, reservation: Reservation) -> None:
        count, total = self._held[reservation.account]
        if count <= 1:  # the last one: exactly zero again, whatever the rounding of the sums
            del self._held[reservation.account]
        else:
            self._held[reservation.account] = (count - 1, max(0.0, total - reservation.amount))
