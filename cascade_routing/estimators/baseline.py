"""Paper-style baseline quality estimator: logistic regression per model and ran-set.

For ran-set s and model m: ``p_m(x, s) = σ(w_{s,m} · φ_s(x))`` with features
``φ_s(x) = [task one-hot, (log-prob confidence_k, log answer length_k, agreement_k)_{k∈s}, 1]``
(columns of models outside s are 0, so their weights stay 0 under the L2 penalty). Every
(s, m) pair is an independent L2-regularised logistic regression
(``Σ_i BCE + ½ α ||w||²``, intercept not penalised), fitted by batched Newton steps in torch.
Graded quality is fitted the same way (cross-entropy with a fractional target).

Uncertainty as in the paper: for each ran-set s, the covariance over calibration queries of
``p(x, all) − p(x, s)``. Bound to a table like every estimator; reads responses and features only
where ``ran``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.interfaces import QualityEstimate
from cascade_routing.estimators.features import (
    AgreementCache,
    answer_features,
    pair_similarity,
    static_features,
    task_onehot,
)
from cascade_routing.estimators.masks import all_masks, bitmask
from cascade_routing.estimators.residuals import ResidualMoments

ANSWER_COLUMNS = (1, 0, 3)  # confidence, log_length, agreement (indices into ANSWER_FEATURES)


def design(task: Tensor, answer_feat: Tensor) -> Tensor:
    """[B, T + 3M + 1]: task one-hot, the three answer features of every model, intercept."""
    b = task.shape[0]
    per_model = answer_feat[..., list(ANSWER_COLUMNS)].reshape(b, -1)
    return torch.cat([task, per_model, torch.ones(b, 1, dtype=task.dtype)], dim=1)


MAX_BASELINE_MODELS = 14  # 2^14 ran-sets: about a minute of fitting on 2 cores


def design_all_masks(task: Tensor, static: Tensor, pair: Tensor, masks: Tensor) -> Tensor:
    """[S, N, F] design matrices for every mask in ``masks`` [S, M] at once (same columns as :func:`design`).

    With all answers known (training/calibration rows), the agreement of run model m under mask r is
    ``Σ_{k≠m} r_k S_mk / max(1, Σ_{k≠m} r_k)`` (``pair`` has a zero diagonal), 0 for unrun m: the rule of
    :func:`~cascade_routing.estimators.agreement.masked_agreement`, computed for all masks by one
    contraction instead of per (mask, row) [M, M] blocks (whose float32 sums round differently, so
    the fitted baseline would change in its last bits).
    """
    r = masks.to(static.dtype)  # [S, M]
    n, m = static.shape[:2]
    others = (r.sum(1, keepdim=True) - r).clamp_min(1.0)  # [S, M]
    agree = torch.einsum("nmk,sk->snm", pair.to(static.dtype), r) / others.unsqueeze(1) * r.unsqueeze(1)
    conf = static[..., 1].unsqueeze(0) * r.unsqueeze(1)
    length = static[..., 0].unsqueeze(0) * r.unsqueeze(1)
    per_model = torch.stack([conf, length, agree], dim=-1).reshape(masks.shape[0], n, 3 * m)
    s_count = masks.shape[0]
    return torch.cat(
        [task.to(static.dtype).expand(s_count, n, -1), per_model, torch.ones(s_count, n, 1, dtype=static.dtype)], dim=-1
    )


def _full_features(data: RoutingDataset) -> tuple[Tensor, Tensor]:
    n, m = data.quality.shape
    rows = np.arange(n)
    static = torch.from_numpy(static_features(rows, np.ones((n, m), bool), data.responses, data.features))
    pair = torch.from_numpy(pair_similarity(rows, np.ones((n, m), bool), data.responses, num_models=m))
    return static, pair


def fit_logistic(x: Tensor, y: Tensor, alpha: float = 1.0, iterations: int = 40) -> Tensor:
    """L2-regularised logistic regressions for ``x`` [S, N, F], ``y`` [N, M] -> weights [S, M, F].

    Böhning's bound optimisation: since p(1−p) <= 1/4, ``B_s = ¼ X_sᵀX_s + αI`` majorises every
    Hessian of design s, so ``w ← w − B_s⁻¹ ∇`` decreases the loss monotonically; ``B_s`` is
    factorised once per design and shared by the M models (cost per step: one gradient).
    """
    s, n, f = x.shape
    m = y.shape[1]
    xd = x.double()
    y = y.double()
    reg = alpha * torch.eye(f, dtype=torch.float64)
    reg[-1, -1] = 1e-6  # intercept (last column) barely penalised
    bound = 0.25 * torch.bmm(xd.transpose(1, 2), xd) + reg + 1e-9 * torch.eye(f, dtype=torch.float64)
    chol = torch.linalg.cholesky(bound)  # [S, F, F]
    w = torch.zeros(s, f, m, dtype=torch.float64)
    xt = xd.transpose(1, 2)
    for _ in range(iterations):
        p = torch.sigmoid(torch.bmm(xd, w))  # [S, N, M]
        grad = torch.bmm(xt, p - y) + reg @ w  # [S, F, M]
        w = w - torch.cholesky_solve(grad, chol)
    return w.transpose(1, 2).float()


class BaselineModel:
    """Weights [2^M, M, F] of every (ran-set, model) regression, plus residual covariances."""

    def __init__(self, models: list[str], task_vocabulary: list[str], weights: Tensor, covariances: Tensor | None = None):
        self.models = list(models)
        self.task_vocabulary = list(task_vocabulary)
        self.weights = weights
        self.covariances = covariances

    @classmethod
    def fit(cls, train: RoutingDataset, alpha: float = 1.0, chunk: int = 64, progress: bool = False) -> "BaselineModel":
        """One logistic regression per (ran-set, model): 2^M ran-sets, so ``ValueError`` above
        :data:`MAX_BASELINE_MODELS` models (2^20 ran-sets ran for hours and needed ~5 GB of weights)."""
        n, m = train.quality.shape
        if m > MAX_BASELINE_MODELS:
            raise ValueError(
                f"the paper-style baseline fits one regression per ran-set, 2^{m} = {2 ** m:,} for {m} models; it "
                f"supports at most {MAX_BASELINE_MODELS} models. Evaluate the learned estimator alone "
                "(evaluate/train-eval --no-baseline, or estimators=('learned',))")
        vocab = sorted(set(train.tasks)) if train.tasks is not None else []
        task = torch.from_numpy(task_onehot(train.tasks, vocab, n))
        static, pair = _full_features(train)
        y = torch.from_numpy(train.quality)
        masks = all_masks(m)
        weights = []
        starts = range(0, masks.shape[0], chunk)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="baseline: fit logistic regressions", unit="chunk", leave=False)
        for start in starts:
            ms = masks[start : start + chunk]
            xs = design_all_masks(task, static, pair, ms)
            weights.append(fit_logistic(xs, y, alpha))
        return cls(list(train.models), vocab, torch.cat(weights).float())

    def predict(self, task: Tensor, answer_feat: Tensor, ran: Tensor) -> Tensor:
        """Probabilities [B, M] from task one-hot [B, T], answer features [B, M, 4], ran [B, M]."""
        x = design(task.float(), answer_feat.float())
        w = self.weights[bitmask(ran.bool())]  # [B, M, F]
        return torch.sigmoid(torch.einsum("bf,bmf->bm", x, w))

    def fit_covariances(self, calibration: RoutingDataset) -> Tensor:
        """[2^M, M, M]: Cov_i(p_i(all) − p_i(s)) over the calibration rows (the paper's uncertainty)."""
        n, m = calibration.quality.shape
        task = torch.from_numpy(task_onehot(calibration.tasks, self.task_vocabulary, n))
        static, pair = _full_features(calibration)
        masks = all_masks(m)
        full = torch.ones(1, m, dtype=torch.bool)
        p_all = torch.sigmoid(torch.einsum("snf,smf->snm", design_all_masks(task, static, pair, full), self.weights[-1:]))[0]
        covs = []
        for start in range(0, masks.shape[0], 64):
            ms = masks[start : start + 64]
            x = design_all_masks(task, static, pair, ms)
            p = torch.sigmoid(torch.einsum("snf,smf->snm", x, self.weights[bitmask(ms)]))
            moments = ResidualMoments(ms.shape[0], m)
            moments.add((p_all.unsqueeze(0) - p).transpose(0, 1))  # [N, S, M]
            covs.append(moments.covariance())
        self.covariances = torch.cat(covs)
        return self.covariances

    def bind(
        self,
        queries: list[str],
        responses: np.ndarray | None,
        features: Mapping[str, np.ndarray] | None,
        tasks: list[str] | None,
    ) -> "BaselineQualityEstimator":
        return BaselineQualityEstimator(self, len(queries), responses, features, tasks)


class BaselineQualityEstimator:
    """A :class:`BaselineModel` bound to a table of rows; implements ``QualityEstimator``."""

    def __init__(self, model: BaselineModel, n: int, responses, features, tasks) -> None:
        self.model = model
        self.models = list(model.models)
        self.responses = responses
        self.features = features if features is not None else {}
        self.task = torch.from_numpy(task_onehot(tasks, model.task_vocabulary, n))
        self._agreement = AgreementCache()
        self._memo: dict[tuple[int, int], np.ndarray] = {}

    def estimate(self, queries: Tensor, ran: Tensor) -> QualityEstimate:
        """Probabilities (memoised per row and ran-set; run answers never change) and covariances."""
        device = torch.as_tensor(ran).device
        rows = torch.as_tensor(queries, dtype=torch.long).cpu()
        ran_c = torch.as_tensor(ran, dtype=torch.bool).cpu()
        ids = bitmask(ran_c).tolist()
        keys = list(zip(rows.tolist(), ids))
        missing = [b for b, k in enumerate(keys) if k not in self._memo]
        if missing:
            sel = torch.tensor(missing, dtype=torch.long)
            feats = answer_features(rows[sel].numpy(), ran_c[sel].numpy(), self.responses, self.features, self._agreement)
            p_new = self.model.predict(self.task[rows[sel]], torch.from_numpy(feats), ran_c[sel]).numpy()
            for k, b in enumerate(missing):
                self._memo[keys[b]] = p_new[k]
        p = torch.from_numpy(np.stack([self._memo[k] for k in keys])) if keys else torch.zeros(0, len(self.models))
        cov = None
        if self.model.covariances is not None:
            m = len(self.models)
            cov = self.model.covariances[bitmask(ran_c)] + 1e-6 * torch.eye(m)
        return QualityEstimate(p.float(), cov=cov).to(device)
