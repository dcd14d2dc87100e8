"""Calibration after training: turn a trained quality network into a servable :class:`EstimatorArtifact`.

One job per module: binding an artifact to encoded splits (``binding``), variance-head scale and
residual covariances (``uncertainty``), the choice of the default uncertainty mode
(``selection``), the λ/γ tables (``lambda_tables``), and the whole export (``build``:
:func:`build_artifact`, :func:`export_trained`). Plain torch, no Lightning: the training stage
calls :func:`export_trained` from its callback and from ``cascade-routing export --ckpt``.
"""

from cascade_routing.calibration.binding import bind_split
from cascade_routing.calibration.build import build_artifact, default_artifact_path, export_trained
from cascade_routing.calibration.lambda_tables import fit_lambda_tables
from cascade_routing.calibration.selection import select_uncertainty

__all__ = ["bind_split", "build_artifact", "default_artifact_path", "export_trained", "fit_lambda_tables",
           "select_uncertainty"]
