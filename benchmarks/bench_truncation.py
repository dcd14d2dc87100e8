"""Which query truncation keeps what distinguishes queries? right vs left vs head_tail, same run.

For each mode it trains the learned estimator with the dataset's config (frozen MiniLM, cached
embeddings; only ``data.truncation`` differs) and reports, per mode:

- distinct encoder inputs among the distinct queries (``diagnostics.input_distinctness``);
- ex-ante AUROC averaged over models on the val split (used to choose the default) and on the test
  split (reported, not used for the choice); post-hoc AUROC of run models on both;
- with ``--evaluate``: AUC per strategy on the test split (λ fitted on calibration), learned
  estimator only.

Run (2 CPU cores; a few minutes per mode):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_truncation.py \\
        --out benchmarks/results/truncation

Writes ``<out>/summary.json`` and ``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"routerbench-subset": "configs/routerbench.yaml", "rational-llm-cascades": "configs/rational.yaml"}
MODES = ("right", "left", "head_tail")


def train(config: str, truncation: str, out: Path, max_epochs: int | None) -> Path:
    """Train with ``config`` and ``data.truncation=truncation``; returns the artifact path."""
    from lightning.pytorch.cli import LightningCLI

    from cascade_routing.estimators.datamodule import RoutingDataModule
    from cascade_routing.estimators.export import ExportArtifact
    from cascade_routing.estimators.module import QualityEstimatorModule

    args = ["fit", "--config", str(REPO / config), f"--data.truncation={truncation}",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out / 'runs'}"]
    if max_epochs:
        args.append(f"--trainer.max_epochs={max_epochs}")
    cli = LightningCLI(QualityEstimatorModule, RoutingDataModule, seed_everything_default=0,
                       save_config_kwargs={"overwrite": True}, args=args)
    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportArtifact))
    artifact = out / f"estimator-{truncation}.safetensors"
    Path(export.artifact_path).replace(artifact)
    return artifact


def measure(dataset: str, truncation: str, out: Path, evaluate_strategies: bool, max_epochs: int | None) -> dict:
    from cascade_routing.data import diagnostics
    from cascade_routing.estimators import encoding
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.estimators.evaluate import datamodule_for, estimator_metrics, evaluate

    t0 = time.perf_counter()
    path = train(CONFIGS[dataset], truncation, out, max_epochs)
    train_s = time.perf_counter() - t0
    art = load_artifact(path)
    dm = datamodule_for(art, dataset)
    queries = list(dm.dataset.queries)
    d = diagnostics.input_distinctness(queries, encoding.tokenize(queries, dm.tokenizer, dm.max_length, truncation))
    row = {"truncation": truncation, "max_length": dm.max_length, "distinct_queries": d.queries,
           "distinct_inputs": d.inputs, "train_s": train_s}
    for split in ("val", "test"):
        m = estimator_metrics(art, dm.splits[split])["learned"]
        row[f"{split}_exante_auroc"] = m.get("exante_auroc")
        row[f"{split}_posthoc_auroc"] = m.get("posthoc_auroc")
    if evaluate_strategies:
        res = evaluate(str(path), dataset=dataset, out_dir=str(out / f"eval-{truncation}"), budgets_per_pair=5,
                       num_resamples=200, estimators=("learned",), log_wandb=False, progress=False)
        row["test_auc"] = {r["strategy"]: r["auc"] for r in res.rows}
    return row


def render(summary: dict) -> str:
    lines = []
    for dataset, rows in summary["datasets"].items():
        lines += [f"## {dataset}", "",
                  "| truncation | distinct inputs / queries | ex-ante AUROC val | ex-ante AUROC test "
                  "| post-hoc AUROC val | post-hoc AUROC test |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['truncation']} ({r['max_length']} tokens) | {r['distinct_inputs']:,} / "
                         f"{r['distinct_queries']:,} | {r['val_exante_auroc']:.3f} | {r['test_exante_auroc']:.3f} | "
                         f"{r['val_posthoc_auroc']:.3f} | {r['test_posthoc_auroc']:.3f} |")
        if any("test_auc" in r for r in rows):
            strategies = sorted({s for r in rows for s in r.get("test_auc", {})})
            lines += ["", "Test AUC (learned estimator, 5 budgets per model pair, 200 resamples):", "",
                      "| truncation | " + " | ".join(strategies) + " |", "|---" * (len(strategies) + 1) + "|"]
            for r in rows:
                lines.append(f"| {r['truncation']} | " + " | ".join(
                    f"{r['test_auc'][s]:.2f}" for s in strategies) + " |")
        best = max(rows, key=lambda r: r["val_exante_auroc"])
        lines += ["", f"Best on val (ex-ante AUROC): **{best['truncation']}**.", ""]
    lines.append(f"Machine: {summary['machine']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="routerbench-subset", help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="benchmarks/results/truncation")
    parser.add_argument("--evaluate", action="store_true", help="also the strategies' test AUC (slower)")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the config's trainer.max_epochs")
    args = parser.parse_args(argv)

    from cascade_routing.estimators.runtime import configure_threads

    configure_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"datasets": {}, "machine": f"load average before: {os.getloadavg()[0]:.2f}, "
                                                f"cpus {os.cpu_count()}"}
    for dataset in [d for d in args.datasets.split(",") if d]:
        rows = []
        for mode in [m for m in args.modes.split(",") if m]:
            rows.append(measure(dataset, mode, out / dataset, args.evaluate, args.max_epochs))
            print(json.dumps(rows[-1]), flush=True)
        summary["datasets"][dataset] = rows
    summary["machine"] += f"; after: {os.getloadavg()[0]:.2f}"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(render(summary))
    print(render(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
