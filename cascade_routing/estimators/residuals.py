"""Moments of the residual ``r = p(all) − p(s)`` per ran-set s, the paper's uncertainty of an estimate.

Shared by the learned estimator's calibration (:func:`~cascade_routing.calibration.uncertainty.residual_moments`)
and the paper-style baseline (:meth:`~cascade_routing.estimators.baseline.BaselineModel.fit_covariances`).
"""

from __future__ import annotations

import torch
from torch import Tensor


class ResidualMoments:
    """Streaming sums over rows, in float64, of the residuals ``r`` [rows, S, M] of S ran-sets.

    After rows ``i = 1..n`` were added: ``covariance() = (Σ_i r_i r_iᵀ / n − μ μᵀ) · n / (n − 1)`` with
    ``μ = Σ_i r_i / n`` (the unbiased covariance over rows) and ``second_moment() = Σ_i r_i r_iᵀ / n``
    (the spread around 0), each [S, M, M] float32. The sums grow in the order the chunks are added.
    """

    def __init__(self, num_sets: int, num_models: int) -> None:
        self.n = 0
        self.sum_r = torch.zeros(num_sets, num_models, dtype=torch.float64)
        self.sum_rr = torch.zeros(num_sets, num_models, num_models, dtype=torch.float64)

    def add(self, r: Tensor) -> None:
        """Add a chunk of rows: ``r`` [k, S, M] (converted to float64)."""
        r = r.double()
        self.n += r.shape[0]
        self.sum_r += r.sum(0)
        self.sum_rr += torch.einsum("ksa,ksb->sab", r, r)

    def covariance(self) -> Tensor:
        n = self._rows()
        mean = self.sum_r / n
        return ((self.sum_rr / n - mean.unsqueeze(-1) * mean.unsqueeze(-2)) * n / max(n - 1, 1)).float()

    def second_moment(self) -> Tensor:
        return (self.sum_rr / self._rows()).float()

    def _rows(self) -> int:
        if self.n == 0:
            raise ValueError("no residual rows were added")
        return self.n
