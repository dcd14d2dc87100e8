"""``benchmarks/bench_truncation.py --answer-lengths``: which answers the 64-token window cuts."""

from __future__ import annotations

import numpy as np

from cascade_routing.data.dataset import RoutingDataset
from tests.script_helpers import load_script


def test_answer_lengths_counts_the_answers_longer_than_the_window_per_task():
    bench = load_script("benchmarks/bench_truncation.py")
    long, short = " ".join(["hello"] * 100), "B"  # 100 MiniLM tokens and 1
    responses = np.array([[long, short], [short, None], [long, long]], dtype=object)
    ds = RoutingDataset(queries=["q1", "q2", "q3"], models=["a", "b"], quality=np.ones((3, 2)),
                        cost=np.tile([1e-4, 1e-3], (3, 1)), responses=responses, tasks=["math", "mc", "math"],
                        name="lengths")
    rows = {r["task"]: r for r in bench.answer_lengths(ds)}
    assert list(rows) == ["all", "math", "mc"]
    assert rows["all"]["answers"] == 5 and rows["all"]["share_cut"] == 3 / 5  # the missing answer is not counted
    assert rows["math"] == {"dataset": "lengths", "task": "math", "answers": 4, "share_cut": 0.75, "median_tokens": 100.0}
    assert rows["mc"]["share_cut"] == 0.0 and rows["mc"]["median_tokens"] == 1.0
    assert bench.answer_lengths(ds, max_length=128)[0]["share_cut"] == 0.0
    no_answers = RoutingDataset(queries=["q"], models=["a"], quality=np.ones((1, 1)), cost=np.ones((1, 1)), name="x")
    assert bench.answer_lengths(no_answers) == []
