"""Experiment loggers: wandb offline unless asked otherwise (no account needed)."""

from __future__ import annotations

import os

from lightning.pytorch.loggers import WandbLogger


def wandb_offline_default() -> bool:
    """Offline unless ``WANDB_MODE=online`` is set in the environment."""
    return os.environ.get("WANDB_MODE", "offline").lower() != "online"


class CascadeWandbLogger(WandbLogger):
    """``WandbLogger`` whose ``offline`` defaults to True (``WANDB_MODE=online`` or ``offline: false`` to sync).

    Args:
        project: wandb project name.
        save_dir: where the offline run folder goes.
        name: run name.
        offline: None: from the environment (see :func:`wandb_offline_default`).
        group: wandb group of the run (training and evaluation of one experiment share it).
    """

    def __init__(
        self,
        project: str = "cascade-routing",
        save_dir: str | None = "runs",
        name: str | None = None,
        offline: bool | None = None,
        group: str | None = None,
        **kwargs,
    ) -> None:
        save_dir = save_dir or "runs"
        os.makedirs(save_dir, exist_ok=True)
        if group is not None:
            kwargs["group"] = group
        os.environ.setdefault("WANDB_SILENT", "true")
        off = wandb_offline_default() if offline is None else offline
        super().__init__(project=project, save_dir=save_dir, name=name, offline=off, **kwargs)
        # Lightning passes anonymous=None, which wandb >= 0.19 answers with a deprecation warning on every run
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
