"""Benchmark of the learned estimators vs the paper-style baseline, on real data (test splits).

For each dataset (default: rational-llm-cascades, 9 models, and routerbench-subset, 11 models) it
trains the estimator with the dataset's shipped config (``routerbench`` / ``rational``: frozen MiniLM, cached
embeddings) unless ``--artifact`` gives one, then reports:

- AUC per strategy (routing, threshold cascade, optimal cascade, cascade routing) with the learned
  and the baseline estimator (λ fitted on the calibration split, test split), and the targets:
  cascade routing (learned) >= baseline + 2 and >= routing/cascades with the same estimator;
- ex-ante AUROC averaged over models (target >= 0.70) and post-hoc AUROC of run models
  (target >= 0.85 where log-prob confidence exists), learned and baseline;
- uncertainty calibration (variance head vs residual covariance: NLL, 90% coverage, val split);
- inference throughput in queries/s on the test queries (<= 128 tokens), measured in the same run
  for: learned ex-ante estimate including the MiniLM encoder, learned heads only (embeddings
  given), and the baseline estimator; target >= 500 queries/s.

Run (2 CPU cores, ~15-25 min for both datasets on a shared machine):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_estimators.py \\
        --out benchmarks/results/estimators

Writes ``<out>/<dataset>/`` (results.csv, points.csv, table.md, curves.png/.svg, estimator_metrics.json) and
``<out>/summary.json`` / ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"rational-llm-cascades": "rational", "routerbench-subset": "routerbench"}  # shipped config names


def train(config: str, out: Path) -> Path:
    from cascade_routing.training.export import ExportArtifact
    from cascade_routing.training.lightning_cli import lightning_cli

    artifact = out / "estimator.safetensors"
    cli = lightning_cli(["fit", "--config", config, "--trainer.enable_progress_bar=false",
                         f"--trainer.default_root_dir={out / 'runs'}"])
    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportArtifact))
    Path(export.artifact_path).replace(artifact)
    return artifact


def throughput(artifact_path: Path, dataset: str, repeats: int = 3, max_queries: int = 512) -> dict:
    """Queries per second of ex-ante estimation on test queries (<= 128 tokens), three estimators."""
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.estimators.baseline import BaselineModel
    from cascade_routing.training.heldout import datamodule_for

    art = load_artifact(artifact_path)
    dm = datamodule_for(art, dataset)
    test = dm.splits["test"]
    ds = test.dataset
    n = min(max_queries, ds.num_queries)
    queries = ds.queries[:n]
    m = ds.num_models
    ran0 = torch.zeros(n, m, dtype=torch.bool)
    rows = torch.arange(n)
    baseline = BaselineModel.fit(dm.splits["train"].dataset)
    baseline.fit_covariances(dm.splits["calibration"].dataset)
    out: dict = {"queries": n, "threads": torch.get_num_threads()}

    def best_of(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return n / min(times)

    def full():  # encoder + heads, from raw text
        qe, _ = art.bind(queries, None, None, ds.tasks[:n])
        qe.estimate(rows, ran0)

    emb = test.query_emb[:n].numpy()

    def heads():  # embeddings given
        qe, _ = art.bind(queries, None, None, ds.tasks[:n], query_embeddings=emb)
        qe.estimate(rows, ran0)

    def base():
        qe = baseline.bind(queries, None, None, ds.tasks[:n])
        qe.estimate(rows, ran0)

    art.embed_queries(queries[:8])  # load the encoder outside the timed region
    out["learned_with_encoder_qps"] = best_of(full)
    out["learned_heads_only_qps"] = best_of(heads)
    out["baseline_qps"] = best_of(base)
    tok = art.tokenizer()
    lengths = [len(x) for x in tok(queries, truncation=True, max_length=128)["input_ids"]]
    out["mean_tokens"] = float(np.mean(lengths))
    return out


def main(argv: list[str] | None = None) -> int:
    from cascade_routing.evaluation import protocol

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(CONFIGS), help="comma-separated dataset names")
    parser.add_argument("--out", default="benchmarks/results/estimators")
    parser.add_argument("--artifact", action="append", default=[], help="NAME=PATH: reuse a trained artifact")
    parser.add_argument("--budgets-per-pair", type=int, default=protocol.BUDGETS_PER_PAIR)
    parser.add_argument("--resamples", type=int, default=protocol.NUM_RESAMPLES)
    args = parser.parse_args(argv)

    from cascade_routing.training.heldout import evaluate
    from cascade_routing.estimators.runtime import configure_threads

    configure_threads()
    given = dict(a.split("=", 1) for a in args.artifact)
    out_root = Path(args.out)
    summary: dict = {}
    for name in [d for d in args.datasets.split(",") if d]:
        out = out_root / name
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        artifact = Path(given[name]) if name in given else train(CONFIGS[name], out)
        train_s = time.perf_counter() - t0
        res = evaluate(str(artifact), dataset=name, out_dir=str(out), budgets_per_pair=args.budgets_per_pair,
                       num_resamples=args.resamples, log_wandb=False)
        auc = {f"{r['estimator']}/{r['strategy']}": r["auc"] for r in res.rows}
        cr_l, cr_b = auc.get("learned/cascade_routing"), auc.get("baseline/cascade_routing")
        others = [auc[f"learned/{s}"] for s in ("routing", "threshold_cascade", "optimal_cascade")]
        em = res.estimator_metrics
        summary[name] = {
            "auc": auc,
            "cascade_routing_gain_over_baseline": None if cr_b is None else round(cr_l - cr_b, 3),
            "target_gain_2_points_met": None if cr_b is None else bool(cr_l >= cr_b + 2),
            "target_cr_beats_routing_and_cascades_met": bool(cr_l >= max(others)),
            "exante_auroc": {e: em[e].get("exante_auroc") for e in ("learned", "baseline") if e in em},
            "posthoc_auroc": {e: em[e].get("posthoc_auroc") for e in ("learned", "baseline") if e in em},
            "uncertainty_calibration_val": em.get("uncertainty_calibration_val"),
            "throughput": throughput(artifact, name),
            "train_seconds": round(train_s, 1),
            "evaluate_seconds": round(res.seconds, 1),
        }
        print(json.dumps(summary[name], indent=2))
    (out_root / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["| dataset | metric | learned | baseline |", "|---|---|---:|---:|"]
    for name, s in summary.items():
        for strat in ("routing", "threshold_cascade", "optimal_cascade", "cascade_routing"):
            lines.append(f"| {name} | AUC {strat} | {s['auc'].get('learned/' + strat)} | {s['auc'].get('baseline/' + strat)} |")
        lines.append(f"| {name} | ex-ante AUROC (mean) | {s['exante_auroc'].get('learned', float('nan')):.3f} | "
                     f"{s['exante_auroc'].get('baseline', float('nan')):.3f} |")
        lines.append(f"| {name} | post-hoc AUROC (run models) | {s['posthoc_auroc'].get('learned', float('nan')):.3f} | "
                     f"{s['posthoc_auroc'].get('baseline', float('nan')):.3f} |")
        tp = s["throughput"]
        lines.append(f"| {name} | ex-ante queries/s (encoder+heads / heads only) | {tp['learned_with_encoder_qps']:.0f} / "
                     f"{tp['learned_heads_only_qps']:.0f} | {tp['baseline_qps']:.0f} |")
    (out_root / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
