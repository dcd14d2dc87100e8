"""RouterBench converter: the real RouterDC subset and the full public RouterBench layout."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cascade_routing.data import DatasetError, load_dataset
from cascade_routing.data.converters.routerbench import convert_routerbench
from data_helpers import rb_row, write_routerbench_csv

RB = "routerbench_subset_routerdc/datasets/routerbench_zs"


@pytest.fixture(scope="module")
def subset():
    return load_dataset("routerbench-subset", progress=False)


def test_arc_test_file_counts_and_means(raw_data_dir: Path) -> None:
    ds = convert_routerbench(raw_data_dir / RB / "arc_challenge_test.csv")
    report = ds.metadata["conversion_report"]
    assert report["rows_read"] == 445
    # 6 rows have every model but gpt-3.5 empty, 2 more only gpt-3.5 empty: 439 rows have a
    # gpt-4 outcome, 437 are complete for all 11 models (the ones kept).
    empty_cols = [d["detail"].split(": ", 1)[1].split(", ") for d in report["dropped"]]
    missing_gpt4 = [cols for cols in empty_cols if "gpt-4-1106-preview" in cols]
    assert 445 - len(missing_gpt4) == 439
    assert ds.num_queries == 437 and report["rows_kept"] == 437
    assert report["summary"].endswith("8 incomplete")
    means = dict(zip(ds.models, ds.quality.mean(axis=0)))
    assert round(means["gpt-4-1106-preview"], 3) == 0.957
    assert round(means["mixtral-8x7b-chat"], 3) == 0.863
    assert ds.metadata["original_model_names"]["mixtral-8x7b-chat"] == "mistralai/mixtral-8x7b-chat"
    assert len(set(ds.query_ids)) == ds.num_queries
    assert all(q.startswith("test:arc-challenge.") for q in ds.query_ids)


def test_subset_all_files(subset) -> None:
    ds = subset
    assert ds.num_models == 11 and ds.num_queries == 3150
    report = ds.metadata["conversion_report"]
    assert report["rows_read"] == 3178 and report["rows_kept"] == 3150
    assert {d["reason"] for d in report["dropped"]} == {"incomplete"}
    assert {f: v["read"] for f, v in report["files"].items()} == {
        "arc_challenge_train.csv": 1039, "arc_challenge_test.csv": 445, "mbpp_train.csv": 299,
        "mbpp_test.csv": 128, "winograde_train.csv": 887, "winograde_test.csv": 380}
    assert set(ds.tasks) == {"arc-challenge", "mbpp", "winogrande"}
    origins = {q.split(":")[0] for q in ds.query_ids}
    assert origins == {"train", "test"}
    mean_cost = ds.cost.mean(axis=0)
    assert (np.diff(mean_cost) >= 0).all(), "models must be cheapest first"
    assert ds.responses is not None and ds.responses[0, 0] is not None
    assert "Answer" in ds.queries[0] or "?" in ds.queries[0]
    test_rows = [i for i, q in enumerate(ds.query_ids) if q.startswith("test:")]
    wino = [i for i in test_rows if ds.tasks[i] == "winogrande"]
    assert len(wino) == 380
    assert round(ds.quality[wino, ds.model_index("gpt-4-1106-preview")].mean(), 3) == 0.855


def test_incomplete_rows_dropped_and_logged(raw_data_dir: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="cascade_routing.data"):
        ds = convert_routerbench(raw_data_dir / RB / "arc_challenge_train.csv")
    assert ds.num_queries == 1019
    assert "20 incomplete" in caplog.text and "arc-challenge.val.174" in caplog.text
    dropped = ds.metadata["conversion_report"]["dropped"]
    assert {d["query_id"] for d in dropped} >= {"arc-challenge.val.174", "arc-challenge.val.208"}
    assert all(d["file"] == "arc_challenge_train.csv" and isinstance(d["row"], int) for d in dropped)


def test_strict_names_file_row_model_column(raw_data_dir: Path) -> None:
    with pytest.raises(DatasetError) as err:
        convert_routerbench(raw_data_dir / RB / "arc_challenge_test.csv", strict=True)
    msg = str(err.value)
    assert "arc_challenge_test.csv" in msg and "data row 354" in msg
    assert "gpt-3.5-turbo-1106" in msg and "column" in msg


def test_full_routerbench_layout_synthetic(tmp_path: Path) -> None:
    rows = [
        rb_row("mmlu-abstract-algebra.val.1", "mmlu-abstract-algebra", ["1.0", "0.0", "1.0"], ["0.001", "0.0001", "0.01"]),
        rb_row("gsm8k.test.7", "gsm8k", ["0.0", "0.0", "1.0"], ["0.002", "0.0002", "0.02"]),
        rb_row("gsm8k.test.8", "gsm8k", ["", "1.0", "1.0"], ["0.002", "0.0002", "0.02"]),  # incomplete
        rb_row("gsm8k.test.7", "gsm8k", ["0.0", "0.0", "1.0"], ["0.002", "0.0002", "0.02"]),  # same dup
        rb_row("hellaswag.dev.3", "hellaswag", ["0.5", "1.0", "0.0"], ["0.003", "0.0003", "0.03"]),
    ]
    path = write_routerbench_csv(tmp_path / "routerbench_0shot.csv", rows)
    ds = convert_routerbench(path)
    assert ds.models == ["beta-v1", "alpha-7b", "gamma-70b"]  # short names, cheapest first
    assert ds.metadata["original_model_names"]["alpha-7b"] == "org/alpha-7b"
    assert ds.query_ids == ["routerbench_0shot:mmlu-abstract-algebra.val.1", "routerbench_0shot:gsm8k.test.7",
                            "routerbench_0shot:hellaswag.dev.3"]
    np.testing.assert_allclose(ds.quality[:, ds.model_index("alpha-7b")], [1.0, 0.0, 0.5])
    reasons = sorted(d["reason"] for d in ds.metadata["conversion_report"]["dropped"])
    assert reasons == ["duplicate", "incomplete"]
    assert ds.responses[1, ds.model_index("gamma-70b")] == "other/gamma-70b says it's \"gsm8k.test.7\"\n"
    # The same table as Parquet gives the same dataset.
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False,
                           column_types={m: "string" for m in ["sample_id"]}))
    pq.write_table(table, tmp_path / "rb.parquet")
    ds2 = convert_routerbench(tmp_path / "rb.parquet")
    np.testing.assert_allclose(ds2.quality, ds.quality)
    np.testing.assert_allclose(ds2.cost, ds.cost)


def test_conflicting_duplicates_all_dropped(tmp_path: Path) -> None:
    rows = [
        rb_row("x.1", "t", ["1.0", "0.0", "1.0"], ["0.1", "0.2", "0.3"]),
        rb_row("x.2", "t", ["1.0", "1.0", "1.0"], ["0.1", "0.2", "0.3"]),
        rb_row("x.1", "t", ["0.0", "0.0", "1.0"], ["0.1", "0.2", "0.3"]),
    ]
    ds = convert_routerbench(write_routerbench_csv(tmp_path / "a_test.csv", rows))
    assert ds.query_ids == ["test:x.2"]
    assert [d["reason"] for d in ds.metadata["conversion_report"]["dropped"]] == ["conflicting-duplicate"] * 2
    with pytest.raises(DatasetError, match="duplicate sample_id 'x.1'"):
        convert_routerbench(tmp_path / "a_test.csv", strict=True)


def test_malformed_list_literal(tmp_path: Path) -> None:
    rows = [rb_row("x.1", "t", ["1.0", "0.0", "1.0"], ["0.1", "0.2", "0.3"], prompt="['unterminated")]
    with pytest.raises(DatasetError, match=r"bad\.csv data row 0, column 'prompt': malformed list literal"):
        convert_routerbench(write_routerbench_csv(tmp_path / "bad.csv", rows))


def test_literal_eval_never_executes(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    prompt = f"__import__('os').system('touch {marker}')"
    rows = [rb_row("x.1", "t", ["1.0", "0.0", "1.0"], ["0.1", "0.2", "0.3"], prompt=prompt)]
    with pytest.raises(DatasetError, match="malformed list literal"):
        convert_routerbench(write_routerbench_csv(tmp_path / "evil.csv", rows))
    assert not marker.exists()


def test_missing_column(tmp_path: Path) -> None:
    rows = [rb_row("x.1", "t", ["1.0", "0.0", "1.0"], ["0.1", "0.2", "0.3"])]
    path = write_routerbench_csv(tmp_path / "m.csv", rows, drop_columns=("beta-v1|model_response",))
    with pytest.raises(DatasetError, match=r"m\.csv: missing column 'beta-v1\|model_response' for model 'beta-v1'"):
        convert_routerbench(path)
    path = write_routerbench_csv(tmp_path / "n.csv", rows, drop_columns=("eval_name",))
    with pytest.raises(DatasetError, match="missing column 'eval_name'"):
        convert_routerbench(path)


def test_quality_out_of_range_names_cell(tmp_path: Path) -> None:
    rows = [rb_row("x.1", "t", ["1.0", "0.0", "1.5"], ["0.1", "0.2", "0.3"])]
    with pytest.raises(DatasetError, match=r"q\.csv data row 0, model 'other/gamma-70b'.*above 1"):
        convert_routerbench(write_routerbench_csv(tmp_path / "q.csv", rows))


def test_negative_and_nonfinite_cost_cells(tmp_path: Path) -> None:
    rows = [rb_row("x.1", "t", ["1.0", "0.0", "1.0"], ["0.1", "-0.2", "0.3"])]
    with pytest.raises(DatasetError, match=r"model 'beta-v1', column 'beta-v1\|total_cost'.*below 0"):
        convert_routerbench(write_routerbench_csv(tmp_path / "c.csv", rows))
    rows = [rb_row("x.1", "t", ["1.0", "0.0", "1.0"], ["0.1", "inf", "0.3"])]
    with pytest.raises(DatasetError, match=r"beta-v1\|total_cost.*non-finite"):
        convert_routerbench(write_routerbench_csv(tmp_path / "d.csv", rows))


def test_pickle_input_refused(tmp_path: Path) -> None:
    path = tmp_path / "routerbench_0shot.pkl"
    path.write_bytes(b"not read")
    with pytest.raises(DatasetError, match="pickles are not read"):
        convert_routerbench(path)
