"""bias_by_ran_set_size: the mean signed error of an estimator's means at each ran-set size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cascade_routing.evaluation.estimate_bias import bias_by_ran_set_size, random_sets_of_size
from cascade_routing.interfaces import QualityEstimate


class OffAtOneRun:
    """Returns the true quality, shifted by ``run_shift`` on run cells and ``unrun_shift`` on unrun
    cells, but only where exactly one model ran (elsewhere exact)."""

    def __init__(self, quality: np.ndarray, run_shift: float, unrun_shift: float) -> None:
        self.quality = torch.from_numpy(quality)
        self.models = [f"m{j}" for j in range(quality.shape[1])]
        self.run_shift, self.unrun_shift = run_shift, unrun_shift

    def estimate(self, queries: torch.Tensor, ran: torch.Tensor) -> QualityEstimate:
        mean = self.quality[queries].clone()
        one = ran.sum(1, keepdim=True) == 1
        mean += torch.where(one & ran, self.run_shift, 0.0) + torch.where(one & ~ran, self.unrun_shift, 0.0)
        return QualityEstimate(mean)


def test_a_bias_only_at_one_run_model_shows_only_at_size_one():
    quality = np.random.default_rng(0).integers(0, 2, size=(50, 4)).astype(np.float64)
    report = bias_by_ran_set_size(OffAtOneRun(quality, -0.1, 0.03), quality, draws=3)
    assert [r.size for r in report] == [0, 1, 2, 3, 4]
    one = report[1]
    assert one.run_bias == pytest.approx(-0.1) and one.unrun_bias == pytest.approx(0.03)
    assert (one.run_cells, one.unrun_cells) == (150, 450)
    for r in report[:1] + report[2:]:
        for value in (r.run_bias, r.unrun_bias):
            assert math.isnan(value) or value == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(report[0].run_bias) and math.isnan(report[4].unrun_bias)  # no such cells


def test_random_sets_have_the_asked_size_and_bad_input_is_refused():
    sets = random_sets_of_size(200, 5, 2, torch.Generator().manual_seed(1))
    assert torch.equal(sets.sum(1), torch.full((200,), 2))
    assert sets.any(0).all()  # every model appears in some set
    with pytest.raises(ValueError, match="size must lie in 0..5"):
        random_sets_of_size(3, 5, 6, torch.Generator())
    quality = np.zeros((3, 2))
    with pytest.raises(ValueError, match="draws must be >= 1"):
        bias_by_ran_set_size(OffAtOneRun(quality, 0, 0), quality, draws=0)
    with pytest.raises(ValueError, match=r"quality must be \[N, M\]"):
        bias_by_ran_set_size(OffAtOneRun(quality, 0, 0), np.zeros(3))


class NoisyTruth:
    """The true quality plus independent noise: calibrated per cell, optimistic once maximised."""

    def __init__(self, quality: np.ndarray, scale: float, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.mean = torch.from_numpy(quality + scale * rng.standard_normal(quality.shape))

    def estimate(self, queries: torch.Tensor, ran: torch.Tensor) -> QualityEstimate:
        return QualityEstimate(self.mean[queries])


def test_selected_bias_is_the_run_bias_for_one_model_and_grows_with_the_maximum_over_noise():
    quality = np.random.default_rng(1).integers(0, 2, size=(2000, 6)).astype(np.float64)
    shifted = bias_by_ran_set_size(OffAtOneRun(quality, -0.1, 0.0), quality, draws=1)
    assert shifted[1].selected_bias == pytest.approx(-0.1)
    assert math.isnan(shifted[0].selected_bias) and shifted[3].selected_bias == pytest.approx(0.0, abs=1e-12)
    noisy = bias_by_ran_set_size(NoisyTruth(quality, 0.3), quality, draws=1)
    assert abs(noisy[1].selected_bias) < 0.03  # one model: no maximum, no curse
    curse = [r.selected_bias for r in noisy[1:]]
    assert curse[-1] > 0.2 and all(b > a for a, b in zip(curse[1:], curse[2:]))  # grows with |R|
