"""What cascade routing would gain over routing with sharper post-hoc estimates, on held-out calibration data.

For each artifact (``--artifact NAME=PATH``) the learned estimator is bound to its calibration split
(uncertainty ``none``, or each of ``--uncertainty``: ``variance`` and ``variance*α``, the export's
candidates; the wrapper shrinks a run model's std by 1 − w) and wrapped in :class:`~cascade_routing.evaluation.revealed.RevealedQuality`
with weights ``--weights``: every run model's post-hoc mean moves by ``w`` toward its realised
quality (0: the estimator itself, 1: an oracle once the answer is in); the ex-ante estimate, and so
routing, stays as it is. Per weight it reports the own-answer AUROC (mean over models of the AUROC of
a model's estimate after only its own answer) and the calibration-halves protocol of
``bench_ran_set_bias`` (λ fitted on one half, scored on the other, ``--seeds`` halvings): AUC of
routing, the cascades and cascade routing, and cascade routing − routing overall and at its worst
budget. The test split is not read.

Run (2 CPU cores, about 2-3 minutes per artifact):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_posthoc_ceiling.py \\
        --artifact routerbench-subset=artifacts/routerbench.safetensors --out benchmarks/results/posthoc_ceiling

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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from artifact_specs import (add_artifact_option, add_seeds_option, artifact_specs,  # noqa: E402
                            with_earlier_results, write_summary)
from bench_ran_set_bias import calibration_halves  # noqa: E402

DEFAULT_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.25, 1.0)


def report_one(path: str, weights: tuple[float, ...], seeds: int, uncertainties: tuple[str, ...] = ("none",)) -> list[dict]:
    from cascade_routing.calibration.binding import bind_split
    from cascade_routing.calibration.selection import scaled_estimator
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.evaluation.revealed import RevealedQuality, own_answer_auroc
    from cascade_routing.training.heldout import datamodule_for

    artifact = load_artifact(path)
    split = datamodule_for(artifact).splits["calibration"]
    base, cost_estimator = bind_split(artifact, split, uncertainty="variance")
    rows = []
    for weight in weights:
        for name in uncertainties:
            mode, scale = parse_uncertainty(name)
            revealed = RevealedQuality(scaled_estimator(base, mode, scale), split.dataset.quality, weight)
            halves = calibration_halves(revealed, cost_estimator, split.dataset, seeds)
            rows.append({"weight": weight, "uncertainty": name,
                         "own_answer_auroc": own_answer_auroc(revealed, split.dataset.quality), **halves})
            print(f"{path} w={weight} {name}: own-answer AUROC {rows[-1]['own_answer_auroc']:.3f}, "
                  f"CR − routing {halves['cr_minus_routing_auc']:+.2f}", flush=True)
    return rows


def parse_uncertainty(name: str) -> tuple[str, float]:
    """``none`` / ``variance`` / ``variance*α`` → (mode, α); covariance beliefs cannot be revealed."""
    mode, _, scale = name.partition("*")
    if mode not in ("none", "variance") or (mode == "none" and scale):
        raise ValueError(f"uncertainty {name!r}: use none, variance or variance*ALPHA")
    try:
        alpha = float(scale) if scale else 1.0
    except ValueError:
        raise ValueError(f"uncertainty {name!r}: ALPHA must be a number") from None
    if not alpha > 0:
        raise ValueError(f"uncertainty {name!r}: ALPHA must be > 0")
    return mode, alpha


def summary_markdown(results: dict[str, list[dict]]) -> str:
    """One row per artifact, weight and uncertainty (the uncertainty column only when not all ``none``)."""
    with_mode = any(r.get("uncertainty", "none") != "none" for rows in results.values() for r in rows)
    mode_head, mode_rule = (" uncertainty |", "---|") if with_mode else ("", "")
    lines = [f"| artifact | w |{mode_head} own-answer AUROC | AUC routing | AUC threshold cascade | AUC optimal cascade "
             "| AUC cascade routing | CR − routing AUC | worst budget CR − routing (points) |",
             f"|---|---:|{mode_rule}---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        for r in rows:
            mode = f" {r.get('uncertainty', 'none')} |" if with_mode else ""
            lines.append(f"| {name} | {r['weight']:g} |{mode} {r['own_answer_auroc']:.3f} | {r['routing_auc']:.2f} "
                         f"| {r['threshold_cascade_auc']:.2f} | {r['optimal_cascade_auc']:.2f} "
                         f"| {r['cascade_routing_auc']:.2f} | {r['cr_minus_routing_auc']:+.2f} "
                         f"| {100 * r['worst_budget_cr_minus_routing']:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_artifact_option(parser)
    parser.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS),
                        help="how far run models' post-hoc means move toward the truth (0: as estimated, 1: oracle)")
    add_seeds_option(parser, 2)
    parser.add_argument("--uncertainty", nargs="+", default=["none"],
                        help="beliefs of the policies: none, variance or variance*ALPHA (each is a row)")
    parser.add_argument("--out", default="benchmarks/results/posthoc_ceiling")
    args = parser.parse_args(argv)
    for name in args.uncertainty:
        try:
            parse_uncertainty(name)
        except ValueError as err:
            parser.error(str(err))
    torch.set_num_threads(1)
    results = {name: report_one(path, tuple(args.weights), args.seeds, tuple(args.uncertainty))
               for name, path in artifact_specs(parser, args.artifact)}
    results = with_earlier_results(args.out, results)
    write_summary(args.out, results, summary_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
