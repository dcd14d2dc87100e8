"""The one LightningCLI of the project (``train.py`` and ``cascade-routing train-eval`` both build it).

- ``--config NAME`` resolves shipped configs by name and expands ``compose`` into repeated
  ``--config`` (:mod:`cascade_routing.configs`).
- In the init args of loggers and callbacks, ``{root}`` is replaced by ``trainer.default_root_dir``
  (unset: ``runs/<dataset folder or name>``) and ``{name}`` by its basename (``trainer/cpu.yaml``: checkpoints in ``{root}/checkpoints``, the
  artifact at ``artifacts/{name}.safetensors``; ``logger/wandb_csv.yaml``: logs under ``{root}``,
  wandb run and group ``{name}``), so one experiment file names all of its outputs once.
- The full resolved config goes to every wandb logger (``run.config``) as well as to
  ``<log_dir>/config.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from cascade_routing.configs import expand_config_args
from cascade_routing.training.datamodule import RoutingDataModule
from cascade_routing.training.module import QualityEstimatorModule

class ConfigToLoggers(SaveConfigCallback):
    """Writes ``config.yaml`` (Lightning's default) and puts the full resolved config into wandb."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        config = self.config.as_dict()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)


def _substitute(init_args, root: Path) -> None:
    """Replace ``{root}`` / ``{name}`` in the string values of a Namespace of init args (in place)."""
    for key, value in vars(init_args).items():
        if isinstance(value, str) and ("{root}" in value or "{name}" in value):
            setattr(init_args, key, value.replace("{root}", str(root)).replace("{name}", root.name))


class CascadeLightningCLI(LightningCLI):
    """LightningCLI over :class:`QualityEstimatorModule` and :class:`RoutingDataModule` (see module doc).

    Subcommands: ``fit``, ``validate``, ``test``. There is no ``predict``: estimates for new queries
    come from the exported artifact (``EstimatorArtifact.bind``), which also carries the λ tables.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

    def parse_arguments(self, parser, args) -> None:
        # args are always built by this project (never mixed with sys.argv by accident): no warning
        self.config = parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if not trainer.default_root_dir:  # a config of the user's own: name the run after its dataset
            trainer.default_root_dir = str(Path("runs") / Path(str(config.data.dataset)).name)
        root = Path(trainer.default_root_dir)
        for group in (trainer.logger, trainer.callbacks):
            for item in group if isinstance(group, list) else []:
                if getattr(item, "init_args", None) is not None:
                    _substitute(item.init_args, root)


def lightning_cli(args: list[str], run: bool = True, prog: str | None = None) -> CascadeLightningCLI:
    """Build (and with ``run``, execute the subcommand of) the project's LightningCLI on ``args``.
    ``prog``: the command name its usage lines and error tips give (default: the script's name).
    A configuration the Trainer refuses (Lightning's ``MisconfigurationException``, e.g. a GPU
    accelerator where torch sees none) is a ``ValueError`` saying so."""
    from cascade_routing.estimators.runtime import configure_threads

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    configure_threads()
    try:
        return CascadeLightningCLI(
            QualityEstimatorModule,
            RoutingDataModule,
            seed_everything_default=0,
            save_config_callback=ConfigToLoggers,
            save_config_kwargs={"overwrite": True},
            args=expand_config_args(list(args)),
            run=run,
            parser_kwargs={} if prog is None else {"prog": prog},
        )
    except MisconfigurationException as err:  # e.g. a GPU config on a machine torch sees no GPU on
        raise ValueError(f"the Trainer cannot run this configuration: {err}") from err
