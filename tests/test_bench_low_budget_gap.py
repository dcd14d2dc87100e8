"""``benchmarks/bench_low_budget_gap.py``: the Platt maps it fits and the guard it simulates."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cascade_routing.interfaces import QualityEstimate
from tests.script_helpers import load_script


def _bench():
    return load_script("benchmarks/bench_low_budget_gap.py")


class _Distorted:
    """Means that are the true probabilities distorted one way for run models (logit halved) and
    another for models not run (logit shifted by −1)."""

    def __init__(self, p: np.ndarray) -> None:
        self.logit = torch.logit(torch.as_tensor(p, dtype=torch.float64))
        self.models = [f"m{j}" for j in range(p.shape[1])]

    def estimate(self, rows, ran):
        logit = self.logit[torch.as_tensor(rows)]
        return QualityEstimate(torch.sigmoid(torch.where(torch.as_tensor(ran), logit / 2, logit - 1.0)))


def test_platt_maps_undo_a_distortion_per_model_and_state():
    bench = _bench()
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, size=(300, 3))
    est = _Distorted(p)
    ab = bench.fit_platt_maps(est, np.arange(300), p, ridge=0.0)  # soft targets: the true probabilities
    assert ab.shape == (2, 3, 2)
    assert torch.allclose(ab[1, :, 0], torch.full((3,), 2.0, dtype=torch.float64), atol=1e-3)  # run: a = 2, b = 0
    assert torch.allclose(ab[1, :, 1], torch.zeros(3, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(ab[0, :, 0], torch.ones(3, dtype=torch.float64), atol=1e-3)  # not run: a = 1, b = 1
    assert torch.allclose(ab[0, :, 1], torch.ones(3, dtype=torch.float64), atol=1e-3)
    mapped = bench.RecalibratedMeans(est, ab)
    ran = torch.tensor([[True, False, False], [False, True, True]])
    out = mapped.estimate(torch.tensor([4, 7]), ran).mean
    assert torch.allclose(out, torch.as_tensor(p[[4, 7]]), atol=1e-3)


def test_identity_maps_leave_the_estimate_unchanged_and_keep_its_uncertainty():
    bench = _bench()

    class _WithStd:
        models = ["a", "b"]

        def estimate(self, rows, ran):
            return QualityEstimate(torch.tensor([[0.2, 0.9]]), std=torch.tensor([[0.1, 0.05]]))

    ab = torch.zeros(2, 2, 2, dtype=torch.float64)
    ab[..., 0] = 1.0
    out = bench.RecalibratedMeans(_WithStd(), ab).estimate(torch.tensor([0]), torch.tensor([[True, False]]))
    assert torch.allclose(out.mean, torch.tensor([[0.2, 0.9]]), atol=1e-6)
    assert torch.equal(out.std, torch.tensor([[0.1, 0.05]]))


def test_the_guard_without_margin_takes_routing_where_its_calibration_score_is_higher():
    bench = _bench()

    def fit(cal_quality, routing_score, depth=None):
        return SimpleNamespace(calibration_quality=cal_quality, info={"routing_score": routing_score}, max_depth=depth)

    cost = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    cr = SimpleNamespace(fitted=[fit(0.5, 0.6), fit(0.7, 0.7), fit(0.9, 0.95, depth=1)],
                         per_query_quality=np.array([[0.4, 0.4], [0.8, 0.8], [0.9, 0.9]]), per_query_cost=cost)
    rt = SimpleNamespace(per_query_quality=np.array([[0.6, 0.6], [0.6, 0.6], [0.8, 0.8]]), per_query_cost=cost)
    rt.qualities = rt.per_query_quality.mean(1)
    ref = SimpleNamespace(c_min=1.0, c_max=3.0, q_lowest=0.0)
    out = bench.guard_without_margin({"cascade_routing": cr, "routing": rt}, ref)
    # fires at the first budget only: a tie keeps cascade routing, a fit that already is routing (depth 1) is left
    assert out["fires"] == "1 of 3 budgets"
    assert out["worst_vs_routing"] == pytest.approx(0.0)
