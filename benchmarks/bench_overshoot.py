"""Budget adherence of fitted λ on new queries, with and without the overshoot correction.

For each artifact (``--artifact NAME=PATH``) and without touching the test split: the calibration
split is halved at random (``--seeds`` halvings, both ways); λ is fitted per budget on one half and
run on the other, once meeting the budget on the fit half (``overshoot_correction=False``) and once
targeting the budget minus the expected overshoot (:mod:`cascade_routing.policies.overshoot`, the
default). Reported per strategy: the realised mean cost on the scoring half over the cost each fit
aims at (:func:`~cascade_routing.evaluation.compare.spend_targets`), averaged over the sweep; mean
and standard error over the halvings; and the AUC on the scoring halves.

Run (2 CPU cores, about 3 min per artifact at 20 seeds):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_overshoot.py \\
        --artifact routerbench-subset=artifacts/routerbench.safetensors --out benchmarks/results/overshoot

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
from artifact_specs import (add_artifact_option, add_seeds_option, artifact_specs,  # noqa: E402
                            with_earlier_results, write_summary)

STRATEGIES = ("routing", "threshold_cascade_one_threshold", "threshold_cascade", "optimal_cascade", "cascade_routing")
VARIANTS = {"calibration budget": False, "overshoot corrected": True}


def _policies(pool):
    from cascade_routing.policies.registry import make_policy

    policies = {name: make_policy(name, pool=pool) for name in ("routing", "threshold_cascade", "optimal_cascade",
                                                                "cascade_routing")}
    policies["threshold_cascade_one_threshold"] = make_policy("threshold_cascade", step_ratios=None, pool=pool)
    return policies


def halves_adherence(estimator, cost_estimator, dataset, seeds: int, per_pair: int = 3) -> dict:
    """{variant: {strategy: {"adherence": [per halving], "auc": [per halving]}}} over 2·``seeds`` halvings."""
    from cascade_routing.calibration.lambda_tables import min_reachable_budget
    from cascade_routing.calibration.selection import calibration_halves, score_budgets
    from cascade_routing.evaluation.compare import budget_adherence
    from cascade_routing.evaluation.sweep import budget_sweep
    from cascade_routing.policies.pool import nondominated_pool

    n = dataset.quality.shape[0]
    floor = min_reachable_budget(cost_estimator, dataset.cost) * 1.01
    out = {v: {s: {"adherence": [], "auc": []} for s in STRATEGIES} for v in VARIANTS}
    texts = list(dataset.queries)
    for seed in range(seeds):
        for fit, score in calibration_halves(n, seed):
            pool = nondominated_pool(dataset.quality[fit], dataset.cost[fit])
            budgets = score_budgets(dataset, score, per_pair, 0, floor)
            for name, policy in _policies(pool).items():
                for variant, correct in VARIANTS.items():
                    sweep = budget_sweep(policy, estimator, cost_estimator, dataset.quality, dataset.cost, fit, score,
                                         budgets, texts=texts, num_resamples=2, overshoot_correction=correct)
                    out[variant][name]["adherence"].append(float(np.mean(budget_adherence(sweep))))
                    out[variant][name]["auc"].append(float(sweep.auc))
        print(f"  halving {seed + 1}/{seeds}", flush=True)
    return out


def summarise(per_halving: dict) -> dict:
    """Mean and standard error over halvings, and the paired corrected − uncorrected difference."""
    summary: dict = {}
    for variant, by_strategy in per_halving.items():
        for name, values in by_strategy.items():
            for key, v in values.items():
                v = np.asarray(v, dtype=np.float64)
                summary.setdefault(name, {})[f"{key} ({variant})"] = [float(v.mean()),
                                                                      float(v.std(ddof=1) / np.sqrt(v.size))]
    for name in STRATEGIES:
        d = (np.asarray(per_halving["overshoot corrected"][name]["auc"])
             - np.asarray(per_halving["calibration budget"][name]["auc"]))
        summary[name]["auc corrected − uncorrected"] = [float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))]
    return summary


def summary_markdown(results: dict[str, dict]) -> str:
    lines = ["Realised mean cost on the scoring half / the cost the fit aims at (mean over the sweep; mean ± standard "
             "error over the halvings), λ fitted meeting the budget on the fit half → targeting the budget minus the "
             "expected overshoot; AUC change from the correction (paired over halvings).", "",
             "| dataset | strategy | adherence, budget met on the fit half | adherence, overshoot corrected "
             "| AUC change |", "|---|---|---:|---:|---:|"]
    for dataset, r in results.items():
        for name in STRATEGIES:
            s = r["summary"][name]
            plain, corrected = s["adherence (calibration budget)"], s["adherence (overshoot corrected)"]
            dauc = s["auc corrected − uncorrected"]
            lines.append(f"| {dataset} | {name} | {plain[0]:.3f} ± {plain[1]:.3f} | {corrected[0]:.3f} ± "
                         f"{corrected[1]:.3f} | {dauc[0]:+.2f} ± {dauc[1]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from cascade_routing.calibration.binding import bind_split
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.training.heldout import datamodule_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_artifact_option(parser)
    add_seeds_option(parser, 20)
    parser.add_argument("--out", default="benchmarks/results/overshoot")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    for name, path in artifact_specs(parser, args.artifact):
        artifact = load_artifact(path)
        split = datamodule_for(artifact).splits["calibration"]
        estimator, cost_estimator = bind_split(artifact, split)
        print(f"{name}: {split.dataset.quality.shape[0]} calibration queries", flush=True)
        per_halving = halves_adherence(estimator, cost_estimator, split.dataset, args.seeds)
        results[name] = {"artifact": path, "halvings": 2 * args.seeds, "per_halving": per_halving,
                         "summary": summarise(per_halving)}
    results = with_earlier_results(args.out, results)
    write_summary(args.out, results, summary_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
