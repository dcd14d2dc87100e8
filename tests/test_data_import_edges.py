"""Bring-your-own-data import: malformed files and unlucky paths get a clear error naming the file
and line (or folder), never a silent guess or a Python traceback from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cascade_routing.cli import main
from cascade_routing.data import DatasetError, RoutingDataset
from cascade_routing.data.importer import import_table

HEADER = "id,question,small_ok,small_usd,big_ok,big_usd"
PLAIN = {"query": "question", "query_id": "id", "models": ["small", "big"],
         "quality": "{model}_ok", "cost": "{model}_usd"}
INLINE = '{query: question, query_id: id, models: [small, big], quality: "{model}_ok", cost: "{model}_usd"}'
ROW = {"id": "a", "question": "2+2?", "small_ok": 1, "small_usd": 0.001, "big_ok": 1, "big_usd": 0.01}


def _text(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_a_jsonl_object_that_repeats_a_key_is_refused_not_read_as_its_last_value(tmp_path: Path) -> None:
    line = json.dumps(ROW)[:-1] + ', "small_ok": 0}'  # small_ok twice: 1, then 0
    path = _text(tmp_path, "runs.jsonl", json.dumps(dict(ROW, id="b")) + "\n" + line + "\n")
    with pytest.raises(DatasetError, match=r"runs\.jsonl: line 2: the object repeats key 'small_ok'"):
        import_table(path, PLAIN)


def test_jsonl_nested_too_deeply_names_the_file_and_line(tmp_path: Path) -> None:
    path = _text(tmp_path, "runs.jsonl", json.dumps(ROW) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DatasetError, match=r"runs\.jsonl: line 2: JSON nested too deeply"):
        import_table(path, PLAIN)


def test_an_unclosed_csv_quote_does_not_swallow_the_later_rows(tmp_path: Path) -> None:
    mapping = {**PLAIN, "response": "{model}_text"}
    path = _text(tmp_path, "runs.csv", "id,question,small_ok,small_usd,small_text,big_ok,big_usd,big_text\n"
                                       'a,q1,1,0.001,4,1,0.01,"Paris\n'  # opened, never closed
                                       "b,q2,0,0.001,5,1,0.02,Lyon\n"
                                       "c,q3,1,0.001,6,0,0.01,Nice\n")
    with pytest.raises(DatasetError, match=r"runs\.csv: line 2: malformed CSV: unexpected end of data "
                                           r"\(a quote opened on or after this line is never closed\)"):
        import_table(path, mapping)


def test_text_after_a_closing_csv_quote_is_an_error_not_glued_on(tmp_path: Path) -> None:
    path = _text(tmp_path, "runs.csv", f'{HEADER}\na,"q1"x,1,0.001,1,0.01\n')
    with pytest.raises(DatasetError, match=r"runs\.csv: line 2: malformed CSV"):
        import_table(path, PLAIN)


def test_well_formed_csv_quoting_still_reads(tmp_path: Path) -> None:
    path = _text(tmp_path, "runs.csv",
                 f'{HEADER}\r\na,"say ""hi"",\r\nthen stop",1,0.001,1,0.01\r\nb,q"2,0,0.001,1,0.02\r\n')
    ds = import_table(path, PLAIN)
    assert ds.queries == ['say "hi",\r\nthen stop', 'q"2']


def test_a_parquet_file_that_repeats_a_column_is_refused_naming_it(tmp_path: Path) -> None:
    base = pa.Table.from_pylist([ROW, dict(ROW, id="b")])
    table = pa.Table.from_arrays(base.columns + [pa.array([0, 0])], names=base.column_names + ["small_ok"])
    path = tmp_path / "runs.parquet"
    pq.write_table(table, path)
    with pytest.raises(DatasetError, match=r"runs\.parquet: the table repeats column 'small_ok' "
                                           r"\(positions 3 and 7\); rename one of them$"):
        import_table(path, PLAIN)


def test_a_folder_given_as_the_table_is_not_reported_as_missing(tmp_path: Path) -> None:
    folder = tmp_path / "runs.parquet"  # e.g. a partitioned dataset written by Spark
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([ROW]), folder / "part-0.parquet")
    with pytest.raises(DatasetError, match=r"runs\.parquet: is a folder, not a table file"):
        import_table(folder, PLAIN)


def test_an_unreadable_table_is_a_cli_error_not_a_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    path = _text(tmp_path, "runs.csv", f"{HEADER}\na,q1,1,0.001,1,0.01\n")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # as root, chmod 000 would still be readable
    assert main(["data", "import", str(path), "--mapping", INLINE, "-o", str(tmp_path / "out")]) == 2
    assert "error: " + str(path) + ": cannot read the file: Permission denied" in capsys.readouterr().err


def test_an_output_path_under_a_file_is_a_cli_error_not_a_traceback(tmp_path: Path, capsys) -> None:
    path = _text(tmp_path, "runs.csv", f"{HEADER}\na,q1,1,0.001,1,0.01\nb,q2,0,0.001,1,0.02\n")
    blocker = _text(tmp_path, "afile", "x")
    assert main(["data", "import", str(path), "--mapping", INLINE, "-o", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot save dataset 'runs' to {blocker / 'sub'}: Not a directory" in err
    assert "Traceback" not in err


def test_a_folder_in_the_way_of_the_table_file_is_an_error_and_leaves_no_temp_file(tmp_path: Path) -> None:
    ds = RoutingDataset(queries=["q1", "q2"], models=["a", "b"], quality=np.ones((2, 2)), cost=np.ones((2, 2)))
    out = tmp_path / "saved"
    (out / "data.parquet").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"cannot save dataset 'dataset' to .*saved: Is a directory "
                                           r"\(.*saved/data\.parquet\)"):
        ds.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["data.parquet"]


def test_an_empty_mapping_string_says_so(tmp_path: Path) -> None:
    path = _text(tmp_path, "runs.csv", f"{HEADER}\na,q1,1,0.001,1,0.01\n")
    for mapping in ("", "   "):
        with pytest.raises(DatasetError, match=r"the column mapping is empty"):
            import_table(path, mapping)


def test_a_feature_that_reads_a_quality_column_is_refused(tmp_path: Path) -> None:
    path = _text(tmp_path, "runs.csv", f"{HEADER}\na,q1,1,0.001,1,0.01\n")
    leak = {**PLAIN, "features": {"confidence": "{model}_ok"}}
    with pytest.raises(DatasetError, match=r"model 'small''s feature 'confidence' reads column 'small_ok', which is "
                                           r"model 'small''s quality"):
        import_table(path, leak)
    shared = {**PLAIN, "features": {"tokens_in": "small_usd"}}  # one shared (non-quality) column stays allowed
    assert import_table(path, shared).features["tokens_in"].shape == (1, 2)


def test_when_drop_leaves_nothing_the_error_names_the_always_empty_columns(tmp_path: Path) -> None:
    path = _text(tmp_path, "runs.csv", f"{HEADER}\na,q1,1,0.001,,\nb,q2,0,0.002,1,\n")  # big never has a cost
    with pytest.raises(DatasetError, match=r"runs\.csv: empty dataset \(every row was dropped: .*\); empty in every "
                                           r"row: column 'big_usd' \(model 'big', cost\)$"):
        import_table(path, {**PLAIN, "missing": "drop"})
