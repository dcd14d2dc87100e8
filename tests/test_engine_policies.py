"""Invariants of the decision engine: expected max vs closed forms, brute force, equivalences, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies import CascadeRouting, OptimalCascade, PolicyError, Routing, ThresholdCascade
from cascade_routing.policies.supermodels import (
    expected_max,
    expected_max_pruned,
    expected_max_table,
    normal_draws,
    quality_samples,
    subset_table,
    supermodel_table,
)


def _phi(x):
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _Phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def clark(mu1, mu2, s1, s2, rho):
    """Clark (1961): E[max(X1, X2)] for a bivariate normal."""
    theta = math.sqrt(s1 * s1 + s2 * s2 - 2 * rho * s1 * s2)
    a = (mu1 - mu2) / theta
    return mu1 * _Phi(a) + mu2 * _Phi(-a) + theta * _phi(a)


def test_expected_max_one_model_is_the_mean():
    mean = torch.tensor([[0.3], [0.9]], dtype=torch.float64)
    std = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    got = expected_max(mean, std=std, num_samples=128)
    assert torch.allclose(got, mean[:, 0], atol=1e-12)


@pytest.mark.parametrize("rho", [0.0, 0.6, -0.4])
def test_expected_max_two_models_matches_clark(rho):
    mu1, mu2, s1, s2 = 0.4, 0.55, 0.3, 0.2
    mean = torch.tensor([[mu1, mu2]], dtype=torch.float64)
    cov = torch.tensor([[[s1 * s1, rho * s1 * s2], [rho * s1 * s2, s2 * s2]]], dtype=torch.float64)
    want = clark(mu1, mu2, s1, s2, rho)
    got_cov = float(expected_max(mean, cov=cov, num_samples=8192))
    assert abs(got_cov - want) < 2e-3, (got_cov, want)
    if rho == 0.0:
        got_std = float(expected_max(mean, std=torch.tensor([[s1, s2]], dtype=torch.float64), num_samples=8192))
        assert abs(got_std - want) < 2e-3
        # the scale is the std, not the variance: the seed code's bug would give a different value
        wrong = clark(mu1, mu2, s1 * s1, s2 * s2, 0.0)
        assert abs(got_std - wrong) > 2e-2


def test_expected_max_many_models_matches_monte_carlo():
    gen = torch.Generator().manual_seed(1)
    m = 5
    mean = torch.rand(1, m, generator=gen, dtype=torch.float64)
    a = torch.randn(m, m, generator=gen, dtype=torch.float64) * 0.3
    cov = (a @ a.T + 0.01 * torch.eye(m, dtype=torch.float64))[None]
    got = float(expected_max(mean, cov=cov, num_samples=4096))
    x = torch.distributions.MultivariateNormal(mean[0], cov[0]).sample((400_000,))
    want = float(x.max(1).values.mean())
    assert abs(got - want) < 5e-3


def test_subset_table_dp_equals_direct_max():
    gen = torch.Generator().manual_seed(0)
    b, n, k = 3, 6, 32
    xf = torch.randn(b, n, k, generator=gen, dtype=torch.float64)
    base = torch.randn(b, k, generator=gen, dtype=torch.float64)
    table = subset_table(n, 4)
    got = expected_max_table(xf, base, table)
    for s, mem in enumerate(table.members):
        cols = mem.nonzero().squeeze(1)
        direct = torch.maximum(base, xf[:, cols, :].amax(1)) if len(cols) else base
        assert torch.allclose(got[:, s], direct.mean(-1))
    assert supermodel_table(4).shape == (15, 4)
    assert supermodel_table(5, 2).shape == (15, 5)


# ----------------------------------------------------------------------------- brute force
def _random_instance(gen, b, m, kind):
    mean = torch.rand(b, m, generator=gen, dtype=torch.float64)
    cost = torch.rand(b, m, generator=gen, dtype=torch.float64) * 0.5 + 0.01
    ran = torch.rand(b, m, generator=gen) < 0.3
    if kind == "cov":
        a = torch.randn(b, m, m, generator=gen, dtype=torch.float64) * 0.2
        cov = a @ a.transpose(1, 2) + 0.01 * torch.eye(m, dtype=torch.float64)
        return QualityEstimate(mean, cov=cov), cost, ran
    std = torch.rand(b, m, generator=gen, dtype=torch.float64) * 0.3
    std = std.masked_fill(ran, 0.0)
    return QualityEstimate(mean, std=std), cost, ran


def brute_force_decision(est, cost, ran, lam, depth, num_samples=128, seed=0, force_order=False,
                         greedy=False, tol=1e-6):
    """Enumerate every supermodel S ⊇ ran (|S| <= depth) and score it directly from the draws."""
    b, m = est.mean.shape
    z = normal_draws(num_samples, m, seed, dtype=est.mean.dtype)
    x = quality_samples(est.mean, z, est.std, est.cov)
    out = []
    for i in range(b):
        r = [j for j in range(m) if ran[i, j]]
        if len(r) >= min(depth, m):
            out.append(-1)
            continue
        free = [j for j in range(m) if j not in r]
        if force_order and r:
            free = [j for j in free if j > max(r)]
        cands = []
        max_add = 1 if greedy else depth - len(r)
        for k in range(0, max_add + 1):
            for add in itertools.combinations(free, k):
                s = r + list(add)
                if not s:
                    continue
                emax = float(x[i, s, :].amax(0).mean())
                added = float(sum(cost[i, j] for j in add))
                cands.append((emax - float(lam[i]) * added, added, add))
        best = max(c[0] for c in cands)
        near = [c for c in cands if c[0] >= best - tol]
        _, _, add = min(near, key=lambda c: c[1])
        if not add:
            out.append(-1)
        elif force_order:
            out.append(min(add))
        else:
            out.append(min(add, key=lambda j: (float(cost[i, j]), j)))
    return torch.tensor(out)


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("kind", ["std", "cov"])
@pytest.mark.parametrize("variant", [{}, {"max_depth": 2}, {"force_order": True}, {"greedy": True}])
def test_cascade_routing_equals_brute_force(m, kind, variant):
    gen = torch.Generator().manual_seed(100 * m + len(variant))
    est, cost, ran = _random_instance(gen, 64, m, kind)
    lam = torch.rand(64, generator=gen, dtype=torch.float64) * 2
    pol = CascadeRouting(**variant)
    got = pol.decide(est, cost, ran, lam)
    depth = variant.get("max_depth", m)
    want = brute_force_decision(est, cost, ran, lam, depth, force_order=variant.get("force_order", False),
                                greedy=variant.get("greedy", False))
    assert torch.equal(got, want)
    assert (got != -1).any() and (got == -1).any()  # the instance exercises both outcomes


@pytest.mark.parametrize("kind", ["std", "cov"])
@pytest.mark.parametrize("variant", [{"max_depth": 4}, {"max_depth": 3, "force_order": True}, {"greedy": True}])
def test_pruning_never_changes_the_decision(kind, variant):
    gen = torch.Generator().manual_seed(7)
    for m in (4, 6):
        est, cost, ran = _random_instance(gen, 256, m, kind)
        for lam_scale in (0.05, 0.5, 3.0):
            lam = torch.rand(256, generator=gen, dtype=torch.float64) * lam_scale
            plain = CascadeRouting(**variant).decide(est, cost, ran, lam)
            pruned = CascadeRouting(prune=True, **variant).decide(est, cost, ran, lam)
            assert torch.equal(plain, pruned)


def test_pruned_expected_max_skips_extensions_and_keeps_survivors_exact():
    gen = torch.Generator().manual_seed(11)
    b, n, k = 64, 7, 64
    xf = torch.randn(b, n, k, generator=gen, dtype=torch.float64) * 0.3
    base = torch.randn(b, k, generator=gen, dtype=torch.float64) * 0.3
    cost_free = torch.rand(b, n, generator=gen, dtype=torch.float64)
    lam = torch.full((b,), 0.05, dtype=torch.float64)
    table = subset_table(n, 5)
    dense = expected_max_table(xf, base, table)
    pruned = expected_max_pruned(xf, base, table, cost_free, lam, 1e-6)
    kept = torch.isfinite(pruned)
    assert torch.allclose(pruned[kept], dense[kept])
    assert 0.05 < kept.double().mean() < 0.95  # the lemma removes a real share of supermodels here
    values_dense = dense - lam[:, None] * (cost_free @ table.members.double().T)
    values_pruned = pruned - lam[:, None] * (cost_free @ table.members.double().T)
    assert torch.equal(values_dense.argmax(1), values_pruned.argmax(1))


def test_routing_equals_cascade_routing_depth_one():
    gen = torch.Generator().manual_seed(3)
    est, cost, _ = _random_instance(gen, 500, 5, "std")
    ran = torch.zeros(500, 5, dtype=torch.bool)
    lam = torch.rand(500, generator=gen, dtype=torch.float64) * 3
    assert torch.equal(Routing().decide(est, cost, ran, lam), CascadeRouting(max_depth=1).decide(est, cost, ran, lam))
    ran1 = torch.zeros_like(ran)
    ran1[:, 2] = True
    assert (Routing().decide(est, cost, ran1, lam) == -1).all()
    assert (CascadeRouting(max_depth=1).decide(est, cost, ran1, lam) == -1).all()


def brute_force_prefix(est, cost, ran, lam, num_samples=128, tol=1e-6):
    b, m = est.mean.shape
    x = quality_samples(est.mean, normal_draws(num_samples, m, 0, dtype=est.mean.dtype), est.std, est.cov)
    out = []
    for i in range(b):
        t = int(ran[i].sum())
        cands = []
        for k in range(max(t - 1, 0), m):
            if k + 1 == 0:
                continue
            emax = float(x[i, : k + 1, :].amax(0).mean())
            added = float(cost[i, t: k + 1].sum())
            cands.append((emax - float(lam[i]) * added, added, k))
        best = max(c[0] for c in cands)
        k = min((c for c in cands if c[0] >= best - tol), key=lambda c: c[1])[2]
        out.append(t if k >= t and t < m else -1)
    return torch.tensor(out)


@pytest.mark.parametrize("m", [3, 4])
def test_optimal_cascade_equals_cascade_routing_over_prefixes(m):
    gen = torch.Generator().manual_seed(m)
    est, cost, _ = _random_instance(gen, 200, m, "std")
    t = torch.randint(0, m, (200,), generator=gen)
    ran = torch.arange(m)[None, :] < t[:, None]
    lam = torch.rand(200, generator=gen, dtype=torch.float64) * 2
    got = OptimalCascade().decide(est, cost, ran, lam)
    assert torch.equal(got, brute_force_prefix(est, cost, ran, lam))
    # with a single model in the pool beyond the ran prefix, both policies agree with cascade routing
    # restricted by force_order to adding the next model (its supermodels are then prefixes)
    ran_all_but_last = torch.arange(m)[None, :] < (m - 1)
    ran_all_but_last = ran_all_but_last.expand(200, m)
    assert torch.equal(OptimalCascade().decide(est, cost, ran_all_but_last, lam),
                       CascadeRouting(force_order=True).decide(est, cost, ran_all_but_last, lam))


def test_threshold_cascade_rule():
    mean = torch.tensor([[0.5, 0.9, 0.2], [0.95, 0.1, 0.3], [0.1, 0.2, 0.3]])
    est = QualityEstimate(mean)
    cost = torch.ones(3, 3)
    ran = torch.tensor([[True, False, False], [True, False, False], [True, True, True]])
    got = ThresholdCascade().decide(est, cost, ran, torch.tensor([0.2, 0.2, 0.2]))
    assert got.tolist() == [1, -1, -1]
    assert ThresholdCascade().select(est, ran).tolist() == [0, 0, 2]
    with pytest.raises(PolicyError, match="prefix"):
        ThresholdCascade().decide(est, cost, torch.tensor([[False, True, False]] * 3), 0.1)


def test_select_is_best_posthoc_among_ran():
    est = QualityEstimate(torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.9]]))
    ran = torch.tensor([[True, False, True], [False, False, False]])
    assert CascadeRouting().select(est, ran).tolist() == [2, -1]


# ----------------------------------------------------------------------------- errors
def test_clear_errors():
    est = QualityEstimate(torch.rand(2, 3))
    cost = torch.rand(2, 3)
    ran = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(PolicyError, match="λ.*>= 0"):
        CascadeRouting().decide(est, cost, ran, -1.0)
    bad = est.mean.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(PolicyError, match="NaN in the quality mean.*row 1"):
        CascadeRouting().decide(QualityEstimate(bad), cost, ran, 1.0)
    with pytest.raises(PolicyError, match="NaN in the cost"):
        Routing().decide(est, torch.full((2, 3), float("nan")), ran, 1.0)
    big = QualityEstimate(torch.rand(2, 13))
    with pytest.raises(PolicyError, match="max_depth.*greedy=True"):
        CascadeRouting().decide(big, torch.rand(2, 13), torch.zeros(2, 13, dtype=torch.bool), 1.0)
    # with max_depth or greedy the same pool works
    CascadeRouting(max_depth=3).decide(big, torch.rand(2, 13), torch.zeros(2, 13, dtype=torch.bool), 1.0)
    CascadeRouting(greedy=True).decide(big, torch.rand(2, 13), torch.zeros(2, 13, dtype=torch.bool), 1.0)
