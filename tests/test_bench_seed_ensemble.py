"""``benchmarks/bench_seed_ensemble.py``: the seed ensemble's estimate and the AUROCs it is reported by."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.interfaces import QualityEstimate
from cascade_routing.training.heldout import estimate_aurocs
from tests.script_helpers import load_script


def _bench():
    return load_script("benchmarks/bench_seed_ensemble.py")


class _Table:
    """A fixed estimator: mean = ``ex`` with no model run, ``post`` for run cells, ``ex`` otherwise."""

    def __init__(self, ex, post, models=("a", "b")):
        self.ex, self.post, self.models = torch.as_tensor(ex), torch.as_tensor(post), list(models)

    def estimate(self, queries, ran):
        rows = torch.as_tensor(queries)
        return QualityEstimate(torch.where(torch.as_tensor(ran), self.post[rows], self.ex[rows]).float())


def test_the_ensemble_averages_its_members_probabilities_per_ran_set():
    bench = _bench()
    g = torch.Generator().manual_seed(0)
    members = [_Table(torch.rand(6, 2, generator=g), torch.rand(6, 2, generator=g)) for _ in range(3)]
    ensemble = bench.SeedEnsemble(members)
    rows = torch.tensor([0, 3, 5])
    ran = torch.tensor([[False, False], [True, False], [True, True]])
    expected = torch.stack([m.estimate(rows, ran).mean for m in members]).mean(0)
    torch.testing.assert_close(ensemble.estimate(rows, ran).mean, expected)
    assert ensemble.estimate(rows, ran).std is None


def test_the_ensemble_refuses_one_member_and_members_of_other_models():
    bench = _bench()
    table = _Table(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="at least 2 members"):
        bench.SeedEnsemble([table])
    with pytest.raises(ValueError, match="member 1 estimates models"):
        bench.SeedEnsemble([table, _Table(torch.zeros(2, 2), torch.zeros(2, 2), models=("a", "c"))])


def test_aurocs_separate_ex_ante_own_answer_and_post_hoc_information():
    """The AUROCs the benchmark reports (``heldout.estimate_aurocs``, also the evaluation's
    ``estimator_metrics.json``): ex-ante the estimate is the same for every row (AUROC 0.5); once a
    model ran it is its label (AUROC 1), both after its own answer alone and over the evaluation
    ran-sets' run cells."""
    rng = np.random.default_rng(0)
    quality = (rng.random((200, 2)) < 0.5).astype(float)
    table = _Table(torch.full((200, 2), 0.5), torch.as_tensor(quality))
    eval_ran = torch.as_tensor(rng.random((200, 2)) < 0.6)
    out = estimate_aurocs(table, quality, eval_ran, ["a", "b"])
    assert {k: out[k] for k in ("exante_auroc", "own_answer_auroc", "posthoc_auroc")} == pytest.approx(
        {"exante_auroc": 0.5, "own_answer_auroc": 1.0, "posthoc_auroc": 1.0})
    assert out["per_model"]["b"] == pytest.approx({"exante_auroc": 0.5, "own_answer_auroc": 1.0, "posthoc_auroc": 1.0})
