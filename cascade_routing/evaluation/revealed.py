"""How much a better post-hoc estimate is worth: beliefs whose run models move toward their true quality.

:class:`RevealedQuality` wraps a quality estimator bound to a split and, for the models that have run,
replaces the estimate by a blend with the realised quality:

    mean_m(R) ← (1 − w) · p̂_m(R) + w · q_m,   std_m(R) ← (1 − w) · σ_m(R)   for m ∈ R,

and leaves unrun models' beliefs and the ex-ante estimate (R = ∅) as they are. ``w = 0`` is the
estimator itself, ``w = 1`` an oracle that knows a model's quality once its answer is in. Routing
reads only the ex-ante estimate, so it is the same for every ``w``; cascades and cascade routing
gain what the sharper post-hoc estimate lets them save. Sweeping ``w`` maps the estimator's
own-answer AUROC (:func:`own_answer_auroc`) to what cascade routing gains over routing
(``benchmarks/bench_posthoc_ceiling.py``). A measurement tool, not an estimator to serve: it reads
the outcomes it is evaluated on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from cascade_routing.interfaces import QualityEstimate, QualityEstimator


class RevealedQuality:
    """``inner``'s beliefs with every run model's mean moved by ``weight`` toward ``quality`` [N, M]."""

    def __init__(self, inner: QualityEstimator, quality: np.ndarray | Tensor, weight: float) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must lie in [0, 1], got {weight}")
        quality = torch.as_tensor(np.asarray(quality), dtype=torch.float64)
        if quality.dim() != 2 or quality.shape[1] != len(inner.models):
            raise ValueError(f"quality must be [N, {len(inner.models)}] (models {list(inner.models)}), "
                             f"got shape {tuple(quality.shape)}")
        self.inner, self.quality, self.weight = inner, quality, float(weight)
        self.models = inner.models

    def estimate(self, queries: Tensor, ran: Tensor) -> QualityEstimate:
        est = self.inner.estimate(queries, ran)
        if est.cov is not None:
            raise ValueError("RevealedQuality supports std beliefs or none; bind the estimator with "
                             "uncertainty 'variance' or 'none'")
        run = torch.as_tensor(ran, dtype=torch.bool).to(est.mean.device)
        truth = self.quality[torch.as_tensor(queries, dtype=torch.long).cpu()].to(est.mean)
        w = self.weight
        mean = torch.where(run, (1 - w) * est.mean + w * truth, est.mean)
        std = None if est.std is None else torch.where(run, (1 - w) * est.std, est.std)
        return QualityEstimate(mean, std)


def own_answer_aurocs(estimator: QualityEstimator, labels: Tensor) -> list[float | None]:
    """Per model m: the AUROC of m's estimate after only m ran against ``labels`` [N, M] (0/1; the
    information a cascade's first answer carries); None where m's label never varies."""
    labels = torch.as_tensor(labels).long().cpu()
    n, m = labels.shape
    rows, out = torch.arange(n), []
    for j in range(m):
        if int(labels[:, j].min()) == int(labels[:, j].max()):
            out.append(None)
            continue
        only = torch.zeros(n, m, dtype=torch.bool)
        only[:, j] = True
        out.append(float(binary_auroc(estimator.estimate(rows, only).mean[:, j].float().cpu(), labels[:, j])))
    return out


def own_answer_auroc(estimator: QualityEstimator, quality: np.ndarray | Tensor, threshold: float = 0.5) -> float:
    """Mean of :func:`own_answer_aurocs` against ``quality ≥ threshold`` over the models whose outcome varies."""
    labels = torch.as_tensor(np.asarray(quality)) >= threshold
    scores = [a for a in own_answer_aurocs(estimator, labels) if a is not None]
    if not scores:
        raise ValueError("no model's outcome varies: the own-answer AUROC is undefined")
    return float(np.mean(scores))
