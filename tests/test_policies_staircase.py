"""The staircase memo of cascade routing (policies/frontier.py): same decisions as searching every supermodel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies import emax_numba
from cascade_routing.policies.cascade_routing import CascadeRouting
from cascade_routing.policies.frontier import cached_pairs, staircase


def _pick_all(emax, added, lam, invalid, tol):
    """The rule over every row, written out: least added among values >= max - tol, then the lowest row."""
    values = emax - lam[:, None] * added
    if invalid is not None:
        values = values.masked_fill(invalid, -math.inf)
    near = values >= values.amax(1, keepdim=True) - tol
    return torch.where(near, added, torch.full_like(added, math.inf)).argmin(1)


@pytest.mark.parametrize("tol", [0.0, 1e-6, 0.05])
def test_the_staircase_holds_the_row_every_lambda_picks(tol):
    gen = torch.Generator().manual_seed(0)
    b, s = 64, 40
    # coarse grids make exact ties in E[max] and in added cost common
    emax = (torch.randint(0, 6, (b, s), generator=gen) / 5.0).float()
    added = (torch.randint(0, 5, (b, s), generator=gen) * 1e-3).float()
    added[:, 0] = 0.0
    invalid = torch.rand(b, s, generator=gen) < 0.2
    invalid[:, 0] = False
    rows, present = staircase(emax, added, invalid)
    assert rows.shape[1] < s and bool(present[:, 0].all())
    assert bool((rows[:, 1:] > rows[:, :-1])[present[:, 1:]].all())  # increasing row order
    e = emax.gather(1, rows).masked_fill(~present, -math.inf)
    a = added.gather(1, rows).masked_fill(~present, 0.0)
    for lam_value in (0.0, 1.0, 50.0, 200.0, 1e4, 1e30):
        lam = torch.full((b,), lam_value)
        want = _pick_all(emax, added, lam, invalid, tol)
        got_torch = rows.gather(1, _pick_all(e, a, lam, None, tol)[:, None]).squeeze(1)
        got_numba = rows.gather(1, torch.from_numpy(emax_numba.choose(e.numpy(), a.numpy(), lam.numpy(), None, tol))[:, None]).squeeze(1)
        assert torch.equal(got_torch, want), lam_value
        assert torch.equal(got_numba, want), lam_value


def test_without_uncertainty_the_staircase_is_short():
    # E[max] = max of means takes at most n + 1 values along the subsets, so the staircase has <= n + 1 rows
    policy = CascadeRouting(max_depth=4, num_samples=16)
    gen = torch.Generator().manual_seed(1)
    b, m = 32, 8
    est = QualityEstimate(torch.rand(b, m, generator=gen))
    cost = torch.rand(b, m, generator=gen) * 1e-3
    ran = torch.zeros(b, m, dtype=torch.bool)
    emax, added, action = policy._staircase_rows(est, cost, ran, torch.arange(b), 0, 4)
    assert emax.shape[1] <= m + 1
    assert bool((action[emax > -math.inf] >= 0).all())  # nothing ran: every present choice runs a model


def _random_states(gen, b, m, max_run):
    ran = torch.zeros(b, m, dtype=torch.bool)
    for i in range(b):
        k = int(torch.randint(0, max_run + 1, (1,), generator=gen))
        ran[i, torch.randperm(m, generator=gen)[:k]] = True
    return ran


@pytest.mark.parametrize("uncertainty", ["none", "std", "cov"])
@pytest.mark.parametrize("options", [{}, {"pool": (0, 2, 5)}, {"force_order": True}, {"greedy": True}])
def test_memoised_decisions_equal_the_plain_search(uncertainty, options):
    gen = torch.Generator().manual_seed(2)
    b, m = 48, 7
    mean = torch.rand(b, m, generator=gen)
    if uncertainty == "std":
        est = QualityEstimate(mean, std=0.1 * torch.rand(b, m, generator=gen))
    elif uncertainty == "cov":
        a = 0.1 * torch.randn(b, m, m, generator=gen)
        est = QualityEstimate(mean, cov=a @ a.transpose(1, 2) + 1e-3 * torch.eye(m))
    else:
        est = QualityEstimate(mean)
    cost = torch.rand(b, m, generator=gen) * 1e-3
    ran = _random_states(gen, b, m, 3)
    rows = torch.arange(b)
    policy = CascadeRouting(max_depth=4, num_samples=32, **options)
    cache: dict = {}
    for lam in (0.0, 10.0, 300.0, 3e3, 1e30):
        lam_rows = torch.full((b,), lam) * (1 + torch.rand(b, generator=gen))
        plain = policy.decide(est, cost, ran, lam_rows)
        memo = policy.decide(est, cost, ran, lam_rows, cache=cache, rows=rows)
        assert torch.equal(plain, memo), lam
        # a depth-limited call (the routing guard) shares the cache under its own table width
        assert torch.equal(policy.decide(est, cost, ran, lam_rows, max_depth=1),
                           policy.decide(est, cost, ran, lam_rows, cache=cache, rows=rows, max_depth=1))
    assert any(key[0] == "staircase" for key in cache)


def test_cached_pairs_pads_narrower_rows_and_widens_the_stored_ones():
    calls = []

    def compute_width(width):
        def compute(sel):
            calls.append(sel.tolist())
            vals = torch.arange(width, dtype=torch.float32).repeat(sel.numel(), 1) + 10 * sel[:, None]
            return vals, torch.full((sel.numel(), width), 7, dtype=torch.long)
        return compute

    cache: dict = {}
    states, rows = torch.tensor([0, 1, 0]), torch.tensor([3, 3, 3])
    first = cached_pairs(cache, ("k",), states, rows, compute_width(2), pads=(-math.inf, -1))
    assert calls == [[0, 1]] and first[0].shape == (3, 2) and torch.equal(first[0][2], first[0][0])
    wider = cached_pairs(cache, ("k",), torch.tensor([1, 2]), torch.tensor([3, 3]), compute_width(4),
                         pads=(-math.inf, -1))
    assert calls[-1] == [1] and wider[0].shape == (2, 4)
    assert torch.equal(wider[0][0], torch.tensor([10.0, 11.0, -math.inf, -math.inf]))  # stored row, widened
    assert torch.equal(wider[1][0], torch.tensor([7, 7, -1, -1]))
    assert torch.equal(wider[0][1], torch.tensor([10.0, 11.0, 12.0, 13.0]))  # the new pair at full width
    again = cached_pairs(cache, ("k",), states, rows, compute_width(1), pads=(-math.inf, -1))
    assert len(calls) == 2 and again[0].shape == (3, 4)
