"""``benchmarks/bench_agreement_cascade.py``: the hand-built agreement cascade's rules and their application."""

from __future__ import annotations

import numpy as np
import pytest

from tests.script_helpers import load_script


def _bench():
    return load_script("benchmarks/bench_agreement_cascade.py")


def test_answers_agree_after_normalising_and_a_missing_answer_agrees_with_nothing():
    bench = _bench()
    responses = np.array([[" A", "a"], ["B\n", "b  "], ["C", "D"], [None, None], ["x y", "x  Y"]], dtype=object)
    assert bench.agree(responses, 0, 1).tolist() == [True, True, False, False, True]


def test_hull_quality_is_the_best_mix_of_two_single_models():
    bench = _bench()
    cost, quality = np.array([1.0, 2.0, 4.0]), np.array([0.5, 0.55, 0.9])
    # between model 0 and model 2 the line 0.5 + 0.4 (c − 1) / 3 beats model 1 (0.55 at c = 2)
    assert bench.hull_quality(cost, quality, 2.0) == pytest.approx(0.5 + 0.4 / 3)
    assert bench.hull_quality(cost, quality, 5.0) == pytest.approx(0.9)
    assert bench.hull_quality(cost, quality, 0.5) == -np.inf


def _synthetic(n=400, seed=0):
    """Task "mc": models 0 and 1 give letters; when they agree the answer is right (quality 1), when
    they differ model 1 is right half the time; model 2 (the top, dear) is always right; model 3 is a
    decoy that answers "z" (never agrees with 0 or 1 and is always wrong). Task "code": long answers
    that never match."""
    rng = np.random.default_rng(seed)
    tasks = ["mc"] * n + ["code"] * n
    responses = np.empty((2 * n, 4), dtype=object)
    quality = np.zeros((2 * n, 4))
    same = rng.random(n) < 0.7
    responses[:n, 0] = "a"
    responses[:n, 1] = np.where(same, "a", "b")
    responses[:n, 2] = "a"
    responses[:n, 3] = "z"
    quality[:n, 0] = same
    quality[:n, 1] = np.where(same, 1.0, rng.random(n) < 0.5)
    quality[:n, 2] = 1.0
    for i in range(n, 2 * n):
        responses[i] = [f"def f{i}_{m}(): pass" for m in range(4)]
    quality[n:, :] = rng.random((n, 4)) < np.array([0.3, 0.4, 0.9, 0.1])
    cost = np.tile(np.array([1.0, 2.0, 20.0, 3.0]), (2 * n, 1))
    return quality, cost, responses, tasks


def test_rules_pick_the_informative_pair_and_send_tasks_that_never_agree_to_the_top_model():
    bench = _bench()
    quality, cost, responses, tasks = _synthetic()
    rules = bench.choose_rules(quality, cost, responses, tasks, top=2)
    assert rules["mc"].pair == (0, 1)
    assert rules["mc"].agreement == pytest.approx(0.7, abs=0.06)
    assert rules["code"].pair is None and rules["code"].agreement == 0.0


def test_applying_rules_escalates_only_the_chosen_share_of_disagreements():
    bench = _bench()
    quality, cost, responses, tasks = _synthetic()
    rules = bench.choose_rules(quality, cost, responses, tasks, top=2)
    n = len(tasks) // 2
    uniforms = np.random.default_rng(1).random(len(tasks))
    disagree = np.array([responses[i, 0] != responses[i, 1] for i in range(n)])
    q0, c0 = bench.apply_rules(rules, quality, cost, responses, tasks, 2, uniforms, 0.0)
    q1, c1 = bench.apply_rules(rules, quality, cost, responses, tasks, 2, uniforms, 1.0)
    qh, ch = bench.apply_rules(rules, quality, cost, responses, tasks, 2, uniforms, 0.5)
    np.testing.assert_array_equal(c0[:n], 3.0)  # the pair only
    np.testing.assert_array_equal(c1[:n], np.where(disagree, 23.0, 3.0))
    np.testing.assert_array_equal(ch[:n], np.where(disagree & (uniforms[:n] < 0.5), 23.0, 3.0))
    np.testing.assert_array_equal(c0[n:], 20.0)  # the code task goes to the top model
    np.testing.assert_array_equal(q1[:n], 1.0)  # agreement is right here, and the top model always is
    np.testing.assert_array_equal(q0[:n], quality[:n, rules["mc"].stop])
    with pytest.raises(ValueError, match="'other' has no rule"):
        bench.apply_rules(rules, quality[:1], cost[:1], responses[:1], ["other"], 2, uniforms[:1], 1.0)
