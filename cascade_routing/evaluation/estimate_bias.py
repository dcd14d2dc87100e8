"""Calibration in the large of a quality estimator, by how many models have run.

A policy reads the estimator at the ran-sets it visits: every cascade and cascade routing decides
its second step from a state where exactly one model ran. An estimator can be calibrated on
average and still be biased at one ran-set size; this module measures that.

For ran-set size k = 0..M, ``draws`` random ran-sets of size k per query (a uniform subset of that
size), and over the (query, set) pairs:

    run bias(k)      = mean over run cells   of (p̂_m(R) − q_m)
    unrun bias(k)    = mean over unrun cells of (p̂_m(R) − q_m)
    selected bias(k) = mean over (query, R)  of (max_{m∈R} p̂_m(R) − q_{m*}),  m* = argmax_{m∈R} p̂_m(R)

where p̂_m(R) is the estimator's mean for model m given the answers of the models in R, and q_m the
realised quality. Negative: the estimator expects less than the models deliver. The selected bias
is the error of the value a policy assigns to stopping at R (with uncertainty ``none``: the highest
post-hoc mean) against the quality of the answer it then returns; maximising over noisy estimates
makes it positive even for calibrated estimates (the winner's curse), growing with k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from cascade_routing.interfaces import QualityEstimator


@dataclass(frozen=True)
class SizeBias:
    """Mean signed error of the estimate at one ran-set size (NaN where there is no such cell)."""

    size: int
    run_bias: float
    unrun_bias: float
    run_cells: int
    unrun_cells: int
    selected_bias: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def random_sets_of_size(num: int, num_models: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Bool [num, M]: each row a uniform subset of exactly ``size`` models."""
    if not 0 <= size <= num_models:
        raise ValueError(f"ran-set size must lie in 0..{num_models}, got {size}")
    scores = torch.rand(num, num_models, generator=generator)
    return scores.argsort(dim=1).argsort(dim=1) < size


def bias_by_ran_set_size(estimator: QualityEstimator, quality: np.ndarray, draws: int = 4, seed: int = 0
                         ) -> list[SizeBias]:
    """:class:`SizeBias` for k = 0..M on the estimator's rows 0..N−1 (``quality`` [N, M] realised)."""
    quality = np.asarray(quality, dtype=np.float64)
    if quality.ndim != 2:
        raise ValueError(f"quality must be [N, M], got shape {quality.shape}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    n, m = quality.shape
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(n).repeat(draws)
    truth = quality[rows.numpy()]
    out = []
    for size in range(m + 1):
        ran = random_sets_of_size(rows.numel(), m, size, generator)
        mean = estimator.estimate(rows, ran).mean.double().cpu().numpy()
        error = mean - truth
        run = ran.numpy()
        selected = np.where(run, mean, -np.inf).argmax(1)
        picked = np.arange(rows.numel())
        out.append(SizeBias(
            size=size,
            run_bias=float(error[run].mean()) if run.any() else float("nan"),
            unrun_bias=float(error[~run].mean()) if (~run).any() else float("nan"),
            run_cells=int(run.sum()),
            unrun_cells=int((~run).sum()),
            selected_bias=float(error[picked, selected].mean()) if size else float("nan"),
        ))
    return out
