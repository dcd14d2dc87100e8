"""Train learned quality estimators: ``python train.py fit --config configs/routerbench.yaml``.

A thin LightningCLI entry point: the model is
:class:`cascade_routing.estimators.module.QualityEstimatorModule`, the data
:class:`cascade_routing.estimators.datamodule.RoutingDataModule`; callbacks, loggers and the
artifact export (``ExportArtifact``) come from the YAML config. Runs offline by default.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from cascade_routing.estimators.datamodule import RoutingDataModule  # noqa: E402
from cascade_routing.estimators.module import QualityEstimatorModule  # noqa: E402


def main(args: list[str] | None = None) -> LightningCLI:
    from cascade_routing.estimators.runtime import configure_threads

    configure_threads()
    return LightningCLI(
        QualityEstimatorModule,
        RoutingDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
