"""train.py (LightningCLI) end to end, and Lightning DDP on 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from estimators_helpers import make_synthetic_dataset, make_tiny_encoder

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, strategy: str, devices: int) -> Path:
    data_dir = tmp_path / "data"
    make_synthetic_dataset(200, 3).save(data_dir)
    enc = make_tiny_encoder(tmp_path / "encoder")
    cfg = {
        "seed_everything": 0,
        "data": {"dataset": str(data_dir), "encoder_path": str(enc), "cache_dir": str(tmp_path / "cache"),
                 "batch_size": 16},
        "model": {"hidden": 16},
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": strategy, "max_epochs": 2,
            "default_root_dir": str(tmp_path / "runs"), "enable_progress_bar": False, "enable_model_summary": False,
            "logger": [
                {"class_path": "cascade_routing.training.loggers.CascadeWandbLogger",
                 "init_args": {"save_dir": str(tmp_path / "runs"), "name": "t"}},
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs")}},
            ],
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val/mean_loss", "dirpath": str(tmp_path / "ckpt"), "filename": "best"}},
                {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                 "init_args": {"monitor": "val/mean_loss", "patience": 3}},
                {"class_path": "cascade_routing.training.export.ExportArtifact",
                 "init_args": {"path": str(tmp_path / "est.safetensors"), "fit_lambdas": False}},
            ],
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", str(cfg)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


def _check(proc: subprocess.CompletedProcess, tmp_path: Path) -> None:
    from cascade_routing.estimators.artifact import load_artifact

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "ckpt" / "best.ckpt").exists()
    assert list((tmp_path / "runs").rglob("metrics.csv")), "CSVLogger wrote nothing"
    assert list((tmp_path / "runs").rglob("offline-run-*")), "wandb offline run missing"
    art = load_artifact(tmp_path / "est.safetensors")
    assert art.models == ["model-0", "model-1", "model-2"]


@pytest.mark.slow
def test_train_py_single_process(tmp_path):
    proc = _run(_config(tmp_path, "auto", 1), tmp_path)
    _check(proc, tmp_path)


@pytest.mark.slow
def test_train_py_ddp_two_cpu_processes(tmp_path):
    proc = _run(_config(tmp_path, "ddp", 2), tmp_path)
    _check(proc, tmp_path)
    out = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in out and "All distributed processes registered" in out, out[-3000:]
