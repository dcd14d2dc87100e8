"""``benchmarks/bench_lookahead.py``: the look-ahead value and its policy's special cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies.cascade_routing import CascadeRouting
from tests.script_helpers import load_script


def _bench():
    return load_script("benchmarks/bench_lookahead.py")


def test_expected_max_of_a_normal_and_a_constant_matches_sampling():
    bench = _bench()
    mu = torch.tensor([0.3, 0.6, 0.5, 0.9], dtype=torch.float64)
    sigma = torch.tensor([0.2, 0.05, 0.3, 0.1], dtype=torch.float64)
    a = torch.tensor([0.5, 0.2, -math.inf, 0.95], dtype=torch.float64)
    draws = mu + sigma * torch.randn(400_000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampled = torch.maximum(draws, a.clamp_min(-1e9)).mean(0)
    np.testing.assert_allclose(bench.expected_max_normal(mu, sigma, a), sampled, atol=2e-3)


def _random_states(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(n, m, generator=g, dtype=torch.float64)
    cost = (torch.rand(n, m, generator=g, dtype=torch.float64) + 0.1) * torch.arange(1, m + 1, dtype=torch.float64)
    ran = torch.rand(n, m, generator=g) < 0.3
    return QualityEstimate(mean=mean, std=torch.zeros_like(mean)), cost, ran


@pytest.mark.parametrize("pool", [None, (0, 2, 4)])
def test_without_uncertainty_it_decides_exactly_as_cascade_routing(pool):
    """α = 0: no credit for what an answer reveals, so every decision is cascade routing's under
    point estimates (uncertainty none), at every λ, run set and depth limit."""
    bench = _bench()
    m = 5
    estimate, cost, ran = _random_states(400, m, seed=1)
    look = bench.LookaheadPolicy(np.ones((m, m)), 0.0, pool, max_depth=3)
    cascade_routing = CascadeRouting(max_depth=3, pool=pool)
    for lam in (0.0, 0.01, 0.05, 0.2, 1.0):
        expected = cascade_routing.decide(estimate, cost, ran, lam)
        assert torch.equal(look.decide(estimate, cost, ran, lam), expected), lam
        assert (expected >= 0).any() and (expected < 0).any()  # the comparison covers both kinds


def test_with_uncertainty_a_cheap_informative_model_goes_first():
    """Two models: a cheap one at 0.6 whose answer resolves much of its uncertainty, an expensive one
    at 0.7. Myopic cascade routing runs the expensive one; the look-ahead credits the chance that the
    cheap answer is good enough (a cascade's start), and still stops at once where it is not worth it."""
    bench = _bench()
    estimate = QualityEstimate(mean=torch.tensor([[0.6, 0.7]], dtype=torch.float64),
                               std=torch.zeros(1, 2, dtype=torch.float64))
    cost = torch.tensor([[1.0, 10.0]], dtype=torch.float64)
    nothing = torch.zeros(1, 2, dtype=torch.bool)
    lam = 0.005
    assert CascadeRouting().decide(estimate, cost, nothing, lam).item() == 1
    informative = bench.LookaheadPolicy(np.full((2, 2), 0.5), 1.0, None)
    assert informative.decide(estimate, cost, nothing, lam).item() == 0
    uninformative = bench.LookaheadPolicy(np.full((2, 2), 1e-6), 1.0, None)
    assert uninformative.decide(estimate, cost, nothing, lam).item() == 1
