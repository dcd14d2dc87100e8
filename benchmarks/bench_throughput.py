"""Estimator inference throughput from raw text on 2 CPU cores: MiniLM vs the distilled student.

For each dataset it loads the MiniLM artifact (baseline) and the student artifact (``configs/*_fast.yaml``)
and measures, on the test split's queries of at most 128 tokens (the artifacts' own split), with
``torch.set_num_threads(THREADS)``, best of ``--repeats`` (the variants alternate inside each
repeat so machine load hits them alike):

- **ex-ante**: ``load_artifact(p).bind(queries, None, None, tasks)`` then
  ``estimate(rows, ran=all false)``: tokenisation + query encoder + heads;
- **ex-ante + 1 post-hoc step**: the same bind with the cheapest model's answers and features filled
  in, then ``estimate`` with nothing run and with the cheapest model run (its answer is encoded with
  the artifact's answer encoding, token_bag): the work of a cascade's first two decisions.

Queries/s = queries / seconds. The encoders are loaded once before timing (as in a server).
Variants: ``minilm`` (artifact trained on the frozen MiniLM), ``student`` (artifact carrying the
distilled student), and with ``--int8`` ``student-int8`` (the student's Linear layers dynamically
quantised to int8, torch.ao; its max |Δ ex-ante mean| vs the float student is reported).

Run from the repo root (results written to benchmarks/results/throughput/):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_throughput.py --int8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cascade_routing.serving.checkpoint import quantize_int8  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = {
    "routerbench-subset": ("artifacts/routerbench.safetensors", "artifacts/routerbench_fast.safetensors"),
    "rational-llm-cascades": ("artifacts/rational.safetensors", "artifacts/rational_fast.safetensors"),
}
TARGET_QPS = 500.0


def test_queries(art, dataset: str, max_tokens: int, max_queries: int):
    """The first ``max_queries`` queries of the artifact's test split (same split as training).

    Returns (rows, token counts after truncation to ``max_tokens`` -- what the encoder sees, as the
    artifact truncates at its ``max_length`` = 128 --, test size, fraction longer than ``max_tokens``).
    """
    from cascade_routing.training.datamodule import load_routing_dataset

    cfg = art.data_config
    ds = load_routing_dataset(dataset)
    test = ds.split(dict(cfg["split"]), seed=int(cfg.get("split_seed", 0)))["test"]
    tok = art.tokenizer()
    keep = np.arange(min(max_queries, test.num_queries))
    sub = test.subset(keep)
    full = np.asarray([len(x) for x in tok(list(sub.queries))["input_ids"]])
    return sub, np.minimum(full, max_tokens), int(test.num_queries), float((full > max_tokens).mean())


def make_runs(art, ds):
    n, m = ds.num_queries, ds.num_models
    queries, tasks = list(ds.queries), ds.tasks
    rows = torch.arange(n)
    ran0 = torch.zeros(n, m, dtype=torch.bool)
    ran1 = ran0.clone()
    ran1[:, 0] = True  # the cheapest model (models are sorted cheapest first)
    responses = np.full((n, m), None, dtype=object)
    if ds.responses is not None:
        responses[:, 0] = ds.responses[:, 0]
    feats = {k: np.where(ran1.numpy(), v, np.nan) for k, v in ds.features.items()}
    feats["cost"] = np.where(ran1.numpy(), ds.cost, np.nan)

    def exante():
        qe, _ = art.bind(queries, None, None, tasks)
        return qe.estimate(rows, ran0)

    def exante_posthoc():
        qe, _ = art.bind(queries, responses, feats, tasks)
        qe.estimate(rows, ran0)
        return qe.estimate(rows, ran1)

    return exante, exante_posthoc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(ARTIFACTS))
    parser.add_argument("--artifact", action="append", default=[],
                        help="DATASET:VARIANT=PATH overrides, e.g. routerbench-subset:student=/tmp/x.safetensors")
    parser.add_argument("--threads", default="1,2",
                        help="comma-separated torch intra-op thread counts to time (each on the 2 cores)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-queries", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--int8", action="store_true", help="also time the student with int8 dynamic quantisation")
    parser.add_argument("--out", default="benchmarks/results/throughput")
    args = parser.parse_args(argv)

    from cascade_routing.estimators.artifact import load_artifact

    thread_counts = [int(t) for t in str(args.threads).split(",") if t]
    command = "CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_throughput.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    overrides = dict(a.split("=", 1) for a in args.artifact)
    results: dict = {"command": command.strip(), "threads": thread_counts, "repeats": args.repeats,
                     "max_queries": args.max_queries,
                     "machine": f"{platform.machine()}, {os.cpu_count()} visible cores, load {os.getloadavg()[0]:.1f} at start",
                     "torch": torch.__version__, "datasets": {}}
    for name in [d for d in args.datasets.split(",") if d]:
        base_path, student_path = ARTIFACTS[name]
        paths = {"minilm": overrides.get(f"{name}:minilm", base_path),
                 "student": overrides.get(f"{name}:student", student_path)}
        arts = {k: load_artifact(REPO / p if not os.path.isabs(p) else p) for k, p in paths.items()}
        if args.int8:
            paths["student-int8"] = paths["student"]
            arts["student-int8"] = quantize_int8(load_artifact(REPO / paths["student"]))
        ds, lengths, n_test, truncated = test_queries(arts["minilm"], name, args.max_tokens, args.max_queries)
        for k, a in arts.items():
            if a.data_config.get("split") != arts["minilm"].data_config.get("split") or a.models != arts["minilm"].models:
                raise SystemExit(f"{k} artifact {paths[k]} has a different split or model list than the MiniLM one")
        runs = {k: make_runs(a, ds) for k, a in arts.items()}
        n = ds.num_queries
        entry = {"queries": n, "test_queries": n_test, "mean_tokens": round(float(lengths.mean()), 1),
                 "max_tokens": int(lengths.max()), "fraction_truncated": round(truncated, 3),
                 "artifacts": paths, "variants": {}}
        ref = runs["student"][0]().mean if "student-int8" in runs else None
        for threads in thread_counts:
            torch.set_num_threads(threads)
            entry["variants"].update(time_variants(runs, arts, args.repeats, n, threads, ref))
        results["datasets"][name] = entry
        print(json.dumps({name: entry["variants"]}, indent=1))
    results["machine"] += f", load {os.getloadavg()[0]:.1f} at end"
    write_results(results, REPO / args.out)
    return 0


def time_variants(runs, arts, repeats: int, n: int, threads: int, ref) -> dict:
    """{"<variant>@<threads>t": numbers}; variants alternate inside each repeat; best of ``repeats``."""
    for ex, post in runs.values():  # warm-up: load encoders, first-call allocations
        ex(), post()
    times: dict[str, dict[str, list[float]]] = {k: {"exante": [], "exante_posthoc": []} for k in runs}
    for _ in range(repeats):
        for k, (ex, post) in runs.items():
            for label, fn in (("exante", ex), ("exante_posthoc", post)):
                t = time.perf_counter()
                fn()
                times[k][label].append(time.perf_counter() - t)
    out = {}
    for k in runs:
        qps = {label: n / min(v) for label, v in times[k].items()}
        enc = arts[k].encoder
        v = {
            "variant": k, "threads": threads,
            "encoder": enc.get("carried") or ("default MiniLM (frozen)" if enc.get("path") == "default" else "frozen folder"),
            "encoder_shape": None if not enc.get("hf_config") else
            f"L{enc['hf_config']['num_hidden_layers']}/H{enc['hf_config']['hidden_size']}",
            "exante_qps": round(qps["exante"], 1),
            "exante_plus_posthoc_qps": round(qps["exante_posthoc"], 1),
            "exante_ratio_vs_minilm": None, "exante_plus_posthoc_ratio_vs_minilm": None,
            "meets_500_qps_exante": bool(qps["exante"] >= TARGET_QPS),
            "seconds_all_repeats": {label: [round(x, 4) for x in t] for label, t in times[k].items()},
        }
        if k == "student-int8":
            v["max_abs_diff_exante_mean_vs_float_student"] = float((runs[k][0]().mean - ref).abs().max())
        out[f"{k}@{threads}t"] = v
    b = out[f"minilm@{threads}t"]
    for v in out.values():
        v["exante_ratio_vs_minilm"] = round(v["exante_qps"] / b["exante_qps"], 2)
        v["exante_plus_posthoc_ratio_vs_minilm"] = round(v["exante_plus_posthoc_qps"] / b["exante_plus_posthoc_qps"], 2)
    return out


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Estimator inference throughput from raw text (queries/s)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"torch {results['torch']}, intra-op threads {results['threads']} on the 2 cores, best of {results['repeats']} "
        f"repeats; {results['machine']}.",
        f"First {results['max_queries']} test queries (the artifacts' own test split), truncated to 128 tokens as the "
        "encoder does. ex-ante = bind + estimate with nothing run "
        "(tokenisation + encoder + heads); ex-ante + post-hoc = the same plus one post-hoc step after the cheapest "
        "model ran (its answer encoded with token_bag). Target: >= 500 queries/s ex-ante.",
        "",
        "| dataset | variant | threads | encoder | ex-ante q/s | x MiniLM | >= 500 | ex-ante + 1 post-hoc q/s | x MiniLM |",
        "|---|---|---:|---|---:|---:|---|---:|---:|",
    ]
    for name, e in results["datasets"].items():
        for k, v in e["variants"].items():
            lines.append(
                f"| {name} ({e['queries']} q, {e['mean_tokens']} tok) | {v['variant']} | {v['threads']} | "
                f"{v['encoder_shape'] or 'L6/H384'} | "
                f"{v['exante_qps']:.0f} | {v['exante_ratio_vs_minilm']:.2f} | {'yes' if v['meets_500_qps_exante'] else 'no'} | "
                f"{v['exante_plus_posthoc_qps']:.0f} | {v['exante_plus_posthoc_ratio_vs_minilm']:.2f} |"
            )
    for name, e in results["datasets"].items():
        for v in e["variants"].values():
            if v["variant"] != "student-int8":
                continue
            lines.append(f"\n{name} ({v['threads']} threads): int8 student max |Δ ex-ante mean| vs float student = "
                         f"{v['max_abs_diff_exante_mean_vs_float_student']:.4f}")
    (out / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
