"""Export as a training step: from a Lightning checkpoint or at the end of ``fit``.

Both call the plain function :func:`~cascade_routing.calibration.build.export_trained`;
:class:`ExportArtifact` is skipped under ``fast_dev_run``, when no training step ran
(``trainer.max_epochs=0``) and after an interrupted fit (Ctrl-C: it names the best checkpoint so far),
so a debug or empty run never writes or overwrites an artifact.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import lightning as L
import torch

from cascade_routing.calibration.build import export_trained
from cascade_routing.evaluation.protocol import EXPORT_BUDGETS_PER_PAIR, check_count


def check_output_folder(path: str | os.PathLike, setting: str) -> None:
    """``ValueError`` naming ``setting`` if ``path`` (a folder to write into) or a folder above it exists as
    a file, so a run fails before training rather than when it first writes there."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise ValueError(f"{setting} {str(path)!r}: {part} is a file, not a folder")
            return


def export_checkpoint(
    ckpt: str | Path,
    path: str | Path | None = None,
    budgets_per_pair: int = EXPORT_BUDGETS_PER_PAIR,
    fit_lambdas: bool = True,
    select: bool = True,
    cache_dir: str | None = None,
) -> Path:
    """Export a Lightning checkpoint (``best.ckpt``) to an artifact, without retraining.

    The module comes from ``QualityEstimatorModule.load_from_checkpoint`` and the data module from
    the checkpoint's datamodule hyperparameters (same dataset, splits and encoder; embeddings from
    the cache; a setting the checkpoint predates takes the value it was trained with, not today's
    default: :func:`~cascade_routing.training.datamodule.checkpoint_data_settings`); then
    :func:`export_trained`. Without ``path``, a checkpoint at ``<root>/checkpoints/*.ckpt`` (what
    ``train.py fit`` writes) is exported to ``artifacts/<root name>.safetensors``, the file ``fit``
    itself writes; any other to ``artifacts/<dataset>.safetensors``. ``budgets_per_pair`` below 1 (or
    not an integer) is a ValueError naming it before anything loads, as ``export --budgets-per-pair``
    refuses it.
    """
    from cascade_routing.training.datamodule import RoutingDataModule, checkpoint_data_settings
    from cascade_routing.training.module import QualityEstimatorModule

    check_count("budgets_per_pair", budgets_per_pair)
    ckpt = Path(ckpt)
    if path is None and ckpt.resolve().parent.name == "checkpoints":
        path = Path("artifacts") / f"{ckpt.resolve().parent.parent.name}.safetensors"
    if path is not None and Path(path).is_dir():
        raise ValueError(f"export output {str(path)!r} is a folder; it names the artifact file to write")
    check_output_folder(Path(path).parent if path is not None else Path("artifacts"), "export output folder")
    hparams = checkpoint_data_settings(ckpt)
    if cache_dir is not None:
        hparams["cache_dir"] = cache_dir
    try:
        datamodule = RoutingDataModule(**hparams)
        datamodule.setup("fit")
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"{ckpt}: export rebuilds the checkpoint's own splits (dataset {hparams.get('dataset')!r}, "
                         f"encoder {hparams.get('encoder_path') or 'all-MiniLM-L6-v2'}) to calibrate on, and "
                         f"cannot: {err}") from err
    module = QualityEstimatorModule.load_from_checkpoint(ckpt, map_location="cpu")
    return export_trained(module, datamodule, path, budgets_per_pair, fit_lambdas, select, checkpoint=str(ckpt))


class ExportArtifact(L.Callback):
    """At the end of ``fit``: reload the best checkpoint's weights and export (:func:`~cascade_routing.calibration.build.export_trained`).

    Skipped under ``fast_dev_run``, when no training step ran (``trainer.max_epochs=0``: the weights
    would be the initialisation) and after an interrupted fit, so a debug or empty run never writes or
    overwrites an artifact. To export again without retraining: ``cascade-routing export --ckpt``.

    Args:
        path: output file (``.safetensors``); None: :func:`~cascade_routing.calibration.build.default_artifact_path`.
        budgets_per_pair: budgets between consecutive non-dominated models for the λ tables (an
            integer >= 1: checked when constructed, and by ``train.py`` before anything loads, so a
            bad value never fails at the end of a fit).
        fit_lambdas: fit the λ/γ tables (set false for quick experiments).
        select_uncertainty: choose the default uncertainty mode by calibration-split decision
            quality (:func:`~cascade_routing.calibration.selection.select_uncertainty`); false: by val NLL.
    """

    def __init__(self, path: str | None = None, budgets_per_pair: int = EXPORT_BUDGETS_PER_PAIR,
                 fit_lambdas: bool = True, select_uncertainty: bool = True) -> None:
        check_count("ExportArtifact budgets_per_pair", budgets_per_pair)
        self.path = path
        self.budgets_per_pair = budgets_per_pair
        self.fit_lambdas = fit_lambdas
        self.select_uncertainty = select_uncertainty
        self.artifact_path: Path | None = None
        self.skipped: str | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.fast_dev_run or trainer.interrupted or trainer.global_step == 0:
            self.skipped = ("fast_dev_run" if trainer.fast_dev_run else "interrupted" if trainer.interrupted
                            else "no training step ran")
            if trainer.is_global_zero:
                print(f"artifact export skipped ({self.skipped}): no artifact written")
            return
        if not trainer.is_global_zero:
            return
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        if ckpt:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
            pl_module.load_state_dict(state)
        self.artifact_path = export_trained(pl_module, trainer.datamodule, self.path, self.budgets_per_pair,
                                            self.fit_lambdas, self.select_uncertainty, checkpoint=ckpt)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        """Ctrl-C (Lightning stops the fit and exits with status 1, without ``on_fit_end``): say that no
        artifact was written and what the run left: the best checkpoint so far, to export or resume from."""
        if not isinstance(exception, KeyboardInterrupt):
            return
        self.skipped = "interrupted"
        if not trainer.is_global_zero:
            return
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        if ckpt and Path(ckpt).is_file():
            left = (f"the best checkpoint so far is {ckpt}: `cascade-routing export --ckpt {shlex.quote(ckpt)}` "
                    f"writes its artifact, `--ckpt_path {shlex.quote(ckpt)}` resumes training from it")
        else:
            left = "no checkpoint was saved yet"
        print(f"training interrupted: artifact export skipped, no artifact written; {left}", flush=True)
