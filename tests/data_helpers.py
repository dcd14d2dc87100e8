"""Helpers for the data-layer tests: tiny synthetic datasets and RouterBench-layout tables."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cascade_routing.data import RoutingDataset

RB_MODELS = ["org/alpha-7b", "beta-v1", "other/gamma-70b"]


def tiny_dataset(n: int = 30, m: int = 3, seed: int = 0, tasks: bool = True) -> RoutingDataset:
    rng = np.random.default_rng(seed)
    return RoutingDataset(
        queries=[f"query {i}" for i in range(n)],
        models=[f"model-{j}" for j in range(m)],
        quality=rng.integers(0, 2, size=(n, m)).astype(float),
        cost=rng.uniform(0.0, 1.0, size=(n, m)) * (np.arange(m) + 1),
        responses=np.array([[f"answer {i}-{j}" if (i + j) % 7 else None for j in range(m)] for i in range(n)], dtype=object),
        features={"tokens_out": rng.integers(1, 100, size=(n, m)).astype(float)},
        tasks=[["a", "b", "c"][i % 3] for i in range(n)] if tasks else None,
        query_ids=[f"q{i}" for i in range(n)],
        metadata={"source": "synthetic", "nested": {"k": [1, 2]}},
        name="tiny",
    )


def write_routerbench_csv(path: Path, rows: list[dict[str, str]], models: list[str] = RB_MODELS,
                          index_column: bool = False, drop_columns: tuple[str, ...] = ()) -> Path:
    """Write a RouterBench-layout CSV (the full public 0-shot/5-shot column layout)."""
    header = (["Unnamed: 0"] if index_column else []) + ["sample_id", "prompt", "eval_name"]
    header += list(models)
    header += [f"{m}|model_response" for m in models]
    header += [f"{m}|total_cost" for m in models]
    header += ["oracle_model_to_route_to"]
    header = [h for h in header if h not in drop_columns]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({"Unnamed: 0": str(i), **row})
    return path


def rb_row(sample_id: str, task: str, quality: list[str], cost: list[str],
           prompt: str | None = None, models: list[str] = RB_MODELS) -> dict[str, str]:
    row = {
        "sample_id": sample_id,
        "prompt": prompt if prompt is not None else repr([f"Question {sample_id}?"]),
        "eval_name": task,
        "oracle_model_to_route_to": models[0],
    }
    for m, q, c in zip(models, quality, cost):
        row[m] = q
        row[f"{m}|total_cost"] = c
        row[f"{m}|model_response"] = repr([f"{m} says it's \"{sample_id}\"\n"])
    return row
