"""The fused CPU kernels (numba) against the torch path: E[max] tables, the S* choice, whole simulations,
and the tensor-backed E[max] cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.evaluation import simulate
from cascade_routing.policies import CascadeRouting
from cascade_routing.policies import emax_numba
from cascade_routing.policies import cascade_routing as cr
from cascade_routing.policies.supermodels import (
    _expected_max_table_torch,
    emax_backend,
    expected_max_table,
    subset_table,
)
from engine_helpers import make_data, synthetic_pair

pytestmark = pytest.mark.skipif(not emax_numba.AVAILABLE, reason="numba not importable")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,r", [(1, 1), (4, 2), (6, 6), (11, 5), (9, 3)])
@pytest.mark.parametrize("with_base", [False, True])
def test_kernel_table_equals_torch(monkeypatch, dtype, n, r, with_base):
    gen = torch.Generator().manual_seed(n * 10 + r)
    x = torch.randn(7, n, 32, generator=gen, dtype=dtype)
    base = torch.randn(7, 32, generator=gen, dtype=dtype) if with_base else None
    table = subset_table(n, r)
    monkeypatch.setenv("CASCADE_ROUTING_EMAX_BACKEND", "numba")
    fused = expected_max_table(x, base, table)
    ref = _expected_max_table_torch(x, base, table)
    assert fused.shape == ref.shape == (7, table.members.shape[0])
    assert torch.equal(torch.isinf(fused), torch.isinf(ref))
    finite = torch.isfinite(ref)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(fused[finite], ref[finite], atol=tol, rtol=0)
    # the direct definition for one subset: E[max over its members and the base]
    s = table.members.shape[0] - 1
    members = table.members[s].nonzero().squeeze(1)
    direct = x[:, members, :].amax(1)
    if base is not None:
        direct = torch.maximum(direct, base)
    assert torch.allclose(fused[:, s], direct.mean(-1), atol=tol, rtol=0)


def test_kernel_threads_split_rows_identically():
    x = torch.randn(64, 8, 16, generator=torch.Generator().manual_seed(1))
    from cascade_routing.policies.supermodels import _kernel_layout

    prefix, starts, widest, s = _kernel_layout(8, 4)
    one = emax_numba.expected_max_table_numba(x.numpy(), None, prefix, starts, widest, s, 1)
    two = emax_numba.expected_max_table_numba(x.numpy(), None, prefix, starts, widest, s, 2)
    assert np.array_equal(one, two)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_choose_equals_torch_rule_with_exact_ties(dtype):
    rng = np.random.default_rng(0)
    emax = rng.random((200, 30)).astype(dtype)
    added = rng.choice([0.0, 1e-3, 2e-3, 5e-3], size=(200, 30)).astype(dtype)
    emax[:, 5] = emax[:, 7]  # exact ties in value and cost: the first row must win
    added[:, 5] = added[:, 7]
    lam = rng.uniform(0, 50, 200).astype(dtype)
    invalid = rng.random((200, 30)) < 0.2
    policy = CascadeRouting(tie_tol=1e-3)
    for inv in (None, invalid):
        got = emax_numba.choose(emax, added, lam, inv, policy.tie_tol)
        values = torch.from_numpy(emax) - torch.from_numpy(lam)[:, None] * torch.from_numpy(added)
        if inv is not None:
            values = values.masked_fill(torch.from_numpy(inv), -math.inf)
        near = values >= values.amax(1, keepdim=True) - policy.tie_tol
        want = torch.where(near, torch.from_numpy(added), torch.full_like(values, math.inf)).argmin(1)
        assert np.array_equal(got, want.numpy())


@pytest.mark.parametrize("kw", [dict(max_depth=3), dict(max_depth=2, force_order=True), dict(greedy=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simulation_decisions_equal_torch_path(monkeypatch, kw, dtype):
    quality, cost = make_data(400, 6, seed=3)
    qe, ce = synthetic_pair(quality, cost, "medium", 100)
    for est in (qe, ce):
        for name, value in list(vars(est).items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(est, name, value.to(dtype))
    runs = {}
    for backend in ("torch", "numba"):
        monkeypatch.setenv("CASCADE_ROUTING_EMAX_BACKEND", backend)
        runs[backend] = simulate(CascadeRouting(**kw), qe, ce, quality, cost, 40.0)
    assert runs["numba"].ran.sum() > len(quality)  # some queries run more than one model
    assert torch.equal(runs["torch"].order, runs["numba"].order)
    assert torch.equal(runs["torch"].answer, runs["numba"].answer)


def test_covariance_beliefs_equal_torch_path(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    b, m = 50, 5
    mean = torch.rand(b, m, generator=gen)
    a = torch.randn(b, m, m, generator=gen) * 0.2
    est = QualityEstimate(mean, cov=a @ a.transpose(1, 2))
    cost = torch.rand(b, m, generator=gen) * 1e-3
    ran = torch.zeros(b, m, dtype=torch.bool)
    ran[::2, 1] = True
    out = {}
    for backend in ("torch", "numba"):
        monkeypatch.setenv("CASCADE_ROUTING_EMAX_BACKEND", backend)
        out[backend] = CascadeRouting(max_depth=3).decide(est, cost, ran, 30.0)
    assert torch.equal(out["torch"], out["numba"])


def test_cached_emax_computes_only_missing_pairs():
    calls = []

    def compute(sel):
        calls.append(sel.clone())
        return torch.stack([torch.arange(4.0) + float(k) for k in keys_now[sel]])

    cache: dict = {}
    states = torch.tensor([0, 0, 3, 1])
    rows = torch.tensor([5, 2, 5, 9])
    keys_now = states * 100 + rows
    first = cr._cached_emax(cache, 4, states, rows, compute)
    assert torch.equal(first[:, 0], keys_now.float())
    states2, rows2 = torch.tensor([1, 0, 7, 3]), torch.tensor([9, 2, 2, 5])
    keys_now = states2 * 100 + rows2
    second = cr._cached_emax(cache, 4, states2, rows2, compute)
    assert torch.equal(second[:, 0], keys_now.float())
    assert [c.tolist() for c in calls] == [[0, 1, 2, 3], [2]]  # only (state 7, row 2) was new
    third = cr._cached_emax(cache, 4, states2, rows2, compute)
    assert torch.equal(third, second) and len(calls) == 2


def test_backend_switch_and_bad_value(monkeypatch):
    monkeypatch.setenv("CASCADE_ROUTING_EMAX_BACKEND", "torch")
    assert emax_backend() == "torch"
    monkeypatch.setenv("CASCADE_ROUTING_EMAX_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="CASCADE_ROUTING_EMAX_BACKEND"):
        emax_backend()
