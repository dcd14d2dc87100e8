"""Averaging the estimates of artifacts trained with different seeds: does a seed ensemble help?

Cascade routing's value maximises over noisy estimates, so any noise the estimator adds is paid for
twice (a worse estimate, and an optimistic maximum). Part of that noise is the training seed: the
heads' initialisation, dropout and the random ran-masks. A seed ensemble removes it:

    p̂_m(R) = (1/K) Σ_k p̂_m^(k)(R)        (mean of the K artifacts' probabilities, per model and ran-set)

For each dataset (``--artifact NAME=PATH`` repeated with the same NAME for its K ≥ 2 seeds: the
same shipped config with ``--seed_everything=S``, so the same data split) it reports, on the
calibration split only (no test split), for every member and for the ensemble:

- AUROC of each model's quality estimate, mean over models: ex-ante, after the model's own answer
  only, and post-hoc over the split's evaluation ran-sets (the cells that ran);
- calibration halves (``bench_ran_set_bias.calibration_halves``: λ fitted on one half, scored on the
  other, both ways, ``--seeds`` random halvings; uncertainty ``none``, the half's pool, constant λ, no
  guard): AUC of routing, the optimal cascade and cascade routing, and cascade routing − routing.

Run (2 CPU cores, about 40 s per member and 50 s per ensemble with ``--seeds 4``):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_seed_ensemble.py \\
        --artifact routerbench-subset=artifacts/routerbench.safetensors \\
        --artifact routerbench-subset=artifacts/routerbench-s1.safetensors \\
        --artifact routerbench-subset=artifacts/routerbench-s2.safetensors --seeds 4 \\
        --out benchmarks/results/seed_ensemble

Writes ``<out>/summary.json`` and ``<out>/summary.md`` (datasets already there and not rerun are kept).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from artifact_specs import (add_artifact_option, add_seeds_option, artifact_specs,  # noqa: E402
                            with_earlier_results, write_summary)

from cascade_routing.interfaces import QualityEstimate, QualityEstimator  # noqa: E402

REPORTED = ("routing", "optimal_cascade", "cascade_routing")


class SeedEnsemble:
    """The mean of ``members``' probability estimates (uncertainty none); all must estimate the same
    models for the same bound rows."""

    def __init__(self, members: list[QualityEstimator]) -> None:
        if len(members) < 2:
            raise ValueError(f"a seed ensemble needs at least 2 members, got {len(members)}")
        models = list(members[0].models)
        for k, member in enumerate(members[1:], start=1):
            if list(member.models) != models:
                raise ValueError(f"member {k} estimates models {list(member.models)}, member 0 {models}")
        self.members, self.models = members, models

    def estimate(self, queries: torch.Tensor, ran: torch.Tensor) -> QualityEstimate:
        means = [member.estimate(queries, ran).mean.double() for member in self.members]
        return QualityEstimate(torch.stack(means).mean(0).float())


def report_dataset(paths: list[str], seeds: int) -> dict:
    """Members' and ensemble's AUROCs and calibration-halves AUCs on the shared calibration split."""
    from bench_ran_set_bias import calibration_halves

    from cascade_routing.calibration.binding import bind_split
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.training.heldout import datamodule_for, estimate_aurocs

    members, splits, cost_estimator = [], [], None
    for path in paths:
        artifact = load_artifact(path)
        split = datamodule_for(artifact).splits["calibration"]
        estimator, cost_estimator = bind_split(artifact, split, uncertainty="none")
        members.append(estimator)
        splits.append(split)
    ids = list(splits[0].dataset.query_ids)
    for path, split in zip(paths[1:], splits[1:]):
        if list(split.dataset.query_ids) != ids:
            raise SystemExit(f"{path}: its calibration split holds other queries than {paths[0]}'s; a seed ensemble "
                             "needs artifacts of the same config and data split (only --seed_everything differs)")
    split = splits[0]
    candidates = {f"seed member {k}": member for k, member in enumerate(members)}
    candidates[f"ensemble of {len(members)}"] = SeedEnsemble(members)
    out: dict = {"artifacts": paths, "rows": int(split.dataset.quality.shape[0])}
    for name, estimator in candidates.items():
        halves = calibration_halves(estimator, cost_estimator, split.dataset, seeds)
        aurocs = estimate_aurocs(estimator, split.dataset.quality, split.eval_ran, list(split.dataset.models))
        out[name] = {**{k: aurocs[k] for k in ("exante_auroc", "own_answer_auroc", "posthoc_auroc")},
                     **{f"{s}_auc": halves[f"{s}_auc"] for s in REPORTED},
                     "cr_minus_routing_auc": halves["cr_minus_routing_auc"], "halvings": halves["halvings"]}
        print(f"{name}: {out[name]}", flush=True)
    return out


def summary_markdown(results: dict[str, dict]) -> str:
    lines = ["| dataset | estimator | AUROC ex-ante / own answer / post-hoc | calibration halves AUC: routing / "
             "optimal cascade / cascade routing | CR − routing |", "|---|---|---|---|---:|"]
    for dataset, entry in results.items():
        for name, r in entry.items():
            if not isinstance(r, dict):
                continue
            lines.append(f"| {dataset} | {name} | {r['exante_auroc']:.3f} / {r['own_answer_auroc']:.3f} / "
                         f"{r['posthoc_auroc']:.3f} | " + " / ".join(f"{r[f'{s}_auc']:.2f}" for s in REPORTED)
                         + f" | {r['cr_minus_routing_auc']:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_artifact_option(parser)
    add_seeds_option(parser, 4)
    parser.add_argument("--out", default="benchmarks/results/seed_ensemble")
    args = parser.parse_args(argv)
    groups: dict[str, list[str]] = defaultdict(list)
    for name, path in artifact_specs(parser, args.artifact):
        groups[name].append(path)
    for name, paths in groups.items():
        if len(paths) < 2:
            parser.error(f"dataset {name!r} has {len(paths)} artifact; give each NAME at least 2 (one per seed)")
    torch.set_num_threads(1)
    results = {name: report_dataset(paths, args.seeds) for name, paths in groups.items()}
    results = with_earlier_results(args.out, results)
    write_summary(args.out, results, summary_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
