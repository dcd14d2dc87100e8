"""Which query truncation keeps what distinguishes queries? right vs left vs head_tail, same run.

For each mode it trains the learned estimator with the data and model settings of the dataset's
config (frozen MiniLM, cached embeddings, early stopping on val/mean_loss, best checkpoint; only
``data.truncation`` differs; no artifact export) and reports, per mode:

- distinct encoder inputs among the distinct queries (``diagnostics.input_distinctness``);
- the module's ex-ante AUROC averaged over models on the val split (used to choose the default)
  and on the test split (reported, not used for the choice); post-hoc AUROC (the split's fixed
  random ran-masks) on both.

Run (2 CPU cores; 5-15 minutes per mode, most of it the MiniLM pass when the cache is cold):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_truncation.py \\
        --out benchmarks/results/truncation

Writes ``<out>/summary.json`` and ``<out>/summary.md``. ``--count-only routerbench-subset,routellm-mmlu``
only counts distinct encoder inputs per mode at 128 and 256 tokens (seconds, no training).
``--answer-lengths routerbench-subset,...`` prints, per dataset and task, how many answers are longer
than the ``data.answer_max_length`` window (64 tokens with ``[CLS]``/``[SEP]``: 62 content tokens) and
their median length in MiniLM tokens (no training): where ``data.answer_truncation`` matters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"routerbench-subset": "configs/routerbench.yaml", "rational-llm-cascades": "configs/rational.yaml"}
MODES = ("right", "left", "head_tail")


def measure(dataset: str, truncation: str, max_epochs: int | None) -> dict:
    """Train with the dataset config's data/model settings and ``data.truncation=truncation`` (early
    stopping on val/mean_loss, best checkpoint), then read the module's val and test metrics."""
    import lightning as L
    import yaml
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from cascade_routing.data import diagnostics
    from cascade_routing.estimators import encoding
    from cascade_routing.training.datamodule import RoutingDataModule
    from cascade_routing.training.module import QualityEstimatorModule

    cfg = yaml.safe_load((REPO / CONFIGS[dataset]).read_text())
    data = {**cfg["data"], "dataset": dataset, "truncation": truncation}
    t0 = time.perf_counter()
    L.seed_everything(int(cfg.get("seed_everything", 0)), verbose=False)
    dm = RoutingDataModule(**data)
    module = QualityEstimatorModule(**cfg["model"])
    ckpt = ModelCheckpoint(dirpath=tempfile.mkdtemp(prefix=f"bench-truncation-{truncation}-"), monitor="val/mean_loss",
                           mode="min", save_top_k=1)
    trainer = L.Trainer(max_epochs=max_epochs or int(cfg["trainer"]["max_epochs"]), accelerator="cpu", devices=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ckpt, EarlyStopping(monitor="val/mean_loss", mode="min", patience=5)])
    trainer.fit(module, dm)
    train_s = time.perf_counter() - t0
    val = trainer.validate(module, dm, ckpt_path="best", verbose=False)[0]
    test = trainer.test(module, dm, ckpt_path="best", verbose=False)[0]
    shutil.rmtree(ckpt.dirpath, ignore_errors=True)
    queries = list(dm.dataset.queries)
    d = diagnostics.input_distinctness(queries, encoding.tokenize(queries, dm.tokenizer, dm.max_length, truncation))
    row = {"truncation": truncation, "max_length": dm.max_length, "distinct_queries": d.queries,
           "distinct_inputs": d.inputs, "epochs": trainer.current_epoch, "train_s": round(train_s, 1)}
    for split, metrics in (("val", val), ("test", test)):
        for kind in ("exante", "posthoc"):
            row[f"{split}_{kind}_auroc"] = metrics.get(f"{split}/{kind}/auroc_mean")
    return row


def count_inputs(dataset: str, lengths: tuple[int, ...] = (128, 256)) -> list[dict]:
    """Distinct encoder inputs (default MiniLM tokenizer) per truncation mode and max_length; no training."""
    from cascade_routing.data import diagnostics, load_dataset
    from cascade_routing.estimators import encoding

    tok = encoding.load_tokenizer(encoding.default_encoder_path())
    queries = list(load_dataset(dataset).queries)
    rows = []
    for length in lengths:
        for mode in MODES:
            d = diagnostics.input_distinctness(queries, encoding.tokenize(queries, tok, length, mode))
            rows.append({"dataset": dataset, "max_length": length, "truncation": mode,
                         "distinct_queries": d.queries, "distinct_inputs": d.inputs})
    return rows


ANSWER_WINDOW = 64  # data.answer_max_length's default: [CLS] + 62 content tokens + [SEP]


def answer_lengths(dataset, max_length: int = ANSWER_WINDOW) -> list[dict]:
    """Per task (``all`` first) of ``dataset`` (a registered name or a ``RoutingDataset``): answers, the
    share longer than ``max_length`` − 2 content tokens, and the median content-token count (default
    MiniLM tokenizer); missing answers are not counted, a dataset without answers gives no rows."""
    import numpy as np

    from cascade_routing.data import load_dataset
    from cascade_routing.estimators import encoding

    tok = encoding.load_tokenizer(encoding.default_encoder_path())
    ds = load_dataset(dataset) if isinstance(dataset, str) else dataset
    name = dataset if isinstance(dataset, str) else ds.name
    if ds.responses is None:
        return []
    tasks = np.repeat(np.asarray(ds.tasks if ds.tasks is not None else ["-"] * ds.num_queries), ds.num_models)
    cells = [(str(t), task) for t, task in zip(ds.responses.reshape(-1), tasks) if t is not None]
    lengths = np.array([len(ids) for ids in tok([t for t, _ in cells], add_special_tokens=False)["input_ids"]])
    labels = np.array([task for _, task in cells])
    rows = []
    for task in ["all", *sorted(set(labels.tolist()))]:
        sel = lengths if task == "all" else lengths[labels == task]
        rows.append({"dataset": name, "task": task, "answers": int(sel.size),
                     "share_cut": float((sel > max_length - 2).mean()), "median_tokens": float(np.median(sel))})
    return rows


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
        best = max(rows, key=lambda r: r["val_exante_auroc"])
        lines += ["", f"Best on val (ex-ante AUROC): **{best['truncation']}**.", ""]
    lines.append(f"Machine: {summary['machine']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="routerbench-subset", help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="benchmarks/results/truncation")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the config's trainer.max_epochs")
    parser.add_argument("--count-only", default=None,
                        help="comma-separated dataset names: only count distinct encoder inputs (no training)")
    parser.add_argument("--answer-lengths", default=None,
                        help="comma-separated dataset names: only measure answer lengths against the 64-token window")
    args = parser.parse_args(argv)
    if args.answer_lengths:
        print(f"| dataset | task | answers | longer than {ANSWER_WINDOW - 2} tokens | median tokens |\n|---|---|---:|---:|---:|")
        for name in args.answer_lengths.split(","):
            for r in answer_lengths(name):
                print(f"| {name} | {r['task']} | {r['answers']:,} | {100 * r['share_cut']:.0f}% | {r['median_tokens']:g} |",
                      flush=True)
        return 0
    if args.count_only:
        print("| dataset | max_length | truncation | distinct inputs / distinct queries |\n|---|---|---|---|")
        for name in args.count_only.split(","):
            for r in count_inputs(name):
                print(f"| {name} | {r['max_length']} | {r['truncation']} | {r['distinct_inputs']:,} / "
                      f"{r['distinct_queries']:,} |", flush=True)
        return 0

    from cascade_routing.estimators.runtime import configure_threads

    configure_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"datasets": {}, "machine": f"load average before: {os.getloadavg()[0]:.2f}, "
                                                f"cpus {os.cpu_count()}"}
    for dataset in [d for d in args.datasets.split(",") if d]:
        rows = []
        for mode in [m for m in args.modes.split(",") if m]:
            rows.append(measure(dataset, mode, args.max_epochs))
            print(json.dumps(rows[-1]), flush=True)
        summary["datasets"][dataset] = rows
    summary["machine"] += f"; after: {os.getloadavg()[0]:.2f}"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(render(summary))
    print(render(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
