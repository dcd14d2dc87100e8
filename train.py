"""Train learned quality estimators: ``python train.py fit --config routerbench``.

A thin entry point over the project's LightningCLI
(:func:`cascade_routing.training.lightning_cli.lightning_cli`): the model is
:class:`~cascade_routing.training.module.QualityEstimatorModule`, the data
:class:`~cascade_routing.training.datamodule.RoutingDataModule`; ``--config`` takes a shipped
config name or a YAML path and may be repeated. Runs offline by default.
"""

from __future__ import annotations

import sys

from cascade_routing.training.lightning_cli import lightning_cli


def main(args: list[str] | None = None):
    return lightning_cli(sys.argv[1:] if args is None else args)


def run(args: list[str] | None = None) -> int:
    """:func:`main` as a command: a library error (a config name that resolves to no file, a Trainer
    setting this machine cannot run, an unknown dataset) prints ``error: ...`` and returns 2, as
    ``cascade-routing train`` does."""
    try:
        main(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
