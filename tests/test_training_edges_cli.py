"""The training path under unlucky or hostile input: ``train.py fit/validate --ckpt_path`` with files that
are not training checkpoints, ``max_epochs=0``, Ctrl-C, output folders that are files, config files
without settings, ``WANDB_MODE=online`` without an account, ``export`` / ``evaluate`` when the data is
gone. Each is one ``error: ...`` line (exit status 2, no traceback) or a clear message, and nothing
is unpickled or silently replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from estimators_helpers import make_synthetic_dataset, make_tiny_encoder


def _config(tmp: Path) -> Path:
    data_dir = tmp / "data"
    make_synthetic_dataset(200, 3).save(data_dir)
    enc = make_tiny_encoder(tmp / "encoder")
    own = {
        "data": {"dataset": str(data_dir), "encoder_path": str(enc), "cache_dir": str(tmp / "cache"), "batch_size": 32},
        "model": {"hidden": 32, "lr": 0.005, "neighbours": 20},
        "trainer": {"max_epochs": 2, "default_root_dir": str(tmp / "runs" / "tiny"), "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump({"compose": ["model/frozen", "trainer/cpu"], **own}))
    return path


def _train_py():
    from tests.script_helpers import load_script

    return load_script("train.py")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edges")
    old = os.getcwd()
    os.chdir(tmp)  # artifacts/ lands here
    try:
        cfg = _config(tmp)
        _train_py().main(["fit", "--config", str(cfg)])
    finally:
        os.chdir(old)
    ckpt = tmp / "runs" / "tiny" / "checkpoints" / "best.ckpt"
    assert ckpt.is_file() and (tmp / "artifacts" / "tiny.safetensors").is_file()
    return {"tmp": tmp, "cfg": cfg, "ckpt": ckpt, "artifact": tmp / "artifacts" / "tiny.safetensors"}


class _Marker:
    """Unpickling this creates the folder ``path`` (what a malicious checkpoint could do instead)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _bad_checkpoints(folder: Path) -> dict[str, tuple[Path, str]]:
    """{kind: (path, words the error must contain)} for files that are not training checkpoints."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    random = folder / "random.ckpt"
    random.write_bytes(bytes(range(256)) * 8)
    evil = folder / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Marker(folder / "PWNED")}, evil)
    artifact = folder / "artifact.ckpt"
    save_file({"w": torch.zeros(2)}, str(artifact))
    bare = folder / "bare.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, bare)
    other = folder / "other.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "hyper_parameters": {"foo": 1}}, other)
    return {
        "random bytes": (random, "torch.load(weights_only=True) refused it"),
        "pickle of objects": (evil, "refused it: UnpicklingError"),
        "estimator artifact": (artifact, "is a safetensors file"),
        "bare state_dict": (bare, "is not a checkpoint written by `train.py fit`"),
        "another project's checkpoint": (other, "no 'models' or 'network_config' in its hyper_parameters"),
        "folder": (folder, "is a folder, not a checkpoint file"),
    }


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_ckpt_path_that_is_not_a_training_checkpoint_is_one_error_line(tmp_path, capsys, subcommand):
    """``--ckpt_path`` of random bytes, a pickle of objects or an artifact was a raw ``UnpicklingError``
    traceback (whose text suggests ``weights_only=False``), a bare state_dict a ``KeyError`` after
    encoding, a folder an ``IsADirectoryError``; each is now ``error: <file> ...`` and exit status 2,
    and the pickle's code never runs."""
    cfg = _config(tmp_path)
    train = _train_py()
    for kind, (path, words) in _bad_checkpoints(tmp_path / "bad").items():
        assert train.run([subcommand, "--config", str(cfg), "--ckpt_path", str(path)]) == 2, kind
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"error: {path}" in err and words in err, (kind, err)
    assert not (tmp_path / "bad" / "PWNED").exists()
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()  # refused before anything ran


def test_max_epochs_zero_writes_no_artifact(tmp_path, monkeypatch, capsys):
    """``--trainer.max_epochs=0`` exported the untrained initialisation as ``artifacts/<name>.safetensors``
    (overwriting a trained one of that name), exit status 0; now the export is skipped and says why."""
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path)
    artifact = tmp_path / "artifacts" / "tiny.safetensors"
    artifact.parent.mkdir()
    artifact.write_bytes(b"a trained artifact")
    assert _train_py().run(["fit", "--config", str(cfg), "--trainer.max_epochs=0"]) == 0
    assert "artifact export skipped (no training step ran): no artifact written" in capsys.readouterr().out
    assert artifact.read_bytes() == b"a trained artifact"


class InterruptInSecondEpoch(L.Callback):
    """Ctrl-C at the end of the second training epoch (after the first epoch's checkpoint)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= 1:
            raise KeyboardInterrupt


def test_ctrl_c_names_the_best_checkpoint_so_far(fitted, tmp_path, monkeypatch, capsys):
    """Ctrl-C during ``fit``: Lightning exits with status 1 and never calls ``on_fit_end``, so the run
    ended on "Detected KeyboardInterrupt" alone; it now says no artifact was written and names the
    best checkpoint so far, which exports."""
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.training.export import export_checkpoint

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs" / "interrupted"
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_:
            _train_py().main(["fit", "--config", str(fitted["cfg"]), "--trainer.max_epochs=5",
                              f"--trainer.default_root_dir={root}",
                              f"--trainer.callbacks+={__name__}.InterruptInSecondEpoch"])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after the first one
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    best = root / "checkpoints" / "best.ckpt"
    assert "training interrupted: artifact export skipped, no artifact written" in out
    assert f"the best checkpoint so far is {best}" in out and f"cascade-routing export --ckpt {best}" in out
    assert not (tmp_path / "artifacts" / "interrupted.safetensors").exists()
    art = load_artifact(export_checkpoint(best, tmp_path / "x.safetensors", fit_lambdas=False, select=False))
    assert art.models == ["model-0", "model-1", "model-2"]


def test_output_folders_that_are_files_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """A ``trainer.default_root_dir`` under a file was a screen of jsonargparse union errors with
    ``[Errno 17]`` inside; ``export --out``, ``evaluate --out`` under a file a ``FileExistsError``
    traceback after the work. Each is now one line naming the file, before anything is computed."""
    from cascade_routing.cli import main
    from cascade_routing.cli.estimator_commands import train_eval

    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert _train_py().run(["fit", "--config", str(cfg), f"--trainer.default_root_dir={tmp_path / 'afile' / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"error: trainer.default_root_dir '{tmp_path / 'afile' / 'run'}': {tmp_path / 'afile'} is a file, not a folder" in err
    assert "Traceback" not in err and "Subtypes" not in err and "Errno" not in err
    (tmp_path / "artifacts").write_text("x")  # ExportArtifact writes artifacts/tiny.safetensors at the end of fit
    assert _train_py().run(["fit", "--config", str(cfg)]) == 2
    assert "ExportArtifact path's folder 'artifacts': artifacts is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()  # nothing trained
    assert main(["export", "--ckpt", "missing.ckpt", "--out", "afile/x.safetensors"]) == 2
    assert "error: export output folder 'afile': afile is a file, not a folder" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", "missing.safetensors", "--out", "afile/eval", "--no-wandb"]) == 2
    assert "error: evaluation output folder 'afile/eval': afile is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--out 'afile': afile is a file, not a folder"):
        train_eval("no-such-config", out="afile")  # refused before training, not after it


def test_a_config_file_without_settings_is_named(tmp_path, capsys):
    """An empty override file (or one holding a list) was ``error: Unexpected config:`` without its name."""
    cfg = _config(tmp_path)
    for name, text, holds in (("empty.yaml", "", "nothing"), ("list.yaml", "- a\n- b\n", "a list")):
        (tmp_path / name).write_text(text)
        assert _train_py().run(["fit", "--config", str(cfg), "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"error: config {tmp_path / name}: expected a mapping of settings" in err and f"it holds {holds}" in err


def test_wandb_online_without_an_account_is_one_error_line(tmp_path):
    """``WANDB_MODE=online`` with no API key was wandb's ``UsageError`` traceback (after encoding); it is
    an ``error:`` line saying how to log offline. Unset, the mode is offline (another test). Run as a
    subprocess: wandb keeps its settings in a process-wide singleton, so in the test process an earlier
    offline run would decide the mode."""
    cfg = _config(tmp_path)
    own = yaml.safe_load(cfg.read_text())
    own["compose"].append("logger/wandb_csv")
    del own["trainer"]["logger"]
    cfg.write_text(yaml.safe_dump(own))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="online", HOME=str(tmp_path / "home"))  # no ~/.netrc, no API key
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "train.py"), "fit", "--config", str(cfg),
                           "--trainer.max_epochs=0"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: wandb could not start a run (WANDB_MODE=online): " in proc.stderr
    assert "unset WANDB_MODE" in proc.stderr and "Traceback" not in proc.stderr


def test_ckpt_path_model_settings_that_replace_the_config_are_named(fitted):
    """With ``--ckpt_path``, LightningCLI takes the model settings from the checkpoint; a different value
    asked for on the command line or in a config was dropped silently. It is named in a warning, and
    the run loads the checkpoint with ``weights_only=True``."""
    args = ["validate", "--config", str(fitted["cfg"]), "--ckpt_path", str(fitted["ckpt"])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _train_py().main([*args, "--model.hidden=16", "--model.lr=0.005"])
    assert cli.model.hparams.hidden == 32
    assert cli.config.validate.weights_only is True  # Lightning loads the checked checkpoint weights_only
    messages = [str(w.message) for w in caught if "replace the config's" in str(w.message)]
    assert len(messages) == 1 and "model.hidden 16 -> 32" in messages[0] and "lr" not in messages[0], messages
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train_py().main(args)
    assert not [w for w in caught if "replace the config's" in str(w.message)]


def test_load_from_checkpoint_never_unpickles_objects(fitted, tmp_path, monkeypatch):
    """``QualityEstimatorModule.load_from_checkpoint`` left ``weights_only`` to torch's default, which
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns off: a checkpoint's pickled code ran. It reads with
    ``weights_only=True``; the real checkpoint still loads."""
    from cascade_routing.training.datamodule import RoutingDataModule
    from cascade_routing.training.module import QualityEstimatorModule

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": _Marker(tmp_path / "PWNED")}, evil)
    with pytest.raises(Exception):
        QualityEstimatorModule.load_from_checkpoint(evil, map_location="cpu")
    with pytest.raises(ValueError, match="refused it"):
        RoutingDataModule.load_from_checkpoint(evil)
    assert not (tmp_path / "PWNED").exists()
    assert QualityEstimatorModule.load_from_checkpoint(fitted["ckpt"], map_location="cpu").models == \
        ["model-0", "model-1", "model-2"]


def test_export_and_evaluate_when_the_data_is_gone_say_whose_data(fitted, tmp_path, capsys):
    """A checkpoint or artifact whose dataset folder has gone: ``unknown dataset '<folder>'``, although
    the user named no dataset. The message now says the checkpoint's / artifact's dataset is needed,
    and for ``evaluate`` how to give it."""
    from cascade_routing.cli import main
    from cascade_routing.estimators.artifact import load_artifact

    gone = str(tmp_path / "moved-away")
    state = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    state["datamodule_hyper_parameters"]["dataset"] = gone
    ckpt = tmp_path / "old.ckpt"
    torch.save(state, ckpt)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ckpt}: export rebuilds the checkpoint's own splits (dataset '{gone}'") and \
        f"unknown dataset '{gone}'" in err
    art = load_artifact(fitted["artifact"])
    art.data_config["dataset"] = gone
    moved = art.save(tmp_path / "moved.safetensors")
    assert main(["evaluate", "--checkpoint", str(moved), "--out", str(tmp_path / "eval"), "--no-wandb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the artifact was trained on dataset '{gone}', which cannot be loaded here")
    assert "give the dataset with --dataset" in err


def test_a_root_of_dot_names_the_artifact_after_the_current_folder(tmp_path, monkeypatch):
    """``--trainer.default_root_dir=.`` made ``{name}`` empty: the artifact ``artifacts/.safetensors`` (a
    hidden file) and a wandb run named ''; ``export --ckpt ./checkpoints/best.ckpt`` names it after the
    current folder, and so does fit now."""
    from cascade_routing.training.export import ExportArtifact
    from cascade_routing.training.lightning_cli import lightning_cli

    cfg = _config(tmp_path)
    here = tmp_path / "my-experiment"
    here.mkdir()
    monkeypatch.chdir(here)
    cli = lightning_cli(["--config", str(cfg), "--trainer.default_root_dir=."], run=False)
    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportArtifact))
    assert Path(export.path) == Path("artifacts/my-experiment.safetensors")
    assert Path(cli.trainer.checkpoint_callback.dirpath) == here / "checkpoints"


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_without_a_checkpoint_are_refused(tmp_path, capsys, subcommand):
    """``train.py test --config X`` without ``--ckpt_path`` scored the freshly initialised network (AUROC
    about 0.5) and exited 0, as if it were the trained one."""
    cfg = _config(tmp_path)
    assert _train_py().run([subcommand, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and f" {subcommand} scores a trained network: give --ckpt_path" in last
    assert f"{tmp_path / 'runs' / 'tiny'}/checkpoints/best.ckpt" in err


@pytest.mark.parametrize("setting, value", [("model.hidden", 0), ("model.masks_per_query", -1),
                                            ("model.neighbours", -3), ("model.variance_weight", -0.1),
                                            ("data.batch_size", 0), ("data.encode_batch_size", 0),
                                            ("data.split_seed", -1), ("data.num_workers", -1)])
def test_settings_that_cannot_train_are_refused_by_name(setting, value):
    """``model.hidden=0`` trained and exported an empty network (exit status 0), negative mask counts
    trained silently where masks are enumerated, ``model.neighbours=-3`` failed with torch's "selected
    index k out of range", ``data.split_seed=-1`` with numpy's "expected non-negative integer",
    ``data.batch_size=0`` without the setting's name. Each is refused when the module is configured."""
    from cascade_routing.training.datamodule import RoutingDataModule
    from cascade_routing.training.module import QualityEstimatorModule

    group, name = setting.split(".")
    cls = QualityEstimatorModule if group == "model" else RoutingDataModule
    with pytest.raises(ValueError, match=rf"^{setting} must be >= \d+, got {value}$"):
        cls(**{name: value})
