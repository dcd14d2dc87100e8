"""Bring-your-own-data import, as a new user meets it: a spreadsheet export, an unquoted YAML template,
a model named like a number, a cell Python will not read, a hand-made JSON file. Each gets a clear
error naming what to change (or, for columns no mapping can name, no error at all)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cascade_routing.cli import main
from cascade_routing.data import DatasetError
from cascade_routing.data.importer import import_table

PLAIN = {"query": "q", "models": ["a", "b"], "quality": "{model}_ok", "cost": "{model}_usd"}
HEADER = "q,a_ok,a_usd,b_ok,b_usd"


def _text(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_a_spreadsheets_trailing_unnamed_columns_are_ignored_like_any_unmapped_column(tmp_path: Path) -> None:
    path = _text(tmp_path, "sheet.csv", f"{HEADER},,\nx,1,0.1,0,0.2,,\ny,0,0.1,1,0.2,,\n")
    ds = import_table(path, PLAIN)
    assert ds.quality.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    table = pa.Table.from_arrays([pa.array(["x"]), pa.array([1]), pa.array([0.1]), pa.array([0]), pa.array([0.2]),
                                  pa.array([None], pa.string()), pa.array([None], pa.string())],
                                 names=["q", "a_ok", "a_usd", "b_ok", "b_usd", "", " "])
    pq.write_table(table, tmp_path / "sheet.parquet")
    assert import_table(tmp_path / "sheet.parquet", PLAIN).cost.tolist() == [[0.1, 0.2]]
    # a repeated *named* column is still refused: the mapping could mean either
    with pytest.raises(DatasetError, match=r"repeats column 'a_ok'"):
        import_table(_text(tmp_path, "rep.csv", f"{HEADER},a_ok\nx,1,0.1,0,0.2,0\n"), PLAIN)


def test_a_jsonl_integer_python_will_not_read_names_the_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"q": "x", "a_ok": 1, "a_usd": 0.1, "b_ok": 0, "b_usd": 0.2})
    path = _text(tmp_path, "runs.jsonl", good + "\n" + good.replace('"a_usd": 0.1', '"a_usd": ' + "1" * 5000) + "\n")
    with pytest.raises(DatasetError, match=r"runs\.jsonl: line 2: cannot read a value"):
        import_table(path, PLAIN)


@pytest.mark.parametrize("template", ["{model}_ok", "{model}"])
def test_an_unquoted_model_template_gets_a_hint_to_quote_it(tmp_path: Path, template: str) -> None:
    path = _text(tmp_path, "runs.csv", f"{HEADER}\nx,1,0.1,0,0.2\n")
    mapping = f"query: q\nmodels: [a, b]\nquality: {template}\ncost: '{{model}}_usd'\n"
    with pytest.raises(DatasetError, match=r"quote each template, e\.g\. quality: \"\{model\}_ok\""):
        import_table(path, mapping)


@pytest.mark.parametrize("mapping", [
    "query: q\nmodels: [a, 3.5]\nquality: '{model}_ok'\ncost: '{model}_usd'\n",
    "query: q\nmodels: {a: {quality: a_ok, cost: a_usd}, 3.5: {quality: 3.5_ok, cost: 3.5_usd}}\n",
])
def test_a_model_name_yaml_reads_as_a_number_is_called_a_model_name_with_a_hint_to_quote_it(
        tmp_path: Path, mapping: str) -> None:
    path = _text(tmp_path, "runs.csv", "q,a_ok,a_usd,3.5_ok,3.5_usd\nx,1,0.1,0,0.2\n")
    with pytest.raises(DatasetError, match=r"must be a model name \(a non-empty string\), got 3\.5 "
                                           r"\(YAML read it as a float: quote the name as written, e\.g\. '3\.5'\)"):
        import_table(path, mapping)
    assert import_table(path, mapping.replace("3.5:", "'3.5':").replace(", 3.5]", ", '3.5']")).models == ["a", "3.5"]


def test_an_empty_or_absent_outcome_names_its_model_and_role(tmp_path: Path) -> None:
    path = _text(tmp_path, "runs.csv", f"{HEADER}\nx,1,0.1,0,0.2\ny,1,0.1,0,\n")
    with pytest.raises(DatasetError, match=r"runs\.csv data row 1 \(line 3\): empty cell in column 'b_usd' "
                                           r"\(model 'b', cost; 1 empty or absent in this row\)"):
        import_table(path, PLAIN)
    rows = [{"q": "x", "a_ok": 1, "a_usd": 0.1, "b_ok": 0, "b_usd": 0.2}, {"q": "y", "a_ok": 1, "a_usd": 0.1}]
    path = _text(tmp_path, "runs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=r"runs\.jsonl data row 1 \(line 2\): absent cell in column 'b_ok' "
                                           r"\(model 'b', quality; 2 empty or absent in this row\)"):
        import_table(path, PLAIN)


def test_a_missing_column_names_the_header_cell_it_nearly_matches(tmp_path: Path) -> None:
    path = _text(tmp_path, "runs.csv", "q, a_ok, a_usd, b_ok, b_usd\nx,1,0.1,0,0.2\n")
    with pytest.raises(DatasetError, match=r"missing column 'a_ok' \(model 'a', quality\) \(did you mean ' a_ok'\?\)"):
        import_table(path, PLAIN)


def test_a_json_array_file_is_told_how_to_write_jsonl(tmp_path: Path) -> None:
    path = _text(tmp_path, "runs.json", json.dumps([{"q": "x", "a_ok": 1, "a_usd": 0.1, "b_ok": 0, "b_usd": 0.2}]))
    with pytest.raises(DatasetError, match=r"unsupported file type '\.json'.*orient='records', lines=True"):
        import_table(path, PLAIN)


def test_the_cli_prints_a_cost_outlier_as_a_warning_line_not_a_python_warning(tmp_path: Path, capsys) -> None:
    rows = [f"q{i},1,0.001,0,0.2" for i in range(5)] + ["odd,1,5,0,0.2"]
    path = _text(tmp_path, "runs.csv", "\n".join([HEADER, *rows]) + "\n")
    mapping = '{query: q, models: [a, b], quality: "{model}_ok", cost: "{model}_usd"}'
    assert main(["data", "import", str(path), "--mapping", mapping, "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "1 cost(s) over 1000x the column's median" in err
    assert "CostOutlierWarning" not in err and "data_commands.py" not in err
