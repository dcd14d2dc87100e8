"""Online budget keeping: a PI controller in log λ over a sliding window of realised spend.

λ fitted offline meets the budget B only in expectation over traffic like the calibration split.
When live traffic shifts (other tasks, longer prompts, price changes) the realised mean spend
drifts. The controller multiplies the fitted λ (every step's ``lam_low``/``lam_high``; the tie mix
γ is kept) by ``exp(u)`` and moves ``u`` from the realised cost of served requests.

After the n-th observed cost c_n (requests in the order the controller observes them)::

    e_n = mean(c_{n-W+1}, ..., c_n) / B - 1          relative error over the last W requests
    I_n = clip(I_{n-1} + k_i * e_n, -L, L)            integral (dual ascent on the budget constraint)
    u_n = clip(I_n + k_p * clip(e_n, -1, 1), -L, L)   λ multiplier exp(u_n); L = ln(max_factor)

Before the first observation u = 0 (the offline λ). Why this form:

- The integral term is dual ascent on ``mean cost <= B`` in log λ (λ is that constraint's
  multiplier). Summing the window means counts each request's error W times / W, so while the
  integral is not clipped, ``sum_n e_n`` stays bounded and the realised mean spend over the stream
  converges to B (transient overspend is paid back). Its error is not clipped: one request costing
  hundreds of budgets (a long prompt to the priciest model) adds k_i·e for each of the W requests it
  stays in the window and saturates λ at ``max_factor``; the part of such an overspend beyond the
  clip is not paid back.
- The window smooths single expensive requests (one GPT-4 answer costs ~60x a 7B one), the
  proportional term reacts within a window, and its error is clipped to [-1, 1] so one burst does
  not swing the proportional part by more than ``k_p``.
- ``max_factor`` bounds λ to [λ₀ / max_factor, λ₀ · max_factor] (anti-windup: the integral is
  clamped too), so a broken cost feed cannot drive the policy to "never spend" or "always GPT-4".
- A budget whose fitted λ₀ is 0 (the largest fitted budgets: the policy spends without a price)
  cannot be controlled: every multiple of 0 is 0 (:func:`lambda_is_zero`; ``serve`` warns).

The controller is a pure function of the observed cost sequence, so the offline simulation
(:func:`cascade_routing.evaluation.online.simulate_controlled`) reproduces a server's decisions
when it sees the same requests in the same order.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
from collections import deque
from dataclasses import asdict, dataclass

from cascade_routing.policies.base import PolicyError
from cascade_routing.policies.fitting import FittedLambda
from cascade_routing.policies.lambda_table import checked_budget


@dataclass(frozen=True)
class ControllerConfig:
    """Settings of :class:`BudgetController` (see the module docstring for the update rule)."""

    window: int = 50  # requests in the sliding window of realised spend
    k_p: float = 0.5  # proportional gain on the window's (clipped) relative error, in log λ
    k_i: float = 0.05  # integral gain per observed request, in log λ
    max_factor: float = 30.0  # λ stays within [λ₀ / max_factor, λ₀ · max_factor]

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, numbers.Integral) or self.window < 1:
            raise PolicyError(f"controller window must be an integer >= 1, got {self.window!r}")
        object.__setattr__(self, "window", int(self.window))
        for name, low in (("k_p", 0.0), ("k_i", 0.0), ("max_factor", 1.0)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                    or value < low):
                raise PolicyError(f"controller {name} must be a finite number >= {low:g}, got {value!r}")
            object.__setattr__(self, name, float(value))


def scale_fitted(fitted: FittedLambda, factor: float) -> FittedLambda:
    """``fitted`` with every λ multiplied by ``factor`` (γ, budget, calibration info, depth limit and
    model limit kept)."""
    if factor == 1.0:
        return fitted
    return dataclasses.replace(fitted, lam_low=fitted.lam_low * factor, lam_high=fitted.lam_high * factor,
                               info=dict(fitted.info))


class BudgetController:
    """The PI controller of the module docstring for one budget; thread-safe.

    ``factor`` is the current λ multiplier; ``observe(cost)`` feeds the realised cost of one served
    request; ``version`` counts the observations (a request's trace records the version its λ
    was taken at).
    """

    def __init__(self, budget: float, config: ControllerConfig | None = None) -> None:
        try:
            value = checked_budget(budget)  # a Python or numpy number, finite, >= 0
        except ValueError:
            value = 0.0
        if value <= 0:
            raise PolicyError(f"the controller needs a finite budget > 0, got {budget!r}")
        self.budget = value
        self.config = config or ControllerConfig()
        self._limit = math.log(self.config.max_factor)
        self._window: deque[float] = deque(maxlen=self.config.window)
        self._window_sum = 0.0
        self._integral = 0.0
        self._u = 0.0
        self._error = 0.0
        self.version = 0
        self.total_cost = 0.0
        self._scaled: FittedLambda | None = None
        self._scaled_key: tuple[int, int] | None = None
        self._lock = threading.Lock()

    @property
    def factor(self) -> float:
        """The λ multiplier exp(u) to use now."""
        return math.exp(self._u)

    def take(self) -> tuple[float, int]:
        """(λ multiplier, version) read together."""
        with self._lock:
            return math.exp(self._u), self.version

    def observe(self, cost: float) -> float:
        """Feed one request's realised cost (USD); returns the new multiplier."""
        cost = float(cost)
        if not math.isfinite(cost) or cost < 0:
            raise PolicyError(f"realised cost must be a finite number >= 0, got {cost!r}")
        cfg = self.config
        with self._lock:
            if len(self._window) == cfg.window:
                self._window_sum -= self._window[0]
            self._window.append(cost)
            # Recomputed from the window now and then so float drift of the running sum stays tiny.
            # (costs are >= 0, so a negative sum is drift: clamped)
            self._window_sum = max(0.0, math.fsum(self._window) if self.version % 1000 == 999
                                   else self._window_sum + cost)
            self._error = self._window_sum / len(self._window) / self.budget - 1.0
            self._integral = min(self._limit, max(-self._limit, self._integral + cfg.k_i * self._error))
            p = cfg.k_p * min(1.0, max(-1.0, self._error))
            self._u = min(self._limit, max(-self._limit, self._integral + p))
            self.version += 1
            self.total_cost += cost
            return math.exp(self._u)

    def scaled(self, fitted: FittedLambda) -> tuple[FittedLambda, float, int]:
        """(``fitted`` scaled by the current multiplier, the multiplier, the version). Requests
        taking it at the same version get the same object (so a server can batch their decisions)."""
        with self._lock:
            factor, version = math.exp(self._u), self.version
            key = (id(fitted), version)
            if self._scaled_key != key:
                self._scaled, self._scaled_key = scale_fitted(fitted, factor), key
            return self._scaled, factor, version

    def state(self) -> dict:
        """For stats endpoints and traces."""
        with self._lock:
            n = len(self._window)
            return {
                "budget": self.budget,
                "lam_factor": math.exp(self._u),
                "log_lam_factor": self._u,
                "integral": self._integral,
                "window_mean_cost": self._window_sum / n if n else None,
                "window_error": self._error if n else None,
                "observed": self.version,
                "mean_cost": self.total_cost / self.version if self.version else None,
                "config": asdict(self.config),
            }


class BudgetControllers:
    """One :class:`BudgetController` per budget in use (created on first use, same settings), so
    requests served at different budgets each meet their own; thread-safe."""

    def __init__(self, config: ControllerConfig | None = None) -> None:
        self.config = config or ControllerConfig()
        self._by_budget: dict[float, BudgetController] = {}
        self._lock = threading.Lock()

    def get(self, budget: float) -> BudgetController:
        with self._lock:
            if budget not in self._by_budget:
                self._by_budget[budget] = BudgetController(budget, self.config)
            return self._by_budget[budget]

    def state(self) -> dict[str, dict]:
        with self._lock:
            items = list(self._by_budget.items())
        return {f"{b:.6g}": c.state() for b, c in sorted(items)}


def lambda_is_zero(fitted) -> bool:
    """Whether every λ of ``fitted`` is 0 (a budget at or above what the policy spends without a
    price): scaling it changes nothing, so a controller cannot lower spend there."""
    return not (bool(fitted.lam_low.ne(0).any()) or bool(fitted.lam_high.ne(0).any()))


def lam_in_use(fitted: FittedLambda, factor: float = 1.0) -> float:
    """One number for dashboards: the first step's λ (``lam_high``, the side most queries use) x factor."""
    return float(fitted.lam_high[0]) * factor if fitted.lam_high.numel() else float("nan")


__all__ = ["BudgetController", "BudgetControllers", "ControllerConfig", "lam_in_use", "lambda_is_zero",
           "scale_fitted"]
