"""Bring-your-own-data import (CSV / JSONL / Parquet + column mapping) and describe."""

from __future__ import annotations

import json
import re
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
    with pytest.raises(DatasetError, match=r"mine\.csv data row 1 \(line 3\): empty cell in column 'big_usd'"):
        import_table(path, TEMPLATE)
    ds = import_table(path, {**TEMPLATE, "missing": "drop"})
    assert ds.query_ids == ["a", "c"]
    assert ds.metadata["conversion_report"]["dropped"][0]["query_id"] == "b"


def test_import_malformed_value(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[2]["small_ok"] = "yes-ish"
    with pytest.raises(DatasetError, match=r"mine\.csv data row 2 \(line 4\), model 'small', column 'small_ok': not a number"):
        import_table(_write(tmp_path, "csv", rows), TEMPLATE)
    rows[2]["small_ok"] = "nan"
    with pytest.raises(DatasetError, match=r"data row 2 \(line 4\), model 'small', column 'small_ok': non-finite"):
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


def _csv_text(tmp_path: Path, text: str, name: str = "mine.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


PLAIN = {"query": "question", "query_id": "id", "models": ["small", "big"], "quality": "{model}_ok",
         "cost": "{model}_usd"}


@pytest.mark.parametrize("mapping, message", [
    ({**TEMPLATE, "querry_id": "id"}, r"unknown key 'querry_id' \(did you mean 'query_id'\?\)"),
    ({**TEMPLATE, "split": "fold"}, r"unknown key 'split'"),
    ({**PLAIN, "quality": "small_ok"}, r"'quality' template 'small_ok' has no \{model\}"),
    ({"query": "question", "models": {"small": {"quality": "small_ok", "cost": "small_ok"},
                                      "big": {"quality": "big_ok", "cost": "big_usd"}}},
     r"column 'small_ok' is both model 'small'.s quality and model 'small'.s cost"),
    ({"query": "question", "models": {"small": {"quality": "small_ok", "cost": "small_usd"},
                                      "big": {"quality": "small_ok", "cost": "big_usd"}}},
     r"column 'small_ok' is both model 'small'.s quality and model 'big'.s quality"),
    ({**PLAIN, "quality": "id"}, r"'quality' template 'id' has no \{model\}"),
    ({**PLAIN, "features": ["x"]}, r"'features' must map feature names to columns"),
    ({**PLAIN, "query": ["question"]}, r"'query' must be a column name \(a non-empty string\), got \['question'\]"),
    ({"query": "question", "models": {"small": "small_ok", "big": "big_ok"}},
     r"model 'small' must map quality/cost/response/features to columns"),
    ({"query": "question", "models": {"small": {"quality": "small_ok", "cost": "small_usd", "respnse": "x"},
                                      "big": {"quality": "big_ok", "cost": "big_usd"}}},
     r"model 'small': unknown key 'respnse' \(did you mean 'response'\?\)"),
    ({**PLAIN, "name": 2024}, r"'name' must be a non-empty string, got 2024"),
    ({**PLAIN, "models": ["big"]}, r"routing needs at least two models, got 1 \(\['big'\]\)"),
])
def test_mapping_mistakes_that_would_import_wrong_data_are_refused(tmp_path: Path, mapping, message) -> None:
    with pytest.raises(DatasetError, match=message):
        import_table(_write(tmp_path, "csv"), mapping)


def test_csv_with_a_repeated_header_column_is_refused(tmp_path: Path) -> None:
    path = _csv_text(tmp_path, "id,question,small_ok,small_usd,big_ok,big_usd,small_ok\n"
                               "a,q?,1,0.1,1,1.0,0\n")
    with pytest.raises(DatasetError, match=r"mine\.csv: the header repeats column 'small_ok' \(positions 3 and 7\)"):
        import_table(path, PLAIN)


def test_a_semicolon_separated_csv_gets_a_hint(tmp_path: Path) -> None:
    path = _csv_text(tmp_path, "id;question;small_ok;small_usd;big_ok;big_usd\na;q?;1;0.1;0;1.0\n")
    with pytest.raises(DatasetError, match=r"missing column 'question'.*is the file ';'-separated\?"):
        import_table(path, PLAIN)


def test_every_jsonl_row_is_checked_not_only_the_first(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    del rows[2]["subject"]
    path = _write(tmp_path, "jsonl", rows)
    with pytest.raises(DatasetError, match=r"mine\.jsonl data row 2 \(line 3\): no field 'subject' \(the task label\)"):
        import_table(path, TEMPLATE)
    rows = [dict(r) for r in ROWS]
    rows[1]["id"] = None
    with pytest.raises(DatasetError, match=r"mine\.jsonl data row 1 \(line 2\): empty query id in column 'id'"):
        import_table(_write(tmp_path, "jsonl", rows), TEMPLATE)
    rows = [dict(r) for r in ROWS]
    del rows[0]["subject"]  # absent from the first row only: the column exists, row 0 lacks it
    with pytest.raises(DatasetError, match=r"data row 0 \(line 1\): no field 'subject'"):
        import_table(_write(tmp_path, "jsonl", rows), TEMPLATE)
    rows = [dict(r) for r in ROWS]
    del rows[1]["big_usd"]  # an absent outcome is an empty cell: dropped under `missing: drop`
    ds = import_table(_write(tmp_path, "jsonl", rows), {**TEMPLATE, "missing": "drop"})
    assert ds.query_ids == ["a", "c"]


def test_duplicate_ids_name_both_rows_and_the_column(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[2]["id"] = "a"
    with pytest.raises(DatasetError, match=r"mine\.csv data row 2 \(line 4\): duplicate query id 'a' in column 'id' "
                                           r"\(first at mine\.csv data row 0 \(line 2\)\)"):
        import_table(_write(tmp_path, "csv", rows), TEMPLATE)


def test_cell_errors_after_a_dropped_row_name_the_source_row(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[0]["big_usd"] = None
    rows[2]["small_lp"] = 0.5
    with pytest.raises(DatasetError, match=r"mine\.jsonl data row 2 \(line 3\), model 'small', column 'small_lp': "
                                           r"logprob_confidence must be a log-probability"):
        import_table(_write(tmp_path, "jsonl", rows), {**TEMPLATE, "missing": "drop"})


@pytest.mark.parametrize("cell, value", [("true", 1.0), ("FALSE", 0.0), ("True", 1.0), ("1", 1.0)])
def test_quality_reads_booleans_in_any_case(tmp_path: Path, cell: str, value: float) -> None:
    path = _csv_text(tmp_path, f"id,question,small_ok,small_usd,big_ok,big_usd\na,q?,{cell},0.1,0,1.0\n")
    assert import_table(path, PLAIN).quality[0, 0] == value


@pytest.mark.parametrize("cell, message", [("True", r"not a number: 'True' \(a boolean\)"),
                                           ("1_000", r"not a number: '1_000'"),
                                           ("1" + "0" * 400, r"number too large|non-finite")])
def test_cost_must_be_a_plain_number(tmp_path: Path, cell: str, message: str) -> None:
    path = _csv_text(tmp_path, f"id,question,small_ok,small_usd,big_ok,big_usd\na,q?,1,{cell},0,1.0\n")
    with pytest.raises(DatasetError, match=r"data row 0 \(line 2\), model 'small', column 'small_usd': " + message):
        import_table(path, PLAIN)
    jsonl = tmp_path / "big.jsonl"
    jsonl.write_text('{"id": "a", "question": "q?", "small_ok": 1, "small_usd": 1' + "0" * 400
                     + ', "big_ok": 0, "big_usd": 1.0}\n')
    with pytest.raises(DatasetError, match=r"column 'small_usd': number too large for a float"):
        import_table(jsonl, PLAIN)


def test_a_utf8_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = _csv_text(tmp_path, "\ufeffid,question,small_ok,small_usd,big_ok,big_usd\na,q?,1,0.1,0,1.0\n")
    assert import_table(path, PLAIN).query_ids == ["a"]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert import_table(jsonl, TEMPLATE).query_ids == ["a"]


def test_query_text_must_be_text_and_not_blank(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[1]["question"] = "   "
    with pytest.raises(DatasetError, match=r"data row 1 \(line 2\): empty cell in column 'question'"):
        import_table(_write(tmp_path, "jsonl", rows), TEMPLATE)
    rows[1]["question"] = ["a", "b"]
    with pytest.raises(DatasetError, match=r"data row 1 \(line 2\): the query in column 'question' must be text"):
        import_table(_write(tmp_path, "jsonl", rows), TEMPLATE)


def test_missing_responses_are_none_not_the_text_nan(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[1]["small_text"] = float("nan")  # json.dumps writes NaN, which Python's json reads back
    ds = import_table(_write(tmp_path, "jsonl", rows), TEMPLATE)
    assert ds.responses[1].tolist() == [None, "Paris"]


def test_a_folder_named_like_a_registered_dataset_does_not_shadow_it(tmp_path: Path, monkeypatch,
                                                                      raw_data_dir: Path) -> None:
    from cascade_routing.data import load_dataset

    import_table(_write(tmp_path, "csv"), TEMPLATE).save(tmp_path / "routellm-mt-bench")
    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(raw_data_dir.resolve()))  # CI gives a relative path
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"folder 'routellm-mt-bench' .* registered dataset; loading the registered one"):
        registered = load_dataset("routellm-mt-bench", progress=False)
    assert registered.num_queries == 160
    assert load_dataset("./routellm-mt-bench").query_ids == ["a", "b", "c"]


def test_jsonl_lines_end_only_at_newline_not_at_unicode_line_separators(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[1]["question"] = "capital\u2028of\u0085France\u2029?\x0b"  # json.dumps(ensure_ascii=False): raw
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    path = tmp_path / "seps.jsonl"
    path.write_bytes((lines[0] + "\r\n" + lines[1] + "\n" + lines[2]).encode())  # CRLF, LF, no final newline
    ds = import_table(path, TEMPLATE)
    assert ds.query_ids == ["a", "b", "c"] and ds.queries[1] == rows[1]["question"]
    path.write_bytes((lines[1] + "\n\n" + lines[0] + "\n{broken\n").encode())
    with pytest.raises(DatasetError, match=r"seps\.jsonl: line 4 is not valid JSON"):
        import_table(path, TEMPLATE)
    rows[2]["small_ok"] = "yes-ish"
    path.write_bytes((lines[1] + "\n" + json.dumps(rows[2], ensure_ascii=False) + "\n").encode())
    with pytest.raises(DatasetError, match=r"seps\.jsonl data row 1 \(line 2\), model 'small', column 'small_ok'"):
        import_table(path, TEMPLATE)


@pytest.mark.parametrize("cell", ["1e300", "1.7e308", "1e39", "1000001"])
def test_a_cost_no_query_can_have_is_refused_naming_row_model_and_column(tmp_path: Path, cell: str) -> None:
    rows = [dict(r) for r in ROWS]
    rows[1]["big_usd"] = cell
    with pytest.raises(DatasetError, match=r"mine\.csv data row 1 \(line 3\), model 'big', column 'big_usd': cost "
                                           r"\S+ is above 1e\+06 USD"):
        import_table(_write(tmp_path, "csv", rows), TEMPLATE)
    rows[1]["big_usd"] = float(cell)
    with pytest.raises(DatasetError, match=r"mine\.jsonl data row 1 \(line 2\), model 'big', column 'big_usd': cost"):
        import_table(_write(tmp_path, "jsonl", rows), TEMPLATE)
    rows[1]["big_usd"] = 1e6  # the ceiling itself is accepted (with an outlier warning)
    with pytest.warns(UserWarning):
        assert import_table(_write(tmp_path, "csv", rows), TEMPLATE).cost[1, 1] == 1e6


def test_a_cost_far_above_its_column_median_is_warned_about_and_kept(tmp_path: Path) -> None:
    from cascade_routing.data.importer import CostOutlierWarning

    rows = [dict(r) for r in ROWS]
    rows[2]["big_usd"] = 50.0  # median of big_usd is 0.02: 2500x
    with pytest.warns(CostOutlierWarning, match=r"model 'big', column 'big_usd': 1 cost\(s\) over 1000x the column's "
                                                r"median 0\.02 USD \(mine\.csv data row 2 \(line 4\): 50\)"):
        ds = import_table(_write(tmp_path, "csv", rows), TEMPLATE)
    assert ds.cost[2, 1] == 50.0 and "data row 2" in ds.metadata["conversion_report"]["notes"][0]
    rows[2]["big_usd"] = 15.0  # 750x the median: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", CostOutlierWarning)
        assert import_table(_write(tmp_path, "csv", rows), TEMPLATE).metadata["conversion_report"]["notes"] == []
        rows = [dict(r, small_usd=0.0) for r in ROWS]
        rows[0]["small_usd"] = 3.0  # a median of 0 gives no scale: no warning
        import_table(_write(tmp_path, "csv", rows), TEMPLATE)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_non_comma_csv_with_decimal_commas_gets_the_separator_hint(tmp_path: Path, sep: str) -> None:
    header = sep.join(["id", "question", "small_ok", "small_usd", "big_ok", "big_usd"])
    path = _csv_text(tmp_path, f"{header}\na{sep}q?{sep}1{sep}0,5{sep}0{sep}1,0\n")
    with pytest.raises(DatasetError, match=r"mine\.csv: data row 0 \(line 2\) has 3 cells, the header has 1 \(the "
                                           r"header is one column: is the file " + re.escape(repr(sep)) + "-separated"):
        import_table(path, PLAIN)
    path = _csv_text(tmp_path, f"id,question{sep}x,small_ok,small_usd,big_ok,big_usd\na,q?,1,0.1,0,1.0,9\n")
    with pytest.raises(DatasetError, match=r"data row 0 \(line 2\) has 7 cells, the header has 6 \(the header holds"):
        import_table(path, PLAIN)
    path = _csv_text(tmp_path, "id,question,small_ok,small_usd,big_ok,big_usd\na,q?,1,0.1,0,1.0,9\n")
    with pytest.raises(DatasetError, match=r"has 7 cells, the header has 6$"):
        import_table(path, PLAIN)
