"""Experiment tracking and checkpoints: what a ``train.py fit`` logs (hyperparameters the module
derives from the data, an epoch-level train loss next to val/loss), one wandb run per experiment even
when a process trains twice, training without wandb when asked, ``--help`` saying how wandb runs,
and ``load_from_checkpoint`` of a broken or foreign file naming it instead of torch's bare error."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
import yaml

from estimators_helpers import make_synthetic_dataset, make_tiny_encoder


def _config(tmp: Path) -> Path:
    """A tiny experiment with the shipped logger group (CSV + wandb): 120 queries, 3 models, so an
    epoch is 3 training batches, fewer than ``log_every_n_steps`` (5)."""
    data_dir = tmp / "data"
    make_synthetic_dataset(120, 3).save(data_dir)
    enc = make_tiny_encoder(tmp / "encoder")
    own = {
        "data": {"dataset": str(data_dir), "encoder_path": str(enc), "cache_dir": str(tmp / "cache"), "batch_size": 32},
        "model": {"hidden": 16, "lr": 0.005, "neighbours": 5},
        "trainer": {"max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": []},  # no export: Lightning's default checkpoint only
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump({"compose": ["model/frozen", "trainer/cpu", "logger/wandb_csv"], **own}))
    return path


def _loggers(cli) -> dict[str, object]:
    return {type(lg).__name__: lg for lg in cli.trainer.loggers}


@pytest.fixture(scope="module")
def two_fits(tmp_path_factory):
    """Two experiments trained one after the other in one process (as ``benchmarks/bench_estimators.py``
    and a notebook do), wandb offline."""
    import wandb

    from cascade_routing.training.lightning_cli import lightning_cli

    tmp = tmp_path_factory.mktemp("tracking")
    cfg = _config(tmp)
    old, mode = os.getcwd(), os.environ.get("WANDB_MODE")
    os.chdir(tmp)
    os.environ["WANDB_MODE"] = "offline"
    try:
        clis = {name: lightning_cli(["fit", "--config", str(cfg), f"--trainer.default_root_dir=runs/{name}"])
                for name in ("first", "second")}
        runs = {name: _loggers(cli)["CascadeWandbLogger"].experiment for name, cli in clis.items()}
        ids = {name: run.id for name, run in runs.items()}
        yield {"tmp": tmp, "cfg": cfg, "clis": clis, "ids": ids}
    finally:
        if wandb.run is not None:
            wandb.run.finish()
        os.chdir(old)
        if mode is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = mode


def test_each_experiment_in_a_process_gets_its_own_wandb_run(two_fits, tmp_path):
    """The first fit's run stays open (``train-eval`` logs its evaluation into it); Lightning's
    ``WandbLogger`` then reused it for the second experiment, whose metrics and config went into the
    first one's run and folder (runs/second had no wandb run at all). A run the caller opened with
    ``wandb.init`` before training (a sweep agent does) is still the one the logger logs into."""
    import wandb

    from cascade_routing.training.loggers import CascadeWandbLogger

    tmp, ids = two_fits["tmp"], two_fits["ids"]
    assert ids["first"] != ids["second"]
    for name, run_id in ids.items():
        found = list((tmp / "runs" / name / "wandb").glob(f"offline-run-*-{run_id}"))
        assert len(found) == 1, (name, list((tmp / "runs").rglob("offline-run-*")))
    second = _loggers(two_fits["clis"]["second"])["CascadeWandbLogger"].experiment
    assert second.name == "second" and second.config["trainer"]["default_root_dir"] == "runs/second"

    wandb.run.finish()  # the second experiment's, left open
    run = wandb.init(mode="offline", dir=str(tmp_path), project="cascade-routing")
    try:
        with pytest.warns(UserWarning, match="wandb run already in progress"):
            assert CascadeWandbLogger(save_dir=str(tmp_path / "logs"), offline=True).experiment.id == run.id
    finally:
        run.finish()


def test_logged_hyperparameters_include_what_setup_derives_from_the_data(two_fits):
    """Lightning logs the values ``__init__`` received: ``models``, ``network_config`` and ``trained_on``
    were ``null`` in the CSV ``hparams.yaml`` and the wandb config of every run."""
    cli = two_fits["clis"]["first"]
    module = cli.model
    csv_logger = _loggers(cli)["CSVLogger"]
    saved = yaml.safe_load((Path(two_fits["tmp"]) / csv_logger.log_dir / "hparams.yaml").read_text())
    config = _loggers(cli)["CascadeWandbLogger"].experiment.config
    for logged in (saved, config):
        assert logged["models"] == ["model-0", "model-1", "model-2"]
        assert logged["network_config"]["neighbours"] == 5 and logged["network_config"]["hidden"] == 16
        assert logged["trained_on"]["encoder_fingerprint"] == module.hparams.trained_on["encoder_fingerprint"]
        assert logged["lr"] == 0.005  # the settings Lightning logged are still there


def test_every_epoch_logs_a_train_loss_next_to_the_validation_loss(two_fits):
    """The train losses were logged per step only, every ``log_every_n_steps`` (5) batches: with 3
    batches an epoch, epoch 0 had no train loss in metrics.csv; each epoch now has its mean."""
    cli = two_fits["clis"]["first"]
    with open(Path(two_fits["tmp"]) / _loggers(cli)["CSVLogger"].log_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    for epoch in ("0", "1"):
        logged = {k for r in rows if r["epoch"] == epoch for k, v in r.items() if v}
        assert {"train/loss_epoch", "train/mean_loss_epoch", "train/var_loss_epoch", "val/loss",
                "val/mean_loss"} <= logged, (epoch, sorted(logged))


def test_log_wandb_false_trains_with_the_csv_logger_only(two_fits, tmp_path, monkeypatch):
    """What ``train-eval --no-wandb`` needs for its training: the config's wandb logger left out,
    the CSV logger kept (the config is parsed, not run)."""
    from cascade_routing.training.lightning_cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    cli = lightning_cli(["--config", str(two_fits["cfg"]), "--trainer.default_root_dir=runs/quiet"],
                        run=False, log_wandb=False)
    assert list(_loggers(cli)) == ["CSVLogger"]
    assert not list(tmp_path.rglob("wandb"))


def test_train_py_help_says_how_wandb_runs(capsys):
    from cascade_routing.training.lightning_cli import lightning_cli

    for args in (["--help"], ["fit", "--help"]):
        with pytest.raises(SystemExit):
            lightning_cli(args)
        out = " ".join(capsys.readouterr().out.split())
        assert "wandb, offline by default (no account needed)" in out and "WANDB_MODE=online" in out, args
        assert "WANDB_MODE=disabled" in out


class _NotPlainData:
    pass


def test_load_from_checkpoint_of_a_broken_or_foreign_file_names_it(two_fits, tmp_path):
    """A truncated checkpoint was torch's ``OSError: [Errno 22] Invalid argument`` (no file name),
    random bytes and an object pickle an ``UnpicklingError`` advising ``weights_only=False``, a dict
    without Lightning's keys a ``KeyError``, another module's Lightning checkpoint a state-dict
    mismatch. Each is now a ValueError naming the file; a trained checkpoint still loads, and an
    error that is not the file's (a bad override) is raised as it was."""
    from cascade_routing.training.module import QualityEstimatorModule

    ckpt = Path(two_fits["clis"]["first"].trainer.checkpoint_callback.best_model_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint\n")
    objects = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "extra": _NotPlainData()}, objects)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {"layer.weight": torch.zeros(2, 2)},
                "hyper_parameters": {"hidden": 8}}, foreign)
    for path, words in ((truncated, "refused it"), (garbage, "refused it: UnpicklingError"),
                        (objects, "refused it: UnpicklingError"), (plain, "no 'pytorch-lightning_version'"),
                        (foreign, "no 'models' or 'network_config'")):
        for given in (path, str(path)):
            with pytest.raises(ValueError) as err:
                QualityEstimatorModule.load_from_checkpoint(given)
            message = str(err.value)
            assert str(path) in message and words in message, message
            assert "weights_only=False" not in message.replace("never loads a checkpoint with weights_only=False", "")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        QualityEstimatorModule.load_from_checkpoint(tmp_path / "missing.ckpt")
    assert QualityEstimatorModule.load_from_checkpoint(ckpt).models == ["model-0", "model-1", "model-2"]
    with pytest.raises(ValueError, match="model.hidden must be >= 1"):
        QualityEstimatorModule.load_from_checkpoint(ckpt, hidden=0)


def test_train_eval_no_wandb_trains_without_a_wandb_logger(monkeypatch, tmp_path):
    """``train-eval --no-wandb`` skipped wandb for the evaluation only: its training still wrote an
    offline wandb run (and with ``WANDB_MODE=online`` and no key it would fail). The flag reaches the
    training's LightningCLI as ``log_wandb=False``."""
    import cascade_routing.training.lightning_cli as lightning_cli_module
    from cascade_routing.cli import main

    seen = []

    class Stop(Exception):
        pass

    def fake_cli(args, run=True, prog=None, log_wandb=True):
        seen.append(log_wandb)
        raise Stop

    monkeypatch.setattr(lightning_cli_module, "lightning_cli", fake_cli)
    monkeypatch.chdir(tmp_path)
    for argv, expected in ((["train-eval", "--no-wandb"], False), (["train-eval"], True)):
        with pytest.raises(Stop):
            main(argv)
        assert seen[-1] is expected
