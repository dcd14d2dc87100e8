"""Lightning conventions end to end with the tiny encoder: ``train.py fit`` → ``cascade-routing export
--ckpt`` → ``evaluate``; ``load_from_checkpoint``; datamodule hyperparameters; ``fast_dev_run``
never writes an artifact; the shipped configs parse and compose."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from estimators_helpers import make_synthetic_dataset, make_tiny_encoder


def _config(tmp_path: Path) -> Path:
    """A tiny experiment composed from the shipped model/trainer groups plus a data file of its own."""
    data_dir = tmp_path / "data"
    make_synthetic_dataset(200, 3).save(data_dir)
    enc = make_tiny_encoder(tmp_path / "encoder")
    own = {
        "data": {"dataset": str(data_dir), "encoder_path": str(enc), "cache_dir": str(tmp_path / "cache"),
                 "batch_size": 32},
        "model": {"hidden": 32, "lr": 0.005, "neighbours": 20},
        "trainer": {"max_epochs": 10, "default_root_dir": str(tmp_path / "runs" / "tiny"),
                    "enable_progress_bar": False, "enable_model_summary": False},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"compose": ["model/frozen", "trainer/cpu", "logger/wandb_csv"], **own}))
    return path


def _fit(cfg: Path, tmp_path: Path, *extra: str):
    """``python train.py fit --config CFG ...``, in-process (train.py's own ``main``)."""
    from tests.script_helpers import load_script

    return load_script("train.py").main(["fit", "--config", str(cfg), *extra])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    import os

    tmp = tmp_path_factory.mktemp("lightning")
    old = os.getcwd()
    os.chdir(tmp)  # artifacts/ and runs/ land here
    try:
        cfg = _config(tmp)
        cli = _fit(cfg, tmp)
    finally:
        os.chdir(old)
    return {"tmp": tmp, "cli": cli, "cfg": cfg}


def test_fit_fills_paths_from_the_root_and_exports(fitted):
    """The whole ``train.py fit`` path: config composed from shipped groups, checkpoint, export."""
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.training.export import ExportArtifact

    tmp, cli = fitted["tmp"], fitted["cli"]
    ckpt = tmp / "runs" / "tiny" / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportArtifact))
    assert Path(export.artifact_path) == Path("artifacts/tiny.safetensors")
    art = load_artifact(tmp / export.artifact_path)
    assert art.models == ["model-0", "model-1", "model-2"]
    assert set(art.fitted) == {"routing", "threshold_cascade", "optimal_cascade", "cascade_routing"}
    assert art.metrics["best_checkpoint"].endswith("best.ckpt")
    assert not [k for k in art.train_config if k.startswith("_")]  # LightningCLI's _instantiator is not a setting
    assert art.train_config["trained_on"]["task_vocabulary"] == cli.datamodule.task_vocabulary
    assert list((tmp / "runs" / "tiny").rglob("metrics.csv")), "CSVLogger wrote nothing"
    # wandb: one offline run carrying the full resolved config (data, trainer and seed too)
    runs = list((tmp / "runs" / "tiny").rglob("offline-run-*"))
    assert len(runs) == 1, runs
    logger = next(lg for lg in cli.trainer.loggers if type(lg).__name__ == "CascadeWandbLogger")
    config = dict(logger.experiment.config)
    assert config["data"]["dataset"].endswith("data") and config["seed_everything"] == 0
    assert config["trainer"]["max_epochs"] == 10 and config["model"]["neighbours"] == 20


def test_train_py_has_no_predict_subcommand(capsys):
    from cascade_routing.training.lightning_cli import CascadeLightningCLI, lightning_cli

    assert set(CascadeLightningCLI.subcommands()) == {"fit", "validate", "test"}
    with pytest.raises(SystemExit):
        lightning_cli(["predict", "--config", "routerbench"])
    assert "invalid choice: 'predict'" in capsys.readouterr().err


def test_cascade_routing_train_is_train_py(capsys):
    """The installed console script reaches train.py's LightningCLI (a wheel has no train.py)."""
    from cascade_routing.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "{fit,validate,test}" in out and out.startswith("usage: cascade-routing train ")
    with pytest.raises(SystemExit):  # the error's tip names a command that exists
        main(["train", "fit", "--config", "routerbench", "--no_such_option", "1"])
    assert "run: cascade-routing train fit --help" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "fit", "--config", "routerbench", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["dataset"] == "routerbench-subset" and printed["trainer"]["default_root_dir"] == "runs/routerbench"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_gpu_config_without_a_gpu_is_one_error_line(tmp_path, monkeypatch, capsys):
    from cascade_routing.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "fit", "--config", "routerbench", "--config", "finetune_gpu"]) == 2
    err = capsys.readouterr().err
    assert "error: the Trainer cannot run this configuration: No supported gpu backend found" in err
    assert "Traceback" not in err


def test_load_from_checkpoint_rebuilds_the_network(fitted):
    from cascade_routing.training.datamodule import RoutingDataModule
    from cascade_routing.training.module import QualityEstimatorModule

    tmp, cli = fitted["tmp"], fitted["cli"]
    ckpt = tmp / "runs" / "tiny" / "checkpoints" / "best.ckpt"
    loaded = QualityEstimatorModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert loaded.models == ["model-0", "model-1", "model-2"]
    assert loaded.network.config.neighbours == 20 and loaded.network.config.hidden == 32
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    dm = RoutingDataModule(**{k: v for k, v in state["datamodule_hyper_parameters"].items() if not k.startswith("_")})
    assert dm.dataset_name == cli.datamodule.dataset_name and dm.split_fractions == cli.datamodule.split_fractions
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    hparams = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}  # LightningCLI's own keys
    ref = QualityEstimatorModule(**hparams)
    ref.load_state_dict(state["state_dict"])
    ref.eval()
    with torch.no_grad():
        ran = batch["eval_ran"]
        got = loaded.predict_logits(batch, ran)[0]
        want = ref.predict_logits(batch, ran)[0]
    assert torch.equal(got, want)
    # the weights are the trained ones, not a fresh initialisation
    fresh = QualityEstimatorModule(**hparams).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.predict_logits(batch, ran)[0], got)


def test_load_from_checkpoint_of_an_artifact_says_how_to_load_it(fitted, tmp_path):
    """An exported artifact (.safetensors file or save_pretrained folder) given to the Lightning module's
    ``load_from_checkpoint`` was Lightning's raw UnpicklingError (which suggests ``weights_only=False``);
    it is a ValueError naming the file and the artifact loader, and the .ckpt still loads."""
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.training.module import QualityEstimatorModule

    artifact = fitted["tmp"] / "artifacts" / "tiny.safetensors"
    folder = tmp_path / "pretrained"
    load_artifact(artifact).save_pretrained(folder)
    for path in (artifact, str(artifact), folder):
        with pytest.raises(ValueError, match="is an exported estimator artifact") as err:
            QualityEstimatorModule.load_from_checkpoint(path, map_location="cpu")
        assert str(path) in str(err.value) and "load_artifact(path)" in str(err.value)
        assert "EstimatorArtifact.from_pretrained(path)" in str(err.value)
    ckpt = fitted["tmp"] / "runs" / "tiny" / "checkpoints" / "best.ckpt"
    assert QualityEstimatorModule.load_from_checkpoint(str(ckpt), map_location="cpu").models == \
        ["model-0", "model-1", "model-2"]


def test_validation_loss_does_not_depend_on_the_global_generator(fitted):
    """With sampled ran-masks (here 2^3 > ``max_enumerated_masks=4``), ``val/mean_loss`` (the
    checkpoint and early-stopping monitor) is the same under any global seed."""
    import lightning as L

    from cascade_routing.training.datamodule import RoutingDataModule
    from cascade_routing.training.module import QualityEstimatorModule

    ckpt = fitted["tmp"] / "runs" / "tiny" / "checkpoints" / "best.ckpt"
    module = QualityEstimatorModule.load_from_checkpoint(ckpt, map_location="cpu", max_enumerated_masks=4)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    dm = RoutingDataModule(**{k: v for k, v in state["datamodule_hyper_parameters"].items() if not k.startswith("_")})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    losses = []
    for seed in (0, 5):
        torch.manual_seed(seed)
        losses.append(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/mean_loss"])
    assert losses[0] == losses[1]
    # the masks really are sampled: another mask seed gives another loss
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        a = module.loss(batch, torch.Generator().manual_seed(0))[1]["mean_loss"]
        b = module.loss(batch, torch.Generator().manual_seed(1))[1]["mean_loss"]
    assert a != b


def test_a_config_without_a_root_names_its_run_after_the_dataset(tmp_path):
    from cascade_routing.training.export import ExportArtifact
    from cascade_routing.training.lightning_cli import lightning_cli

    cfg = _config(tmp_path)
    own = yaml.safe_load(cfg.read_text())
    del own["trainer"]["default_root_dir"]
    cfg.write_text(yaml.safe_dump(own))
    cli = lightning_cli(["--config", str(cfg)], run=False)
    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportArtifact))
    assert cli.trainer.default_root_dir == str(Path("runs") / "data")  # the dataset folder is tmp/data
    assert Path(export.path) == Path("artifacts/data.safetensors")


def test_a_rerun_replaces_best_ckpt(tmp_path, monkeypatch):
    """The documented path runs/<name>/checkpoints/best.ckpt is the latest run's best, not the first run's."""
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path)
    for _ in range(2):
        cli = _fit(cfg, tmp_path, "--trainer.max_epochs=1", "--trainer.logger=false")
    names = sorted(p.name for p in (tmp_path / "runs" / "tiny" / "checkpoints").iterdir())
    assert names == ["best.ckpt"] and cli.trainer.checkpoint_callback.best_model_path.endswith("best.ckpt")


def test_export_defaults_to_the_artifact_name_fit_writes(fitted, tmp_path, monkeypatch):
    from cascade_routing.training.export import export_checkpoint

    monkeypatch.chdir(tmp_path)
    ckpt = fitted["tmp"] / "runs" / "tiny" / "checkpoints" / "best.ckpt"
    assert export_checkpoint(ckpt, fit_lambdas=False, select=False) == Path("artifacts/tiny.safetensors")
    assert (tmp_path / "artifacts" / "tiny.safetensors").is_file()


def test_export_cli_then_evaluate_writes_points(fitted, capsys):
    from cascade_routing.cli import main
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.training.heldout import evaluate

    tmp = fitted["tmp"]
    ckpt = tmp / "runs" / "tiny" / "checkpoints" / "best.ckpt"
    out = tmp / "exported.safetensors"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--budgets-per-pair", "2", "--no-select"]) == 0
    art = load_artifact(out)
    first = load_artifact(tmp / "artifacts" / "tiny.safetensors")
    # same checkpoint, same calibration split: the same network weights as the end-of-fit export
    assert all(torch.equal(art.state_dict[k], first.state_dict[k]) for k in first.state_dict)
    # the training run is still open (as in train-eval): the evaluation logs into it, one run per experiment
    res = evaluate(str(out), out_dir=str(tmp / "eval"), budgets_per_pair=3, num_resamples=30, progress=False,
                   log_wandb=True, cache_dir=str(tmp / "cache"))
    for name in ("results.csv", "points.csv", "table.md", "curves.png", "curves.svg", "estimator_metrics.json"):
        assert (tmp / "eval" / name).stat().st_size > 100, name
    with open(tmp / "eval" / "points.csv") as fh:
        points = list(csv.DictReader(fh))
    series = {(p["estimator"], p["strategy"]) for p in points}
    assert len(series) == 1 + 2 * 4  # linear interpolation + 2 estimators × 4 strategies
    # every AUC in results.csv is the AUC of its own points (one protocol, one table)
    test = res.curves["learned estimator"][0]
    for row in res.rows:
        pts = [p for p in points if p["estimator"] == row["estimator"] and p["strategy"] == row["strategy"]]
        assert len(pts) == len(test.budgets)
        curve = next(r for r in res.curves["learned estimator" if row["estimator"] != "baseline" else
                                           "baseline estimator"] if r.strategy == row["strategy"])
        assert np.allclose([float(p["mean_quality"]) for p in pts], curve.qualities)
        for p in pts:
            assert float(p["quality_ci_low"]) <= float(p["mean_quality"]) <= float(p["quality_ci_high"])
    # single-model references for paired comparisons: one column per model, the test mean's best = best_single
    test_q = res.extra["test_quality"]
    assert test_q.shape == (test.per_query_quality.shape[1], len(art.models)) == (test_q.shape[0], len(res.extra["models"]))
    assert res.extra["best_single_quality"] == float(test_q.mean(0).max())
    assert res.extra["calibration_mean_quality"].shape == (len(art.models),)
    runs = list(tmp.rglob("offline-run-*"))
    assert len(runs) == 1 and runs[0].is_relative_to(tmp / "runs" / "tiny"), runs
    tables = {t.name.split("_")[0]: json.loads(t.read_text()) for t in runs[0].rglob("*.table.json")}
    assert len(tables["points"]["data"]) == len(points)  # the wandb Table behind the line plot = points.csv
    assert len(tables["auc"]["data"]) == len(res.rows)
    # post-hoc estimates see the run answers, which reveal correctness in the synthetic data
    learned = res.estimator_metrics["learned"]
    assert learned["posthoc_auroc"] > learned["exante_auroc"] + 0.05, learned
    # ... and so does a model's own answer alone (what a cascade decides on after its first model)
    assert learned["own_answer_auroc"] > learned["exante_auroc"] + 0.05, learned
    assert all("own_answer_auroc" in e for e in learned["per_model"].values())


def test_fast_dev_run_never_writes_or_overwrites_an_artifact(fitted, monkeypatch):
    tmp = fitted["tmp"]
    monkeypatch.chdir(tmp)
    target = tmp / "artifacts" / "tiny.safetensors"
    before = target.read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _fit(fitted["cfg"], tmp, "--trainer.fast_dev_run=true")
    assert not [w for w in caught if "both args and command line" in str(w.message)]
    from cascade_routing.training.export import ExportArtifact

    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportArtifact))
    assert export.artifact_path is None and export.skipped == "fast_dev_run"
    assert target.read_bytes() == before


def test_datamodule_saves_its_hyperparameters(tmp_path):
    from cascade_routing.training.datamodule import RoutingDataModule

    dm = RoutingDataModule(dataset="x", split_seed=3, max_length=64)
    assert dm.hparams["split_seed"] == 3 and dm.hparams["max_length"] == 64 and dm.hparams["dataset"] == "x"


def test_wandb_logger_passes_no_anonymous_setting(tmp_path):
    """wandb warns 'The anonymous setting has no effect' whenever init receives it, even as None."""
    from cascade_routing.training.loggers import CascadeWandbLogger

    logger = CascadeWandbLogger(save_dir=str(tmp_path), offline=True, group="g")
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["group"] == "g"


@pytest.mark.parametrize("env, mode", [(None, "offline"), ("offline", "offline"), ("dryrun", "offline"),
                                       ("Online", "online"), ("disabled", "disabled")])
def test_wandb_mode_follows_the_environment(monkeypatch, env, mode):
    from cascade_routing.training.loggers import wandb_mode

    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert wandb_mode() == mode


def test_wandb_disabled_writes_no_run(tmp_path, monkeypatch):
    from cascade_routing.training.loggers import CascadeWandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = CascadeWandbLogger(save_dir=str(tmp_path))
    logger.log_metrics({"a": 1.0})
    logger.experiment.finish()
    assert not list(tmp_path.rglob("offline-run-*")) and not list(tmp_path.rglob("run-*"))


def test_export_of_a_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path, capsys):
    from cascade_routing.cli import main

    assert main(["export", "--ckpt", str(tmp_path / "nope.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert main(["export", "--ckpt", str(foreign)]) == 2
    assert "carries no datamodule hyperparameters" in capsys.readouterr().err


class _NotPlainData:
    pass


def test_export_names_what_a_wrong_file_is_and_never_loads_it_unsafely(tmp_path, capsys):
    """A text file, a pickle of arbitrary objects, an estimator artifact and a tensor file without a
    ``state_dict`` each get one ``error:`` line saying what is wrong; none is retried with
    ``weights_only=False`` (the object pickle would otherwise load)."""
    from safetensors.torch import save_file

    from cascade_routing.cli import main

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    objects = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "extra": _NotPlainData()}, objects)
    artifact = tmp_path / "artifact.safetensors"
    save_file({"w": torch.zeros(2)}, str(artifact))
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(2)}, plain)
    for path, words in ((text, "refused it"), (objects, "refused it: UnpicklingError"),
                        (artifact, "is a safetensors file (an estimator artifact?), not a Lightning checkpoint"),
                        (plain, "is not a Lightning checkpoint (no 'state_dict')")):
        assert main(["export", "--ckpt", str(path), "--out", str(tmp_path / "out.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(path) in err and words in err, err
        assert "weights_only=False" not in err.replace("never loads a checkpoint with weights_only=False", "")
        assert "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_training_masks_are_an_empty_mask_singletons_then_random_ran_masks():
    """Above ``max_enumerated_masks`` the training masks per row are the empty mask, then
    ``singleton_masks`` masks with exactly one model run, then ``masks_per_query`` draws of
    :func:`random_ran_masks` (one sampler for training and calibration)."""
    from cascade_routing.estimators.masks import random_ran_masks
    from cascade_routing.training.module import QualityEstimatorModule

    module = QualityEstimatorModule(masks_per_query=3, singleton_masks=2, max_enumerated_masks=16)
    torch.manual_seed(5)
    rows, ran = module._training_masks(40, 6)  # 2^6 > 16: sampled
    torch.manual_seed(5)
    expected = random_ran_masks(120, 6).reshape(40, 3, 6)
    ran = ran.reshape(40, 6, 6)
    assert not ran[:, 0].any() and torch.equal(ran[:, 3:], expected)
    assert torch.equal(ran[:, 1:3].sum(-1), torch.ones(40, 2, dtype=torch.long))
    assert ran[:, 1:3].any(1).sum(0).min() > 0  # over 80 draws every one of the 6 models runs alone
    assert torch.equal(rows, torch.arange(40).repeat_interleave(6))
    assert ran[:, 3:].any()  # not all empty: the comparison above has something to compare


def test_singleton_masks_zero_gives_the_empty_mask_then_random_masks_and_negative_is_refused():
    from cascade_routing.training.module import QualityEstimatorModule

    module = QualityEstimatorModule(masks_per_query=3, singleton_masks=0, max_enumerated_masks=16)
    _, ran = module._training_masks(4, 6)
    assert ran.shape == (4 * 4, 6) and not ran.reshape(4, 4, 6)[:, 0].any()
    with pytest.raises(ValueError, match="singleton_masks must be >= 0"):
        QualityEstimatorModule(singleton_masks=-1)


def test_an_unknown_confidence_encoding_is_refused_when_the_module_is_configured():
    from cascade_routing.training.module import QualityEstimatorModule

    with pytest.raises(ValueError, match=r"model.confidence_encoding must be one of \('logprob', 'logprob_and_surprise'\), got 'log'"):
        QualityEstimatorModule(confidence_encoding="log")


def test_a_checkpoint_from_before_the_truncation_settings_exports_with_the_cut_it_was_trained_with(fitted):
    """Query and answer truncation became settings (default ``left``) after checkpoints were first
    written; such a checkpoint was trained on the texts' starts and must be exported that way."""
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.training.export import export_checkpoint

    tmp = fitted["tmp"]
    state = torch.load(tmp / "runs" / "tiny" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert state["datamodule_hyper_parameters"]["answer_truncation"] == "left"  # today's default
    for key in ("truncation", "answer_truncation"):
        del state["datamodule_hyper_parameters"][key]
    old = tmp / "older.ckpt"
    torch.save(state, old)
    art = load_artifact(export_checkpoint(old, tmp / "older.safetensors", fit_lambdas=False, select=False))
    assert (art.query_truncation, art.answer_truncation) == ("right", "right")
    # Lightning's own entry point agrees; a current checkpoint keeps what it saved, an argument still wins
    from cascade_routing.training.datamodule import RoutingDataModule

    older = RoutingDataModule.load_from_checkpoint(old)
    assert (older.truncation, older.answer_truncation) == ("right", "right")
    assert older.dataset_name == fitted["cli"].datamodule.dataset_name
    current = RoutingDataModule.load_from_checkpoint(tmp / "runs" / "tiny" / "checkpoints" / "best.ckpt")
    assert (current.truncation, current.answer_truncation) == ("left", "left")
    assert RoutingDataModule.load_from_checkpoint(old, answer_truncation="head_tail").answer_truncation == "head_tail"


def test_the_data_module_refuses_a_length_or_split_it_cannot_use_before_encoding(tmp_path):
    """``data.max_length`` beyond the encoder's limit failed after encoding with a raw tensor-size
    error; 10 queries trained and then failed in the export ("needs >= 4 calibration rows, got 1").
    Both are ValueErrors naming the setting before any encoding."""
    from cascade_routing.training.datamodule import RoutingDataModule

    enc = make_tiny_encoder(tmp_path / "enc")
    ds = make_synthetic_dataset(n=120)
    dm = RoutingDataModule.from_dataset(ds, encoder_path=str(enc), max_length=100, cache_dir=str(tmp_path / "c"))
    dm.tokenizer.model_max_length = 64
    with pytest.raises(ValueError, match=r"data.max_length: max_length 100 is more than the encoder accepts \(64 tokens"):
        dm.prepare_data()
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # nothing was encoded
    small = RoutingDataModule.from_dataset(make_synthetic_dataset(n=12), encoder_path=str(enc), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"has 12 queries, split \{.*'calibration': 2.*at least 4"):
        small.setup("fit")


def test_train_py_reports_a_bad_config_like_the_console_script(tmp_path, capsys):
    """``python train.py fit --config <typo>`` prints the error, not a traceback, exit status 2 (as
    ``cascade-routing train`` does)."""
    import subprocess
    import sys

    from cascade_routing.cli import main
    from script_helpers import REPO

    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", "routerbenchh"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: no config file 'routerbenchh'") and "Traceback" not in proc.stderr
    assert main(["train", "fit", "--config", "routerbenchh"]) == 2
    assert capsys.readouterr().err == proc.stderr
