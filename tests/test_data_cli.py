"""`cascade-routing data ...` subcommands (through cascade_routing.cli.main, as the console script)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cascade_routing.cli import main


def test_describe_routerbench_subset(capsys) -> None:
    assert main(["data", "describe", "routerbench-subset", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3150 queries x 11 models" in out and "oracle (best model per query)" in out
    lines = [line for line in out.splitlines() if "│" in line and line.split("│")[1].strip().isdigit()]
    assert len(lines) == 11
    assert "mistral-7b-chat" in lines[0] and "gpt-4-1106-preview" in lines[-1]  # cheapest first
    costs = [float(line.split("│")[4]) for line in lines]
    assert costs == sorted(costs)
    assert "arc-challenge (1456), mbpp (427), winogrande (1267)" in out


def test_describe_json_and_list(capsys) -> None:
    assert main(["data", "describe", "routellm-gsm8k", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_queries"] == 1319
    assert [round(m["mean_quality"], 4) for m in summary["models"]] == [0.6384, 0.8567]
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("routerbench-subset", "rational-llm-cascades", "routellm-mmlu", "routellm-gsm8k", "routellm-mt-bench"):
        assert name in out


def test_fetch_with_local_mirror(capsys) -> None:
    assert main(["data", "fetch", "routellm-mt-bench", "--quiet"]) == 0
    assert "routellm-mt-bench: 160 queries x 2 models" in capsys.readouterr().out


def test_import_and_describe_saved_folder(tmp_path: Path, capsys) -> None:
    table = tmp_path / "runs.jsonl"
    table.write_text("".join(json.dumps({"q": f"q{i}", "a": i % 2, "ca": 0.1, "b": 1, "cb": 0.5}) + "\n" for i in range(6)))
    mapping = json.dumps({"query": "q", "models": {"m-a": {"quality": "a", "cost": "ca"}, "m-b": {"quality": "b", "cost": "cb"}}})
    out_dir = tmp_path / "saved"
    assert main(["data", "import", str(table), "--mapping", mapping, "-o", str(out_dir)]) == 0
    capsys.readouterr()
    assert main(["data", "describe", str(out_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_queries"] == 6 and summary["oracle_quality"] == 1.0


def test_cli_errors_are_clear(tmp_path: Path, capsys) -> None:
    assert main(["data", "describe", "no-such-dataset"]) == 2
    assert "unknown dataset 'no-such-dataset'" in capsys.readouterr().err
    mapping = '{query: q, models: [a, b], quality: "{model}_ok", cost: "{model}_usd"}'
    assert main(["data", "import", str(tmp_path / "nothing.csv"), "--mapping", mapping]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["data", "import", str(tmp_path / "nothing.csv"), "--mapping", "{query: q, models: [a]}"]) == 2
    assert "needs a 'quality' column template" in capsys.readouterr().err


def test_import_refuses_an_unusable_max_length_before_writing_anything(tmp_path: Path, capsys) -> None:
    table = tmp_path / "runs.jsonl"
    table.write_text("".join(json.dumps({"q": f"q{i}", "a": i % 2, "ca": 0.1, "b": 1, "cb": 0.5}) + "\n" for i in range(4)))
    mapping = '{query: q, models: {m-a: {quality: a, cost: ca}, m-b: {quality: b, cost: cb}}}'
    out_dir = tmp_path / "saved"
    with pytest.raises(SystemExit):
        main(["data", "import", str(table), "--mapping", mapping, "-o", str(out_dir), "--max-length", "0"])
    assert "--max-length: must be at least 1, got 0" in capsys.readouterr().err and not out_dir.exists()
    assert main(["data", "import", str(table), "--mapping", mapping, "-o", str(out_dir), "--max-length", "2"]) == 2
    assert "--max-length 2: max_length 2 leaves no room" in capsys.readouterr().err and not out_dir.exists()


def test_import_into_a_registered_name_prints_a_load_hint_that_reads_the_folder(tmp_path: Path, capsys,
                                                                                 monkeypatch) -> None:
    """A bare registered name loads the registered dataset, so the printed hint must say './name'."""
    import warnings

    from cascade_routing.data import load_dataset

    table = tmp_path / "runs.jsonl"
    table.write_text("".join(json.dumps({"q": f"q{i}", "a": i % 2, "ca": 0.1, "b": 1, "cb": 0.5}) + "\n" for i in range(4)))
    mapping = '{query: q, models: {m-a: {quality: a, cost: ca}, m-b: {quality: b, cost: cb}}}'
    monkeypatch.chdir(tmp_path)
    assert main(["data", "import", str(table), "--mapping", mapping, "-o", "routellm-mt-bench"]) == 0
    out = capsys.readouterr().out
    assert "load_dataset('./routellm-mt-bench')" in out, out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dataset("./routellm-mt-bench").num_queries == 4  # what the hint says reads the folder
    assert main(["data", "import", str(table), "--mapping", mapping, "-o", "mine"]) == 0
    assert "load_dataset('mine')" in capsys.readouterr().out
