"""The default configs, shipped inside the package and addressable by name.

Layout: one folder per concern (``data/``, ``model/``, ``trainer/``, ``logger/``) and, at the top,
experiments (``routerbench``, ``rational``, ...) and overlays (``finetune_gpu``). An experiment is a
LightningCLI YAML whose optional ``compose`` key lists group configs; :func:`expand_config_args`
turns ``--config routerbench`` into ``--config data/routerbench.yaml --config model/frozen.yaml
... --config <the experiment's own keys>``: repeated ``--config`` in order, later keys win. A name is
looked up here; anything that is an existing file path is used as it is (and may use ``compose`` too).
"""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent
CONFIG_FLAGS = ("--config", "-c")
# YAML files shipped here that are not training configs: the RouteLLM price table, the serve example
OTHER_FILES = {"prices": "the price table of the RouteLLM converter",
               "backends.example": "an example of `serve --backends`"}


def available() -> list[str]:
    """Names of the shipped training configs (``routerbench``, ``data/rational``, ...), sorted."""
    names = (str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))
    return sorted(n for n in names if n not in OTHER_FILES)


def config_path(name_or_path: str | Path) -> Path:
    """An existing file path as is; else the shipped config of that name (``.yaml`` optional).

    A ``configs/`` prefix is accepted (``configs/routerbench.yaml`` works without a checkout).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path).removeprefix("configs/").removesuffix(".yaml")
    if name in OTHER_FILES:
        raise FileNotFoundError(f"{str(name_or_path)!r} is {OTHER_FILES[name]}, not a training config "
                                f"(shipped configs: {', '.join(available())})")
    shipped = CONFIG_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"no config file {str(name_or_path)!r} and no shipped config of that name "
                            f"(shipped: {', '.join(available())})")


def expand_config(name_or_path: str | Path) -> list[str]:
    """``--config`` values (file paths or YAML text) equivalent to this config, ``compose`` expanded."""
    path = config_path(name_or_path)
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config {path}: not valid YAML ({err})") from err
    if not isinstance(content, dict) or "compose" not in content:
        return [str(path)]
    parts = content.pop("compose")
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"config {path}: 'compose' must be a list of config names, got {parts!r}")
    out: list[str] = []
    for part in parts:
        local = path.parent / f"{part}.yaml"
        out += expand_config(local if local.is_file() else part)
    if content:
        out.append(yaml.safe_dump(content, sort_keys=False))
    return out


def expand_config_args(args: list[str]) -> list[str]:
    """Command-line ``args`` with every ``--config X`` / ``--config=X`` / ``-c X`` expanded (see module doc)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in CONFIG_FLAGS and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        for item in expand_config(value):
            out += ["--config", item]
    return out


def experiment_name(args: list[str]) -> str | None:
    """The name of the first ``--config`` in ``args`` (``routerbench`` for ``--config configs/routerbench.yaml``)."""
    for i, arg in enumerate(args):
        if arg in CONFIG_FLAGS and i + 1 < len(args):
            return Path(args[i + 1]).stem
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]).stem
    return None
