"""Experiment loggers: wandb offline unless asked otherwise (no account needed)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

# ids of the wandb runs CascadeWandbLogger started in this process (the one left open for evaluation, see
# CascadeWandbLogger.experiment)
_STARTED_RUNS: set[str] = set()


def wandb_mode() -> str:
    """``"online"`` or ``"disabled"`` when ``WANDB_MODE`` says so, else ``"offline"`` (unset included)."""
    mode = os.environ.get("WANDB_MODE", "offline").strip().lower()
    return mode if mode in ("online", "disabled") else "offline"


@contextmanager
def wandb_errors_as_value_errors():
    """wandb refusing to start (``UsageError``: ``WANDB_MODE=online`` without an API key, ...) as a
    ``ValueError`` that says how to log offline instead."""
    try:
        yield
    except Exception as err:
        errors = sys.modules.get("wandb.errors")
        if errors is None or not isinstance(err, errors.Error):
            raise
        raise ValueError(f"wandb could not start a run (WANDB_MODE={os.environ.get('WANDB_MODE', 'unset')}): "
                         f"{str(err).rstrip('.')}; without a wandb account, unset WANDB_MODE (offline is the "
                         "default) or set WANDB_MODE=disabled") from None


class CascadeWandbLogger(WandbLogger):
    """``WandbLogger`` whose ``offline`` defaults to True (``WANDB_MODE=online`` or ``offline: false`` to sync).

    Each logger is its own wandb run. Its run stays open after ``fit`` (``train-eval`` logs the
    evaluation into it); the next ``CascadeWandbLogger`` in the process finishes such a run before it
    starts its own, where ``WandbLogger`` would log a second experiment into the first one's run. A
    run the caller opened itself (``wandb.init`` before training, as a sweep agent does) is reused,
    as ``WandbLogger`` does.

    Args:
        project: wandb project name.
        save_dir: where the offline run folder goes.
        name: run name.
        offline: None: from the environment (:func:`wandb_mode`; ``WANDB_MODE=disabled`` writes nothing).
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
        # offline=True makes Lightning force wandb's offline mode, so "disabled" must pass False; the
        # explicit mode wins over settings an earlier run left in this process
        mode = wandb_mode()
        off = mode == "offline" if offline is None else offline
        if offline is None and mode == "disabled":
            kwargs.setdefault("mode", "disabled")
        super().__init__(project=project, save_dir=save_dir, name=name, offline=off, **kwargs)
        # Lightning passes anonymous=None, which wandb >= 0.19 answers with a deprecation warning on every run
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The wandb run, started on first use (see the class doc: a run an earlier ``CascadeWandbLogger``
        left open is finished first, never reused)."""
        import wandb

        starting = self._experiment is None
        if starting and wandb.run is not None and wandb.run.id in _STARTED_RUNS:
            wandb.run.finish()
        started_here = starting and wandb.run is None
        run = super().experiment
        if started_here and getattr(run, "id", None):
            _STARTED_RUNS.add(run.id)
        return run
