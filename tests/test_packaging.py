"""Packaging: shipped configs by name and composed, ``--version``, the lazy root API, the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("routerbench", "rational", "routellm_mmlu", "routellm_gsm8k", "routerbench_fast", "rational_fast")


def test_configs_resolve_by_name_and_by_path():
    from cascade_routing.configs import CONFIG_DIR, available, config_path

    assert config_path("routerbench") == CONFIG_DIR / "routerbench.yaml"
    assert config_path("configs/routerbench.yaml").resolve() == (CONFIG_DIR / "routerbench.yaml").resolve()
    assert config_path("data/rational") == CONFIG_DIR / "data" / "rational.yaml"
    assert {"routerbench", "data/routerbench", "model/frozen", "trainer/cpu", "logger/wandb_csv"} <= set(available())
    with pytest.raises(FileNotFoundError, match="no shipped config of that name.*routerbench"):
        config_path("routerbnch")
    # the price table and the serving example ship in the same folder but are not training configs
    assert (CONFIG_DIR / "prices.yaml").is_file() and not {"prices", "backends.example"} & set(available())
    with pytest.raises(FileNotFoundError, match=r"'prices' is the price table .*, not a training config"):
        config_path("prices")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_shipped_experiments_compose_into_a_valid_lightning_config(name, tmp_path, monkeypatch):
    """Every experiment parses with LightningCLI; the important model settings are visible in model/frozen."""
    from cascade_routing.training.export import ExportArtifact
    from cascade_routing.training.lightning_cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    cli = lightning_cli(["--config", name], run=False)
    cfg = cli.config
    assert cfg.model.neighbours == 50 and cfg.model.text_statistics is True and cfg.model.query_embedding_input is False
    assert cfg.trainer.default_root_dir == f"runs/{name}"
    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportArtifact))
    assert export.path == f"artifacts/{name}.safetensors"
    expected = {"routerbench": "routerbench-subset", "rational": "rational-llm-cascades"}.get(name.split("_fast")[0])
    if expected:
        assert cfg.data.dataset == expected
    if name.endswith("_fast"):
        assert cfg.data.encoder_path.startswith("encoders/")


def test_repeated_config_later_keys_win(tmp_path, monkeypatch):
    from cascade_routing.configs import expand_config_args
    from cascade_routing.training.lightning_cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"hidden": 64}, "data": {"max_length": 256}}))
    args = expand_config_args(["--config", "routerbench", "--config", str(overlay)])
    assert args.count("--config") == 6  # 4 groups + the experiment's own keys + the overlay
    cli = lightning_cli(["--config", "routerbench", "--config", str(overlay)], run=False)
    assert cli.config.model.hidden == 64 and cli.config.data.max_length == 256
    assert cli.config.model.neighbours == 50  # untouched keys keep the composed value
    from cascade_routing.configs import experiment_name

    # train-eval names its output folder after the first config: eval/routerbench
    assert experiment_name(["fit", "--config", "configs/routerbench.yaml", "--config", str(overlay)]) == "routerbench"


def test_version_flag(capsys):
    from cascade_routing import __version__
    from cascade_routing.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"cascade-routing {__version__}"


def test_root_api_is_lazy_and_complete():
    code = (
        "import sys, cascade_routing as cr\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'eager import'\n"
        "from cascade_routing import load_dataset, CascadeRouting, fit_lambda, simulate, CascadeRouter\n"
        "assert 'lightning' not in sys.modules, 'the policy/serving API loaded Lightning'\n"
        "missing = [n for n in cr.__all__ if getattr(cr, n, None) is None]\n"
        "from cascade_routing import PolicyError, RouterError, UnseenTaskWarning, UncoveredRanSetError, ArtifactError\n"
        "assert issubclass(UnseenTaskWarning, UserWarning) and issubclass(PolicyError, ValueError)\n"
        "assert not missing, missing\n"
        "print(len(cr.__all__))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip()) > 20


@pytest.mark.slow
def test_wheel_ships_configs_and_runs_installed_outside_the_repo(tmp_path):
    """Build the wheel, install it (no deps: they come from this venv) into a fresh venv, and run the
    installed ``cascade-routing`` outside the repository: ``--version``, a shipped config by name,
    and ``reproduce`` on a small saved dataset."""
    import sysconfig

    from engine_helpers import make_data

    from cascade_routing.data.dataset import RoutingDataset

    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, timeout=600, capture_output=True)
    wheel = next(dist.glob("cascade_routing-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("cascade_routing/configs/routerbench.yaml", "cascade_routing/configs/data/routerbench.yaml",
                    "cascade_routing/configs/prices.yaml", "cascade_routing/configs/backends.example.yaml"):
        assert shipped in names, shipped
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python*/site-packages"))
    # this venv's dependencies, without its editable cascade_routing (a plain path entry runs no .pth hooks)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=600, capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    exe = str(venv / "bin" / "cascade-routing")
    run = lambda *a: subprocess.run([exe, *a], cwd=outside, env=env, capture_output=True, text=True, timeout=600)  # noqa: E731
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("cascade-routing "), proc.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import cascade_routing.configs as c; print(c.config_path('routerbench'))"],
                           cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert str(site) in where.stdout, where.stdout + where.stderr
    quality, cost = make_data(300, 3, seed=1)
    RoutingDataset([f"q{i}" for i in range(300)], ["a", "b", "c"], quality, cost, name="toy").save(outside / "toy")
    proc = run("reproduce", "routerbench", "--dataset", "toy", "--quick", "--no-progress", "--resamples", "10",
               "--out", "rep")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (outside / "rep" / "results.csv").read_text().count("\n") >= 6
