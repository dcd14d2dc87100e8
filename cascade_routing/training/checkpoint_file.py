"""Reading a Lightning checkpoint (``.ckpt``) safely, with an error that says what the file is instead."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def read_lightning_checkpoint(ckpt: str | Path) -> dict:
    """The dict of the Lightning checkpoint ``ckpt``, read by ``torch.load(weights_only=True)``: tensors
    and plain containers only, nothing unpickled that could run code.

    ``FileNotFoundError`` if there is no such file; ``ValueError`` naming the file if it is a folder, a safetensors
    file (an estimator artifact is used as it is, not exported again), if ``weights_only`` loading refuses
    it (not a checkpoint, or one holding arbitrary Python objects: it is never retried unsafely), or if it
    loads but is not a Lightning checkpoint (no ``state_dict``).
    """
    from cascade_routing.estimators.artifact import looks_like_safetensors

    path = Path(ckpt)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file: give the .ckpt itself (`train.py fit` writes "
                         "runs/<name>/checkpoints/best.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if looks_like_safetensors(path):
        raise ValueError(
            f"{path} is a safetensors file (an estimator artifact?), not a Lightning checkpoint: export reads "
            "the .ckpt that `train.py fit` writes (runs/<name>/checkpoints/best.ckpt); an artifact is used as "
            "it is (evaluate, serve, inspect-artifact)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by file kind
        raise ValueError(
            f"{path} is not a Lightning checkpoint that loads with tensors and plain data only "
            f"(torch.load(weights_only=True) refused it: {type(err).__name__}); cascade-routing never loads "
            "a checkpoint with weights_only=False") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(f"{path} loads but is not a Lightning checkpoint (no 'state_dict')")
    return state


def refuse_artifact(ckpt: object, loader: str) -> None:
    """``ValueError`` if ``ckpt`` is a local path to an exported estimator artifact (a safetensors file,
    or a folder ``EstimatorArtifact.save_pretrained`` wrote) rather than a Lightning checkpoint: the
    message says so and names the artifact loader. Anything else (a ``.ckpt``, a missing path, a URL,
    a file object) passes, for ``loader`` to read or refuse; nothing is unpickled here."""
    from cascade_routing.estimators.artifact import ARTIFACT_FILENAME, looks_like_safetensors

    if not isinstance(ckpt, (str, os.PathLike)):
        return
    path = Path(ckpt)
    artifact = path / ARTIFACT_FILENAME if path.is_dir() else path
    if artifact.is_file() and looks_like_safetensors(artifact):
        raise ValueError(
            f"{path} is an exported estimator artifact (safetensors), not a Lightning training checkpoint: "
            "load it with cascade_routing.estimators.artifact.load_artifact(path) or "
            "EstimatorArtifact.from_pretrained(path) (its .network() is the trained QualityNetwork); "
            f"{loader} reads the .ckpt that `train.py fit` writes (runs/<name>/checkpoints/best.ckpt)")


def check_training_checkpoint(ckpt: str | Path) -> dict:
    """The dict of ``ckpt`` (:func:`read_lightning_checkpoint`) if it is a checkpoint ``train.py fit`` wrote:
    a Lightning checkpoint whose ``hyper_parameters`` name the models and the network shape of a
    ``QualityEstimatorModule``. Otherwise a ``ValueError`` naming the file and what it lacks (a foreign
    Lightning checkpoint, a bare ``state_dict``), before Lightning reads it for ``--ckpt_path``."""
    state = read_lightning_checkpoint(ckpt)
    hparams = state.get("hyper_parameters")
    missing = [key for key in ("models", "network_config") if not isinstance(hparams, dict) or not hparams.get(key)]
    if "pytorch-lightning_version" not in state or missing:
        lacks = "no 'pytorch-lightning_version'" if "pytorch-lightning_version" not in state else \
            f"no {' or '.join(repr(k) for k in missing)} in its hyper_parameters"
        raise ValueError(f"{ckpt} is not a checkpoint written by `train.py fit` ({lacks}): --ckpt_path takes a "
                         "QualityEstimatorModule checkpoint such as runs/<name>/checkpoints/best.ckpt")
    return state
