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


def test_counts_of_zero_are_refused_by_option_name(capsys):
    import pytest

    for argv, option in ((["evaluate", "--checkpoint", "x.safetensors", "--budgets-per-pair", "0"], "--budgets-per-pair"),
                         (["evaluate", "--checkpoint", "x.safetensors", "--resamples", "-3"], "--resamples"),
                         (["reproduce", "routerbench", "--resamples", "0"], "--resamples"),
                         (["train-eval", "--budgets-per-pair", "zero"], "--budgets-per-pair")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and f"argument {option}:" in capsys.readouterr().err


def test_curve_labels_match_the_tables_and_minor_ticks_do_not_crowd():
    import matplotlib.pyplot as plt

    from cascade_routing.evaluation.plots import _label_minor_ticks, _minor_label, auc_text

    assert auc_text(80.5954) == f"{round(80.5954, 3):.2f}" == "80.59"  # what table.md prints from results.csv
    assert _minor_label(2e-4, 0) == "$2\\times10^{-4}$" and _minor_label(5e-3, 0) == "$5\\times10^{-3}$"
    assert _minor_label(3e-4, 0) == "" and _minor_label(6e-5, 0) == ""
    fig, (narrow, wide) = plt.subplots(1, 2)
    for ax, (low, high) in ((narrow, (2.5e-4, 6e-3)), (wide, (8e-5, 5e-2))):
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        _label_minor_ticks(ax)
    assert narrow.xaxis.get_minor_formatter()(2e-3, 0) != "" and wide.xaxis.get_minor_formatter()(2e-3, 0) == ""
    plt.close(fig)


def test_train_eval_no_baseline_reaches_the_evaluation(monkeypatch):
    """``train-eval --no-baseline`` evaluates the learned estimator alone, as ``evaluate
    --no-baseline`` does (the baseline cannot fit more than MAX_BASELINE_MODELS models)."""
    from cascade_routing.cli import estimator_commands

    seen = []
    monkeypatch.setattr(estimator_commands, "train_eval", lambda *args, **kwargs: seen.append(kwargs["estimators"]))
    assert main(["train-eval", "--config", "routerbench", "--no-baseline", "--no-wandb"]) == 0
    assert main(["train-eval", "--config", "routerbench", "--no-wandb"]) == 0
    assert seen == [("learned",), ("learned", "baseline")]


def test_evaluate_help_says_a_save_pretrained_folder_works(capsys):
    """``evaluate --checkpoint`` reads a .safetensors file or a save_pretrained folder (load_artifact);
    its help said .safetensors only."""
    import pytest

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ".safetensors file, or a folder written by EstimatorArtifact.save_pretrained" in help_text, help_text
