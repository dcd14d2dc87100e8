"""Bring-your-own-data import (CSV / JSONL / Parquet + column mapping) and describe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cascade_routing.data import DatasetError, RoutingDataset
from cascade_routing.data.describe import summarize
from cascade_routing.data.importer import import_table

ROWS = [
    {"id": "a", "question": "2+2?", "subject": "math", "small_ok": 1, "small_usd": 0.001, "big_ok": 1, "big_usd": 0.01,
     "small_text": "4", "big_text": "4", "small_lp": -0.1, "big_lp": -0.01},
    {"id": "b", "question": "capital of France?", "subject": "geo", "small_ok": 0, "small_usd": 0.001, "big_ok": 1,
     "big_usd": 0.02, "small_text": "Lyon", "big_text": "Paris", "small_lp": -2.0, "big_lp": -0.2},
    {"id": "c", "question": "3*3?", "subject": "math", "small_ok": 1, "small_usd": 0.002, "big_ok": 0, "big_usd": 0.01,
     "small_text": "9", "big_text": "6", "small_lp": -0.3, "big_lp": -1.5},
]
TEMPLATE = {
    "query": "question", "query_id": "id", "task": "subject", "models": ["small", "big"],
    "quality": "{model}_ok", "cost": "{model}_usd", "response": "{model}_text",
    "features": {"logprob_confidence": "{model}_lp"},
}


def _write(tmp_path: Path, kind: str, rows=ROWS) -> Path:
    if kind == "csv":
        import csv

        path = tmp_path / "mine.csv"
        with open(path, "w", newline="") as h:
            w = csv.DictWriter(h, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif kind == "jsonl":
        path = tmp_path / "mine.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path = tmp_path / "mine.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_import_formats_agree(tmp_path: Path, kind: str) -> None:
    ds = import_table(_write(tmp_path, kind), TEMPLATE)
    assert ds.models == ["small", "big"] and ds.query_ids == ["a", "b", "c"]
    np.testing.assert_allclose(ds.quality, [[1, 1], [0, 1], [1, 0]])
    np.testing.assert_allclose(ds.cost[:, 1], [0.01, 0.02, 0.01])
    assert ds.responses[1].tolist() == ["Lyon", "Paris"] and ds.tasks == ["math", "geo", "math"]
    np.testing.assert_allclose(ds.features["logprob_confidence"][2], [-0.3, -1.5])
    back = RoutingDataset.load(ds.save(tmp_path / "saved"))
    assert back.query_ids == ds.query_ids


def test_import_explicit_mapping_file(tmp_path: Path) -> None:
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(
        "query: question\nname: mine\nmodels:\n"
        "  tiny: {quality: small_ok, cost: small_usd}\n"
        "  huge: {quality: big_ok, cost: big_usd, response: big_text}\n"
    )
    ds = import_table(_write(tmp_path, "csv"), mapping)
    assert ds.name == "mine" and ds.models == ["tiny", "huge"] and ds.tasks is None
    assert ds.responses[:, 0].tolist() == [None, None, None]


def test_import_missing_column(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"mine\.csv: missing column 'medium_ok' \(model 'medium', quality\)"):
        import_table(_write(tmp_path, "csv"), {**TEMPLATE, "models": ["small", "medium"]})


def test_import_empty_cell_error_or_drop(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[1]["big_usd"] = ""
    path = _write(tmp_path, "csv", rows)
    with pytest.raises(DatasetError, match=r"mine\.csv row 1: empty cell in column 'big_usd'"):
        import_table(path, TEMPLATE)
    ds = import_table(path, {**TEMPLATE, "missing": "drop"})
    assert ds.query_ids == ["a", "c"]
    assert ds.metadata["conversion_report"]["dropped"][0]["query_id"] == "b"


def test_import_malformed_value(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[2]["small_ok"] = "yes-ish"
    with pytest.raises(DatasetError, match=r"mine\.csv row 2, model 'small', column 'small_ok': not a number"):
        import_table(_write(tmp_path, "csv", rows), TEMPLATE)
    rows[2]["small_ok"] = "nan"
    with pytest.raises(DatasetError, match=r"row 2, model 'small', column 'small_ok': non-finite"):
        import_table(_write(tmp_path, "csv", rows), TEMPLATE)


def test_import_malformed_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{broken\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        import_table(path, TEMPLATE)


def test_import_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DatasetError, match="empty dataset"):
        import_table(path, TEMPLATE)


def test_import_duplicate_model_names(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="duplicate model names"):
        import_table(_write(tmp_path, "csv"), {**TEMPLATE, "models": ["small", "small"]})


def test_describe_summary_numbers() -> None:
    ds = RoutingDataset(queries=["a", "b", "c", "d"], models=["cheap", "dear"],
                        quality=[[1, 1], [0, 1], [0, 0], [1, 0]], cost=[[1, 10], [1, 10], [1, 10], [3, 10]],
                        tasks=["x", "x", "y", "x"])
    s = summarize(ds)
    assert [m["model"] for m in s["models"]] == ["cheap", "dear"]
    assert s["models"][0]["mean_quality"] == 0.5 and s["models"][0]["mean_cost"] == 1.5
    assert s["oracle_quality"] == 0.75  # max per query: 1, 1, 0, 1
    assert s["oracle_cost"] == (1 + 10 + 1 + 3) / 4  # cheapest model among the best per query
    assert s["tasks"] == {"x": 3, "y": 1} and s["num_queries"] == 4
