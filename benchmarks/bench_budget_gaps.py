"""Cascade routing − routing, budget by budget, on calibration halves: the expected gap and its spread.

A test split gives one draw of the per-budget difference between two fitted policies. This benchmark
shows what to expect of that draw without reading the test split: for each artifact
(``--artifact NAME=PATH``) the calibration split is halved at random (``--seeds`` halvings, both
folds each); λ of routing and of cascade routing (the export's policy: pool, λ shapes and routing
guard chosen on the fit half) is fitted per budget on one half and scored on the other, at the
budgets ``calibration_halves`` of the export uses (3 per pair of consecutive non-dominated models of
the scored half). Each (fold, budget) gives one difference d = mean quality of cascade routing −
routing on the scored half, in points. The differences are grouped by the interval of the whole
calibration split's non-dominated models (by mean cost) their budget falls in, and reported per
interval: mean, standard deviation over the (fold, budget) points, the lowest, and how many points
are more than 1 point below 0.

Run (2 CPU cores; 61 s for the four README artifacts at ``--seeds 6``):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_budget_gaps.py \\
        --artifact rational-llm-cascades=artifacts/rational.safetensors --out benchmarks/results/budget_gaps

Writes ``<out>/summary.json`` and ``<out>/summary.md`` (artifacts already in ``<out>/summary.json`` and
not rerun are kept).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from artifact_specs import (add_artifact_option, add_seeds_option, artifact_specs, calibration_folds,  # noqa: E402
                            with_earlier_results, write_summary)

BELOW = -1.0  # points: a (fold, budget) difference below this is counted


def interval_gaps(budgets: np.ndarray, diffs: np.ndarray, frontier_cost: np.ndarray, frontier_names: list[str]
                  ) -> list[dict]:
    """The (budget, diff) points grouped by the interval ``[frontier_cost[i], frontier_cost[i + 1]]`` of
    consecutive non-dominated models their budget lies in (a budget below the first or above the last
    cost goes to the first or last interval; one on a boundary to the lower one). Per interval with
    points: ``from``/``to`` (model names), ``low``/``high`` (costs), ``points``, ``mean``, ``sd``
    (population, over the points), ``min``, ``below`` (points with diff < :data:`BELOW`)."""
    budgets, diffs = np.asarray(budgets, dtype=np.float64), np.asarray(diffs, dtype=np.float64)
    cost = np.asarray(frontier_cost, dtype=np.float64)
    if budgets.shape != diffs.shape or budgets.ndim != 1:
        raise ValueError(f"budgets and diffs must be 1-D of one length, got {budgets.shape} and {diffs.shape}")
    if cost.size < 2 or cost.size != len(frontier_names) or bool(np.any(np.diff(cost) < 0)):
        raise ValueError(f"need >= 2 frontier models with non-decreasing costs and one name each, got {cost.tolist()}")
    where = np.clip(np.searchsorted(cost, budgets, side="left") - 1, 0, cost.size - 2)
    out = []
    for i in range(cost.size - 1):
        d = diffs[where == i]
        if d.size == 0:
            continue
        out.append({"from": frontier_names[i], "to": frontier_names[i + 1], "low": float(cost[i]),
                    "high": float(cost[i + 1]), "points": int(d.size), "mean": float(d.mean()), "sd": float(d.std()),
                    "min": float(d.min()), "below": int((d < BELOW).sum())})
    return out


def report_one(path: str, seeds: int) -> dict:
    from cascade_routing.calibration.binding import bind_split
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.evaluation.metrics import nondominated_models
    from cascade_routing.evaluation.sweep import budget_sweep
    from cascade_routing.policies.registry import calibrated_policy
    from cascade_routing.training.heldout import datamodule_for

    artifact = load_artifact(path)
    split = datamodule_for(artifact).splits["calibration"]
    data = split.dataset
    estimator, cost_estimator = bind_split(artifact, split)
    budgets, diffs = [], []
    for fit, score, fold_budgets in calibration_folds(data, cost_estimator, seeds):
        sweeps = {}
        for strategy in ("routing", "cascade_routing"):
            policy = calibrated_policy(strategy, data.quality[fit], data.cost[fit])
            sweeps[strategy] = budget_sweep(policy, estimator, cost_estimator, data.quality, data.cost, fit, score,
                                            fold_budgets, texts=list(data.queries), num_resamples=1)
        budgets.extend(fold_budgets.tolist())
        diffs.extend((100.0 * (sweeps["cascade_routing"].qualities - sweeps["routing"].qualities)).tolist())
    mean_cost, mean_quality = data.cost.mean(0), data.quality.mean(0)
    frontier = nondominated_models(mean_cost, mean_quality)
    names = [artifact.models[int(j)] for j in frontier]
    return {"artifact": path, "halvings": seeds, "folds": 2 * seeds, "uncertainty": estimator.uncertainty,
            "intervals": interval_gaps(np.array(budgets), np.array(diffs), mean_cost[frontier], names)}


def summary_markdown(results: dict[str, dict]) -> str:
    lines = ["| artifact | budget interval (calibration mean cost, USD) | points | CR − routing: mean (sd) | lowest "
             f"| points below {BELOW:+.0f} |", "|---|---|---:|---|---:|---:|"]
    for name, res in results.items():
        for row in res["intervals"]:
            lines.append(f"| {name} | {row['from']} → {row['to']} ({row['low']:.3g} – {row['high']:.3g}) "
                         f"| {row['points']} | {row['mean']:+.2f} ({row['sd']:.2f}) | {row['min']:+.2f} "
                         f"| {row['below']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_artifact_option(parser)
    add_seeds_option(parser, 4)
    parser.add_argument("--out", default="benchmarks/results/budget_gaps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {name: report_one(path, args.seeds) for name, path in artifact_specs(parser, args.artifact)}
    results = with_earlier_results(args.out, results)
    write_summary(args.out, results, summary_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
