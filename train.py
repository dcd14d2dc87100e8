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


if __name__ == "__main__":
    main()
