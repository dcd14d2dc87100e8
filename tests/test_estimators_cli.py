"""`cascade-routing inspect-artifact` agrees with the Python API on a real saved artifact."""

from __future__ import annotations

import json

from cascade_routing.cli import main
from cascade_routing.estimators.artifact import load_artifact
from tests.serving_helpers import make_tiny_artifact, synthetic_dataset


def test_inspect_artifact_prints_what_load_artifact_reads(tmp_path, capsys):
    path, _ = make_tiny_artifact(synthetic_dataset(), tmp_path, strategies=("routing",))
    assert main(["inspect-artifact", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    art = load_artifact(path)
    assert shown["models"] == art.models
    assert shown["uncertainty"] == art.uncertainty
    assert shown["uncertainty_selection"] == art.uncertainty_selection
    assert shown["fitted_budgets"] == {"routing": sorted(art.fitted["routing"])}


def test_inspect_artifact_on_a_foreign_file_is_a_clear_error(tmp_path, capsys):
    bogus = tmp_path / "notes.safetensors"
    bogus.write_text("not an artifact")
    assert main(["inspect-artifact", str(bogus)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "notes.safetensors" in err
