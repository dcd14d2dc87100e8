"""Windowed query tokenization (``encoding.tokenize``) against tokenizing each whole text, same run.

For every dataset, truncation mode and max length it tokenizes all queries both ways with MiniLM's
tokenizer and reports the number of queries whose ids differ (must be 0) and the CPU time per
query of each way (best of ``--repeats``, ``time.process_time``, so the tokenizer's own threads
count), with their ratio. The baseline is the whole-text path: the tokenizer on each full text,
then ``encoding.truncate_ids``.

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_tokenize.py \\
        --out benchmarks/results/tokenize

Writes ``<out>/summary.json`` and ``<out>/summary.md``.
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

DATASETS = ("routerbench-subset", "rational-llm-cascades", "routellm-gsm8k", "routellm-mmlu")


def whole_text(texts: list[str], tokenizer, max_length: int, truncation: str) -> list[list[int]]:
    """The baseline: every text tokenized whole, then cut (what ``tokenize`` did without windows)."""
    from cascade_routing.estimators import encoding

    lead, trail = encoding._special_tokens(tokenizer)
    keep = max_length - len(lead) - len(trail)
    body = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [lead + encoding.truncate_ids(ids, keep, truncation) + trail for ids in body]


def best_cpu_ms_per_text(fn, texts: list[str], repeats: int) -> tuple[float, list[list[int]]]:
    best, out = float("inf"), []
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        best = min(best, (time.process_time() - start) / len(texts) * 1000)
    return best, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--max-lengths", default="64,128,256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/tokenize")
    args = p.parse_args(argv)

    from cascade_routing.data import load_dataset
    from cascade_routing.estimators import encoding

    tokenizer = encoding.load_tokenizer(encoding.default_encoder_path())
    rows = []
    for name in args.datasets.split(","):
        texts = [str(q) for q in load_dataset(name).queries]
        chars = sum(len(t) for t in texts) / len(texts)
        for max_length in (int(x) for x in args.max_lengths.split(",")):
            for truncation in encoding.TRUNCATIONS:
                base_ms, want = best_cpu_ms_per_text(lambda: whole_text(texts, tokenizer, max_length, truncation),
                                                     texts, args.repeats)
                new_ms, got = best_cpu_ms_per_text(lambda: encoding.tokenize(texts, tokenizer, max_length, truncation),
                                                   texts, args.repeats)
                rows.append({"dataset": name, "queries": len(texts), "mean_chars": round(chars, 1),
                             "max_length": max_length, "truncation": truncation,
                             "differing_queries": sum(a != b for a, b in zip(got, want)),
                             "whole_text_ms_per_query": round(base_ms, 4), "windowed_ms_per_query": round(new_ms, 4),
                             "speedup": round(base_ms / new_ms, 2)})
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_tokenize.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "summary.json").write_text(json.dumps({"command": command, "load_average": os.getloadavg(),
                                                  "rows": rows}, indent=2))
    lines = [f"`{command}` (load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}; CPU ms "
             "per query, best of the repeats; baseline = each text tokenized whole)", "",
             "| dataset | mean characters | max_length | truncation | differing queries | whole text | windowed | speed-up |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['dataset']} | {r['mean_chars']:.0f} | {r['max_length']} | {r['truncation']} | {r['differing_queries']} "
              f"| {r['whole_text_ms_per_query']:.3f} | {r['windowed_ms_per_query']:.3f} | {r['speedup']:.2f}x |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return 1 if any(r["differing_queries"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
