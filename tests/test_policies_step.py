"""The shared decision step (``policies.step``): per-row steps and λ, candidate sets, its errors.

The references are the policy's own ``decide``/``select`` called one row at a time with the λ the
step rule prescribes, so a mistake in grouping rows, in λ lookup or in mapping columns back shows.
"""

from __future__ import annotations

import pytest
import torch

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies import CascadeRouting, FittedLambda, OptimalCascade, Policy, PolicyError, Routing
from cascade_routing.policies.step import decide_step, select_step

M = 4


def _beliefs(b: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.rand(b, M, generator=gen, dtype=torch.float64)
    std = 0.05 + 0.2 * torch.rand(b, M, generator=gen, dtype=torch.float64)
    cost = torch.tensor([0.01, 0.03, 0.1, 0.4], dtype=torch.float64).expand(b, M) * (
        0.5 + torch.rand(b, M, generator=gen, dtype=torch.float64))
    ran = torch.rand(b, M, generator=gen) < 0.35
    ran[: b // 4] = False  # some rows at step 0
    use_low = torch.rand(b, generator=gen) < 0.5
    return QualityEstimate(mean, std), cost, ran, use_low


# per-step λ with low != high, so a wrong step or a wrong mix flag changes λ
FITTED = FittedLambda(torch.tensor([0.2, 1.0, 3.0]), torch.tensor([0.5, 2.0, 6.0]), gamma=0.5)


@pytest.mark.parametrize("policy", [CascadeRouting(), OptimalCascade(), Routing(), CascadeRouting(pool=(0, 2, 3))],
                         ids=["cascade_routing", "optimal_cascade", "routing", "cascade_routing_pool"])
def test_rows_at_different_steps_get_the_lambda_of_their_own_step(policy: Policy):
    est, cost, ran, use_low = _beliefs(40)
    if getattr(policy, "pool", None) is not None:
        ran[:, 1] = False  # model 1 is outside the pool: it cannot have run
    if isinstance(policy, OptimalCascade):
        ran = torch.arange(M)[None, :] < ran.sum(1, keepdim=True)  # a cascade runs prefixes
    assert len(torch.unique(ran.sum(1))) >= 3
    nxt, lams = decide_step(policy, est, cost, ran, FITTED, use_low)
    for i in range(40):
        t = int(ran[i].sum())
        lam_i = FITTED.lam_for(t, use_low[i:i + 1])
        want = policy.decide(est.take(torch.tensor([i])), cost[i:i + 1], ran[i:i + 1], lam_i)
        assert int(nxt[i]) == int(want[0]), i
        assert float(lams[i]) == float(lam_i[0])
        assert int(nxt[i]) < 0 or not bool(ran[i, nxt[i]])


def test_lam_rows_replace_the_fitted_lambda_per_row_and_step():
    est, cost, ran, use_low = _beliefs(30, seed=1)
    lam_rows = torch.rand(30, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 4
    _, lams = decide_step(CascadeRouting(), est, cost, ran, FITTED, use_low, lam_rows=lam_rows)
    steps = ran.sum(1).clamp_max(1)  # step >= T uses the last column
    assert torch.equal(lams, lam_rows[torch.arange(30), steps])


def test_candidates_restrict_each_row_to_its_models_and_map_indices_back():
    est, cost, ran, use_low = _beliefs(24, seed=2)
    candidates = torch.ones(24, M, dtype=torch.bool)
    candidates[::3, 2] = False  # every third row lost model 2
    candidates[1::3, 0] = False  # others lost model 0
    candidates[5] = False  # one row lost every model
    ran &= candidates
    policy = CascadeRouting()
    nxt, lams = decide_step(policy, est, cost, ran, FITTED, use_low, candidates=candidates)
    choice = select_step(policy, est, ran, candidates=candidates)
    assert int(nxt[5]) == -1 and float(lams[5]) == 0.0 and int(choice[5]) == -1
    for i in [i for i in range(24) if i != 5]:
        cols = candidates[i].nonzero().squeeze(1)
        sub = est.take(torch.tensor([i]), cols)
        lam_i = FITTED.lam_for(int(ran[i].sum()), use_low[i:i + 1])
        want = policy.decide(sub, cost[i:i + 1, cols], ran[i:i + 1, cols], lam_i)
        assert int(nxt[i]) == (-1 if int(want[0]) < 0 else int(cols[want[0]])), i
        assert int(nxt[i]) < 0 or bool(candidates[i, nxt[i]])
        picked = policy.select(sub, ran[i:i + 1, cols])
        assert int(choice[i]) == (-1 if int(picked[0]) < 0 else int(cols[picked[0]])), i


def test_a_cache_with_dropped_models_is_refused():
    est, cost, ran, use_low = _beliefs(8, seed=3)
    candidates = torch.ones(8, M, dtype=torch.bool)
    candidates[0, 1] = False
    ran &= candidates
    with pytest.raises(PolicyError, match="cache needs every model"):
        decide_step(CascadeRouting(), est, cost, ran, FITTED, use_low, candidates=candidates, cache={},
                    rows=torch.arange(8))


class _Repeats(Policy):
    """A broken policy: always asks for model 0 again."""

    def decide(self, estimate, cost, ran, lam, **_):
        return torch.zeros(estimate.mean.shape[0], dtype=torch.long)


def test_a_policy_choosing_a_model_that_already_ran_is_an_error():
    est, cost, ran, use_low = _beliefs(6, seed=4)
    ran[2, 0] = True
    with pytest.raises(PolicyError, match="already ran"):
        decide_step(_Repeats(), est, cost, ran, FITTED, use_low)
