"""RevealedQuality: run models' beliefs moved toward their realised quality, and what cascade routing gains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_routing.evaluation.revealed import RevealedQuality, own_answer_auroc, own_answer_aurocs
from cascade_routing.evaluation.sweep import budget_sweep
from cascade_routing.evaluation.synthetic import OracleCostEstimator
from cascade_routing.interfaces import QualityEstimate
from cascade_routing.policies.registry import make_policy


class AnswerBlind:
    """Ex-ante beliefs that no answer changes: a noisy view of the truth, std 0.2."""

    def __init__(self, quality: np.ndarray, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.models = [f"m{j}" for j in range(quality.shape[1])]
        self.table = torch.as_tensor(np.clip(0.05 * quality + 0.95 * quality.mean(0) + rng.normal(0, 0.1, quality.shape), 0, 1))

    def estimate(self, queries, ran) -> QualityEstimate:
        mean = self.table[torch.as_tensor(queries, dtype=torch.long)]
        return QualityEstimate(mean, std=torch.full_like(mean, 0.2))


def _outcomes(n: int = 600, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    quality = (rng.random((n, 3)) < np.array([0.55, 0.7, 0.85])).astype(float)
    cost = np.tile([1e-4, 6e-4, 3e-3], (n, 1))
    return quality, cost


def test_weight_zero_is_the_estimator_and_weight_one_knows_run_models():
    quality, _ = _outcomes(20)
    inner = AnswerBlind(quality)
    rows = torch.arange(20)
    ran = torch.zeros(20, 3, dtype=torch.bool)
    ran[:, 0], ran[5:, 2] = True, True
    base = inner.estimate(rows, ran)
    same = RevealedQuality(inner, quality, 0.0).estimate(rows, ran)
    assert torch.equal(same.mean, base.mean) and torch.equal(same.std, base.std)
    oracle = RevealedQuality(inner, quality, 1.0).estimate(rows, ran)
    truth = torch.as_tensor(quality, dtype=oracle.mean.dtype)
    assert torch.equal(oracle.mean[ran], truth[ran]) and bool((oracle.std[ran] == 0).all())
    assert torch.equal(oracle.mean[~ran], base.mean[~ran]) and torch.equal(oracle.std[~ran], base.std[~ran])
    half = RevealedQuality(inner, quality, 0.5).estimate(rows, ran)
    torch.testing.assert_close(half.mean[ran], 0.5 * (base.mean[ran] + truth[ran]))
    nothing = torch.zeros(20, 3, dtype=torch.bool)  # ex-ante: untouched, so routing is the same for every weight
    assert torch.equal(RevealedQuality(inner, quality, 1.0).estimate(rows, nothing).mean, inner.estimate(rows, nothing).mean)


def test_bad_weight_shape_and_covariance_beliefs_are_refused():
    quality, _ = _outcomes(10)
    inner = AnswerBlind(quality)
    with pytest.raises(ValueError, match=r"weight must lie in \[0, 1\], got 1.5"):
        RevealedQuality(inner, quality, 1.5)
    with pytest.raises(ValueError, match=r"quality must be \[N, 3\]"):
        RevealedQuality(inner, quality[:, :2], 0.5)

    class WithCov(AnswerBlind):
        def estimate(self, queries, ran):
            mean = super().estimate(queries, ran).mean
            return QualityEstimate(mean, cov=torch.diag_embed(torch.full_like(mean, 0.04)))

    with pytest.raises(ValueError, match="std beliefs or none"):
        RevealedQuality(WithCov(quality), quality, 0.5).estimate(torch.arange(3), torch.zeros(3, 3, dtype=torch.bool))


def test_own_answer_auroc_rises_with_the_weight_and_skips_constant_models():
    quality, _ = _outcomes(300)
    inner = AnswerBlind(quality)
    aurocs = [own_answer_auroc(RevealedQuality(inner, quality, w), quality) for w in (0.0, 0.2, 1.0)]
    assert aurocs[0] < aurocs[1] < aurocs[2] == 1.0
    constant = quality.copy()
    constant[:, 1] = 1.0
    per_model = own_answer_aurocs(inner, torch.as_tensor(constant).long())
    assert per_model[1] is None and all(a is not None for a in (per_model[0], per_model[2]))
    with pytest.raises(ValueError, match="undefined"):
        own_answer_auroc(inner, np.ones((5, 3)))


def test_cascade_routing_gains_over_routing_only_once_answers_carry_information():
    quality, cost = _outcomes()
    inner, cost_estimator = AnswerBlind(quality), OracleCostEstimator(cost, ["m0", "m1", "m2"], dtype=torch.float64)
    fit, score = np.arange(0, 600, 2), np.arange(1, 600, 2)
    budgets = np.linspace(2e-4, 2.5e-3, 6)

    def auc(strategy: str, weight: float) -> float:
        policy = make_policy(strategy, step_ratios=None) if strategy == "cascade_routing" else make_policy(strategy)
        return float(budget_sweep(policy, RevealedQuality(inner, quality, weight), cost_estimator, quality, cost,
                                  fit, score, budgets, num_resamples=2).auc)

    routing = auc("routing", 0.0)
    assert auc("routing", 1.0) == pytest.approx(routing)  # routing reads only the ex-ante belief
    blind, revealed = auc("cascade_routing", 0.0), auc("cascade_routing", 1.0)
    assert revealed > routing + 5.0 and revealed > blind + 5.0, (routing, blind, revealed)
