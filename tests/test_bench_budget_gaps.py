"""``benchmarks/bench_budget_gaps.py``: per-budget differences grouped by frontier interval."""

from __future__ import annotations

import numpy as np
import pytest

from tests.script_helpers import load_script


def _bench():
    return load_script("benchmarks/bench_budget_gaps.py")


def test_points_are_grouped_by_the_frontier_interval_their_budget_lies_in():
    bench = _bench()
    cost = np.array([1.0, 2.0, 5.0])
    budgets = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 4.0, 6.0])
    diffs = np.array([0.0, -2.0, 1.0, 3.0, -1.5, 0.5, 2.0])
    rows = bench.interval_gaps(budgets, diffs, cost, ["a", "b", "c"])
    assert [(r["from"], r["to"], r["points"]) for r in rows] == [("a", "b", 4), ("b", "c", 3)]
    first, second = rows
    # below the first cost and on a boundary: the lower interval
    assert first["mean"] == pytest.approx(np.mean([0.0, -2.0, 1.0, 3.0]))
    assert first["sd"] == pytest.approx(np.std([0.0, -2.0, 1.0, 3.0]))
    assert (first["min"], first["below"]) == (-2.0, 1)
    assert second["mean"] == pytest.approx(np.mean([-1.5, 0.5, 2.0])) and second["below"] == 1
    assert (second["low"], second["high"]) == (2.0, 5.0)


def test_empty_intervals_are_left_out_and_bad_frontiers_are_refused():
    bench = _bench()
    rows = bench.interval_gaps(np.array([4.0]), np.array([0.3]), np.array([1.0, 2.0, 5.0]), ["a", "b", "c"])
    assert [(r["from"], r["points"]) for r in rows] == [("b", 1)]
    with pytest.raises(ValueError, match="non-decreasing costs"):
        bench.interval_gaps(np.array([1.0]), np.array([0.0]), np.array([2.0, 1.0]), ["a", "b"])
    with pytest.raises(ValueError, match="one length"):
        bench.interval_gaps(np.array([1.0, 2.0]), np.array([0.0]), np.array([1.0, 2.0]), ["a", "b"])


def test_summary_has_one_row_per_interval():
    bench = _bench()
    rows = bench.interval_gaps(np.array([1.5, 3.0]), np.array([-0.25, 1.0]), np.array([1.0, 2.0, 5.0]),
                               ["a", "b", "c"])
    table = bench.summary_markdown({"d": {"intervals": rows}})
    body = [line for line in table.splitlines() if line.startswith("| d |")]
    assert len(body) == 2 and "a → b" in body[0] and "-0.25 (0.00)" in body[0] and "+1.00" in body[1]
