"""Bias of the learned estimates by ran-set size, and what it does to cascade routing, on held-out splits.

For each artifact (``--artifact NAME=PATH``, e.g. the same config trained with and without
``model.singleton_masks``, several seeds) it reports, without touching the test split:

- ``bias_by_ran_set_size`` (:mod:`cascade_routing.evaluation.estimate_bias`) on the val and
  calibration splits: mean (estimate − realised quality) over run and unrun cells, per ran-set size,
  and the error of the value of stopping (highest post-hoc mean among the run models minus the
  quality of the answer it selects);
- calibration halves: λ fitted on one half of the calibration split and scored on the other (both
  ways, ``--seeds`` random halvings): AUC of routing, the threshold cascade with one threshold and
  with its per-step threshold shapes, the optimal cascade (the half's non-dominated pool as the
  cascades' chain) and cascade routing (uncertainty ``none``, the same pool, constant λ, no guard: the
  value function alone), the mean over halvings of the worst per-budget quality difference
  cascade routing − routing, and each strategy's realised cost / budget on the scoring half (mean
  over the sweep; mean and standard error over the halvings).

Run (2 CPU cores, about 20 s per artifact):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_ran_set_bias.py \\
        --artifact sm0=artifacts/a.safetensors --artifact sm2=artifacts/b.safetensors --out benchmarks/results/ran_set_bias

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


def calibration_halves(estimator, cost_estimator, dataset, seeds: int, per_pair: int = 3) -> dict:
    """Routing vs cascade routing with λ fitted on one calibration half and scored on the other."""
    from cascade_routing.calibration.lambda_tables import min_reachable_budget
    from cascade_routing.calibration.selection import calibration_halves, score_budgets
    from cascade_routing.evaluation.sweep import budget_sweep
    from cascade_routing.policies.pool import nondominated_pool
    from cascade_routing.policies.registry import make_policy

    n = dataset.quality.shape[0]
    floor = min_reachable_budget(cost_estimator, dataset.cost) * 1.01
    aucs: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    cost_ratios: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    worst: list[float] = []
    for seed in range(seeds):
        for fit, score in calibration_halves(n, seed):
            pool = nondominated_pool(dataset.quality[fit], dataset.cost[fit])
            budgets = score_budgets(dataset, score, per_pair, 0, floor)
            policies = {name: make_policy(name, pool=pool) for name in ("routing", "threshold_cascade", "optimal_cascade")}
            policies["threshold_cascade_one_threshold"] = make_policy("threshold_cascade", step_ratios=None, pool=pool)
            policies["cascade_routing"] = make_policy("cascade_routing", step_ratios=None, pool=pool, routing_guard=False)
            sweeps = {name: budget_sweep(policy, estimator, cost_estimator, dataset.quality, dataset.cost, fit, score,
                                         budgets, texts=list(dataset.queries), num_resamples=2)
                      for name, policy in policies.items()}
            for name, sweep in sweeps.items():
                aucs[name].append(float(sweep.auc))
                cost_ratios[name].append(float(np.mean(sweep.costs / sweep.budgets)))
            worst.append(float((sweeps["cascade_routing"].qualities - sweeps["routing"].qualities).min()))
    mean_auc = {f"{name}_auc": float(np.mean(values)) for name, values in aucs.items()}
    # realised cost / budget on the scoring half, mean over the sweep: its mean and standard error over halvings
    adherence = {f"{name}_cost_over_budget": [float(np.mean(v)), float(np.std(v, ddof=1) / np.sqrt(len(v)))]
                 for name, v in cost_ratios.items()}
    return {**mean_auc, **adherence, "cr_minus_routing_auc": mean_auc["cascade_routing_auc"] - mean_auc["routing_auc"],
            "worst_budget_cr_minus_routing": float(np.mean(worst)), "halvings": 2 * seeds}


def report_one(path: str, seeds: int) -> dict:
    from cascade_routing.calibration.binding import bind_split
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.evaluation.estimate_bias import bias_by_ran_set_size
    from cascade_routing.training.heldout import datamodule_for

    artifact = load_artifact(path)
    datamodule = datamodule_for(artifact)
    out: dict = {"artifact": path, "singleton_masks": artifact.train_config.get("singleton_masks", 0)}
    for split_name in ("val", "calibration"):
        split = datamodule.splits[split_name]
        estimator, cost_estimator = bind_split(artifact, split, uncertainty="none")
        out[f"bias_{split_name}"] = [r.to_dict() for r in bias_by_ran_set_size(estimator, split.dataset.quality)]
        if split_name == "calibration":
            out["calibration_halves"] = calibration_halves(estimator, cost_estimator, split.dataset, seeds)
    return out


def summary_markdown(results: dict[str, dict]) -> str:
    lines = ["| artifact | singleton masks | run bias, 1 model run: val / calibration | unrun bias, 1 run: val / calibration "
             "| run bias, 2 run: val / calibration | calibration halves AUC: routing / threshold cascade (one threshold) "
             "/ threshold cascade (per-step shapes) / optimal cascade / CR "
             "| CR − routing AUC | worst budget CR − routing (points) | value of stopping − selected answer's quality, val, 1 / 2 / 3 / 5 run |",
             "|---|---:|---|---|---|---|---:|---:|---|"]
    for name, r in results.items():
        def at(split: str, size: int, key: str) -> str:
            return f"{r[f'bias_{split}'][size][key]:+.3f}"
        def selected(size: int) -> str:  # "-" where the pool has fewer models than ``size``
            sizes = r["bias_val"]
            return format(sizes[size]["selected_bias"], "+.3f") if size < len(sizes) else "-"
        h = r["calibration_halves"]
        aucs = " / ".join(format(h[strategy + "_auc"], ".2f") for strategy in STRATEGIES)
        lines.append(
            f"| {name} | {r['singleton_masks']} | {at('val', 1, 'run_bias')} / {at('calibration', 1, 'run_bias')} "
            f"| {at('val', 1, 'unrun_bias')} / {at('calibration', 1, 'unrun_bias')} "
            f"| {at('val', 2, 'run_bias')} / {at('calibration', 2, 'run_bias')} "
            f"| {aucs} | {h['cr_minus_routing_auc']:+.2f} "
            f"| {100 * h['worst_budget_cr_minus_routing']:+.2f} "
            f"| {' / '.join(selected(k) for k in (1, 2, 3, 5))} |")
    lines += ["", "Realised cost / budget on the scoring halves (mean over the sweep; mean ± standard error over the "
              "halvings): " + " / ".join(STRATEGIES), "", "| artifact | " + " | ".join(STRATEGIES) + " |",
              "|---|" + "---:|" * len(STRATEGIES)]
    for name, r in results.items():
        h = r["calibration_halves"]
        lines.append(f"| {name} | " + " | ".join(
            "{:.3f} ± {:.3f}".format(*h[f"{strategy}_cost_over_budget"]) for strategy in STRATEGIES) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_artifact_option(parser)
    add_seeds_option(parser, 2)
    parser.add_argument("--out", default="benchmarks/results/ran_set_bias")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    for name, path in artifact_specs(parser, args.artifact):
        results[name] = report_one(path, args.seeds)
        print(f"{name}: calibration halves {results[name]['calibration_halves']}", flush=True)
    results = with_earlier_results(args.out, results)
    write_summary(args.out, results, summary_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
