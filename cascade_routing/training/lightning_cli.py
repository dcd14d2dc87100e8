"""The one LightningCLI of the project (``train.py`` and ``cascade-routing train-eval`` both build it).

- ``--config NAME`` resolves shipped configs by name and expands ``compose`` into repeated
  ``--config`` (:mod:`cascade_routing.configs`).
- In the init args of loggers and callbacks, ``{root}`` is replaced by ``trainer.default_root_dir``
  (unset: ``runs/<dataset folder or name>``) and ``{name}`` by its basename (``trainer/cpu.yaml``: checkpoints in ``{root}/checkpoints``, the
  artifact at ``artifacts/{name}.safetensors``; ``logger/wandb_csv.yaml``: logs under ``{root}``,
  wandb run and group ``{name}``), so one experiment file names all of its outputs once.
- The full resolved config goes to every wandb logger (``run.config``) as well as to
  ``<log_dir>/config.yaml``.
- ``lightning_cli(..., log_wandb=False)`` drops the config's wandb loggers (CSV and the others stay),
  for a caller that was told not to log to wandb (``train-eval --no-wandb``).
- User errors are ``ValueError``s naming the problem (``train.py`` and ``cascade-routing`` print
  ``error: ...``): a ``--ckpt_path`` that is not a checkpoint ``train.py fit`` wrote (checked with
  ``torch.load(weights_only=True)`` before Lightning reads it, and Lightning then loads it with
  ``weights_only=True`` too), an output folder that is a file, a config file that holds no settings,
  wandb refusing to start (``WANDB_MODE=online`` without an account).
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from cascade_routing.configs import CONFIG_FLAGS, expand_config_args
from cascade_routing.evaluation.protocol import EXPORT_BUDGETS_PER_PAIR, check_count
from cascade_routing.training.checkpoint_file import check_training_checkpoint
from cascade_routing.training.datamodule import RoutingDataModule
from cascade_routing.training.export import check_output_folder
from cascade_routing.training.loggers import wandb_errors_as_value_errors
from cascade_routing.training.module import DERIVED_HPARAMS, QualityEstimatorModule

class ConfigToLoggers(SaveConfigCallback):
    """Writes ``config.yaml`` (Lightning's default) and puts the full resolved config into wandb."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        config = self.config.as_dict()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)


def _substitute(init_args, root: Path) -> None:
    """Replace ``{root}`` / ``{name}`` in the string values of a Namespace of init args (in place).
    ``{name}`` is the root folder's name, resolved (``.`` is the current folder's name, as ``export --ckpt
    ./checkpoints/best.ckpt`` names it), never empty."""
    name = root.name or root.resolve().name or "experiment"
    for key, value in vars(init_args).items():
        if isinstance(value, str) and ("{root}" in value or "{name}" in value):
            setattr(init_args, key, value.replace("{root}", str(root)).replace("{name}", name))


LOGGING_HELP = ("Logging (logger/wandb_csv): CSV plus wandb, offline by default (no account needed); "
                "WANDB_MODE=online syncs (needs a wandb API key), WANDB_MODE=disabled writes no wandb run, "
                "--trainer.logger=false logs nothing.")


class CascadeLightningCLI(LightningCLI):
    """LightningCLI over :class:`QualityEstimatorModule` and :class:`RoutingDataModule` (see module doc).

    Subcommands: ``fit``, ``validate``, ``test``. There is no ``predict``: estimates for new queries
    come from the exported artifact (``EstimatorArtifact.bind``), which also carries the λ tables.

    ``log_wandb=False``: the config's wandb loggers (any ``WandbLogger`` subclass) are left out.
    """

    def __init__(self, *args, log_wandb: bool = True, **kwargs) -> None:
        self.log_wandb = log_wandb
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

    def parse_arguments(self, parser, args) -> None:
        # args are always built by this project (never mixed with sys.argv by accident): no warning
        self.config = parser.parse_args(args)
        self._check_ckpt_path()

    def _check_ckpt_path(self) -> None:
        """The ``--ckpt_path`` checkpoint, checked before Lightning reads its model settings (which then
        replace the config's). The file is checked first
        (:func:`~cascade_routing.training.checkpoint_file.check_training_checkpoint`: a folder, a foreign
        or corrupt file, a pickle of arbitrary objects, an estimator artifact are a ``ValueError``
        naming it, not an unpickling traceback); Lightning then loads it with ``weights_only=True``
        unless ``--weights_only`` says otherwise; a model setting of the config that the checkpoint
        replaces with another value is named in a warning. ``validate`` and ``test`` need a
        ``--ckpt_path``: without one they would score the untrained initialisation."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if subcommand in ("validate", "test") and not ckpt_path:
            root = config.trainer.default_root_dir or "runs/<name>"
            raise ValueError(f"{self.parser.prog} {subcommand} scores a trained network: give --ckpt_path (the checkpoint, e.g. "
                             f"{root}/checkpoints/best.ckpt); without it the network is a fresh initialisation")
        if not ckpt_path or "://" in str(ckpt_path) or not Path(ckpt_path).exists():
            return  # "best", "last", a URL or a missing file: Lightning's own errors
        saved = check_training_checkpoint(ckpt_path)["hyper_parameters"]
        asked = config.model
        asked = vars(asked.get("init_args", asked)) if asked is not None else {}
        replaced = {k: (asked[k], v) for k, v in saved.items()
                    if k in asked and k not in DERIVED_HPARAMS and not k.startswith("_") and asked[k] != v}
        if replaced:
            warnings.warn(f"--ckpt_path {ckpt_path}: the checkpoint's model settings replace the config's: "
                          + ", ".join(f"model.{k} {a!r} -> {v!r}" for k, (a, v) in replaced.items()), stacklevel=2)
        if config.get("weights_only") is None:
            config.weights_only = True

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if not trainer.default_root_dir:  # a config of the user's own: name the run after its dataset
            trainer.default_root_dir = str(Path("runs") / Path(str(config.data.dataset)).name)
        root = Path(trainer.default_root_dir)
        check_output_folder(root, "trainer.default_root_dir")
        if not self.log_wandb:
            trainer.logger = _without_wandb(trainer.logger)
        for group in (trainer.logger, trainer.callbacks):
            for item in group if isinstance(group, list) else []:
                if getattr(item, "init_args", None) is not None:
                    _substitute(item.init_args, root)
                    _check_outputs(item)


def _without_wandb(logger):
    """The ``trainer.logger`` setting without its wandb loggers: a list loses them (an empty list:
    no logger), a single wandb logger becomes ``False``; ``True`` / ``False`` / None and other
    loggers are kept."""
    from lightning.pytorch.loggers import WandbLogger

    def is_wandb(item) -> bool:
        module, _, name = str(getattr(item, "class_path", "")).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name, None) if module else None
        except ImportError:
            return False
        return isinstance(cls, type) and issubclass(cls, WandbLogger)

    if isinstance(logger, list):
        return [item for item in logger if not is_wandb(item)]
    return False if is_wandb(logger) else logger


def _check_outputs(item) -> None:
    """The folders a logger or callback (``class_path`` + ``init_args``) writes into: not files; and
    ``ExportArtifact``'s ``budgets_per_pair`` an integer >= 1 (checked here, before anything loads, as
    ``export --budgets-per-pair`` checks it)."""
    name = str(item.class_path).rsplit(".", 1)[-1]
    args = item.init_args
    if name == "ExportArtifact":
        check_count("ExportArtifact budgets_per_pair", getattr(args, "budgets_per_pair", EXPORT_BUDGETS_PER_PAIR))
    for key in ("save_dir", "dirpath"):
        if isinstance(getattr(args, key, None), str):
            check_output_folder(getattr(args, key), f"{name} {key}")
    path = getattr(args, "path", None)
    if name == "ExportArtifact" and isinstance(path, str):
        if Path(path).is_dir():
            raise ValueError(f"ExportArtifact path {path!r} is a folder; it names the artifact file to write")
        check_output_folder(Path(path).parent, "ExportArtifact path's folder")


def _check_config_files(args: list[str]) -> None:
    """``ValueError`` naming a ``--config`` file that holds no settings (empty, or YAML that is not a mapping),
    which LightningCLI reports as ``Unexpected config`` without the file's name."""
    import yaml

    for flag, value in zip(args, args[1:]):
        if flag in CONFIG_FLAGS and "\n" not in value and Path(value).is_file():
            try:
                content = yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError as err:
                raise ValueError(f"config {value}: not valid YAML ({err})") from None
            if not isinstance(content, dict):
                got = "nothing" if content is None else f"a {type(content).__name__}"
                raise ValueError(f"config {value}: expected a mapping of settings (data:, model:, trainer:, ...), "
                                 f"it holds {got}")


def _parser_kwargs(prog: str | None) -> dict:
    """LightningCLI's ``parser_kwargs``: ``prog`` (if given) and :data:`LOGGING_HELP` as the epilog of
    the main parser and of each subcommand's, so ``--help`` says how wandb runs."""
    kwargs: dict = {"epilog": LOGGING_HELP, **({} if prog is None else {"prog": prog})}
    return {**kwargs, **{name: {"epilog": LOGGING_HELP} for name in CascadeLightningCLI.subcommands()}}


def lightning_cli(args: list[str], run: bool = True, prog: str | None = None,
                  log_wandb: bool = True) -> CascadeLightningCLI:
    """Build (and with ``run``, execute the subcommand of) the project's LightningCLI on ``args``.
    ``prog``: the command name its usage lines and error tips give (default: the script's name).
    ``log_wandb=False``: no wandb logger even where the config has one (the CSV logger stays).
    A configuration the Trainer refuses (Lightning's ``MisconfigurationException``, e.g. a GPU
    accelerator where torch sees none) is a ``ValueError`` saying so."""
    from cascade_routing.estimators.runtime import configure_threads

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    configure_threads()
    expanded = expand_config_args(list(args))
    _check_config_files(expanded)
    try:
        with wandb_errors_as_value_errors():
            return CascadeLightningCLI(
                QualityEstimatorModule,
                RoutingDataModule,
                seed_everything_default=0,
                save_config_callback=ConfigToLoggers,
                save_config_kwargs={"overwrite": True},
                args=expanded,
                run=run,
                parser_kwargs=_parser_kwargs(prog),
                log_wandb=log_wandb,
            )
    except MisconfigurationException as err:  # e.g. a GPU config on a machine torch sees no GPU on
        raise ValueError(f"the Trainer cannot run this configuration: {err}") from err
