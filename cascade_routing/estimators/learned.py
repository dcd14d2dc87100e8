"""The learned quality estimator bound to a table of queries (implements ``QualityEstimator``).

``estimate(queries, ran)`` for row ids ``queries`` [B] and ``ran`` [B, M]:

1. reads ``responses[i, m]`` and ``features[k][i, m]`` only where ``ran[b, m]`` (a live server may
   fill these arrays in place as answers arrive);
2. embeds the run answers it has not seen yet (``answer_embedder``, one batched call), builds the
   answer features (``features.answer_features``) and runs the network: ``mean = σ(logit)``;
3. uncertainty: ``variance`` → ``std = sqrt(c_m · exp(logvar))``; ``covariance`` → ``cov =
   Σ_{bitmask(ran)} + εI`` (residual covariance of that ran-set); ``none`` → no uncertainty.
   A table restricted to some ran-sets (``covariance_coverage``: every set with at most ``max_run``
   models run plus the prefixes of ``chains``) raises :class:`UncoveredRanSetError` for any other set.

Results are memoised per (row, ran-set), in one [N, M] table per ran-set: the network is
deterministic in eval mode and a run answer never changes, so re-asking (e.g. while fitting λ) is an
array gather.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from cascade_routing.interfaces import QualityEstimate, checked_row_ids
from cascade_routing.estimators.features import AgreementCache, answer_features
from cascade_routing.estimators.masks import bitmask, covered_ran_sets, ran_set_names
from cascade_routing.estimators.network import QualityNetwork

UNCERTAINTY_MODES = ("variance", "covariance", "none")
COV_JITTER = 1e-6


def check_uncertainty_mode(mode: object, error: type[Exception] = ValueError) -> None:
    """``error`` naming ``mode`` unless it is one of :data:`UNCERTAINTY_MODES`."""
    if mode not in UNCERTAINTY_MODES:
        raise error(f"uncertainty must be one of {UNCERTAINTY_MODES}, got {mode!r}")


class UncoveredRanSetError(LookupError):
    """A covariance lookup of a ran-set outside the artifact's restricted table."""


def coverage_ids(coverage: Mapping | None, models: list[str]) -> Tensor:
    """Sorted long ids of the ran-sets a covariance table with ``coverage`` holds (None: all 2^M):
    every set with at most ``coverage["max_run"]`` models run plus the prefixes of ``coverage["chains"]``
    (lists of model names in run order)."""
    if coverage is None:
        return torch.arange(2 ** len(models))
    unknown = sorted({name for chain in coverage["chains"] for name in chain} - set(models))
    if unknown:
        raise ValueError(f"covariance coverage names models {unknown} that are not among {models}")
    chains = [[models.index(name) for name in chain] for chain in coverage["chains"]]
    return covered_ran_sets(len(models), coverage["max_run"], chains)


class LearnedQualityEstimator:
    """See the module docstring. ``query_emb`` [N, D], ``task`` [N, T] and ``query_feat`` [N, X] (query
    text statistics; None when the network takes none) are precomputed at bind time."""

    def __init__(
        self,
        network: QualityNetwork,
        models: list[str],
        query_emb: Tensor,
        task: Tensor,
        responses: np.ndarray | None,
        features: Mapping[str, np.ndarray] | None,
        answer_embedder: Callable[[list[str]], np.ndarray],
        uncertainty: str = "variance",
        var_scale: Tensor | None = None,
        covariances: Tensor | None = None,
        batch_size: int = 4096,
        query_feat: Tensor | None = None,
        covariance_coverage: Mapping | None = None,
    ) -> None:
        check_uncertainty_mode(uncertainty)
        if uncertainty == "covariance" and covariances is None:
            raise ValueError("uncertainty='covariance' needs the residual covariances (none in this artifact)")
        n, m = query_emb.shape[0], len(models)
        if responses is not None and np.asarray(responses).shape != (n, m):
            raise ValueError(f"responses must be [{n}, {m}] (queries × models {models}), got {np.shape(responses)}")
        for key, arr in (features or {}).items():
            if np.shape(arr) != (n, m):
                raise ValueError(f"feature {key!r} must be [{n}, {m}] (queries × models), got {np.shape(arr)}")
        self.network = network.eval()
        self.models = list(models)
        self.query_emb = query_emb.float()
        self.task = task.float()
        self.query_feat = None if query_feat is None else query_feat.float()
        self.responses = responses
        self.features = features if features is not None else {}
        self.answer_embedder = answer_embedder
        self.uncertainty = uncertainty
        self.var_scale = torch.ones(m) if var_scale is None else var_scale.float()
        self.covariances = None if covariances is None else covariances.float()
        self.covariance_coverage = covariance_coverage
        self._covered: np.ndarray | None = None  # bool [2^M] of a restricted table; None: every ran-set
        if covariance_coverage is not None:
            self._covered = np.zeros(2**m, dtype=bool)
            self._covered[coverage_ids(covariance_coverage, self.models).numpy()] = True
        self.batch_size = batch_size
        self._answer_emb: dict[tuple[int, int], np.ndarray] = {}
        self._agreement = AgreementCache()
        # ran-set bitmask -> (mean [N, M], logvar [N, M], filled bool [N]) of the network's outputs
        self._memo: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.embed_dim = int(query_emb.shape[1])

    # ------------------------------------------------------------------ internals
    def _embed_run_answers(self, rows: np.ndarray, ran: np.ndarray) -> None:
        if self.responses is None:
            return
        todo = [(int(rows[b]), int(m)) for b, m in zip(*np.nonzero(ran)) if (int(rows[b]), int(m)) not in self._answer_emb]
        if not todo:
            return
        texts = ["" if self.responses[i, m] is None else str(self.responses[i, m]) for i, m in todo]
        emb = np.asarray(self.answer_embedder(texts), dtype=np.float32)
        for key, e in zip(todo, emb):
            self._answer_emb[key] = e

    def _answer_tensor(self, rows: np.ndarray, ran: np.ndarray) -> Tensor:
        out = np.zeros((rows.size, ran.shape[1], self.embed_dim), dtype=np.float32)
        if self.responses is not None:
            for b, m in zip(*np.nonzero(ran)):
                out[b, m] = self._answer_emb[(int(rows[b]), int(m))]
        return torch.from_numpy(out)

    @torch.no_grad()
    def _compute(self, rows: np.ndarray, ran: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._embed_run_answers(rows, ran)
        feats = torch.from_numpy(answer_features(rows, ran, self.responses, self.features, self._agreement))
        ran_t = torch.from_numpy(ran)
        rows_t = torch.from_numpy(rows)
        logit, logvar = self.network(
            self.query_emb[rows_t], ran_t, self._answer_tensor(rows, ran), feats, self.task[rows_t],
            None if self.query_feat is None else self.query_feat[rows_t],
        )
        return torch.sigmoid(logit).numpy(), logvar.numpy()

    def _store(self, state: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        store = self._memo.get(state)
        if store is None:
            n, m = self.query_emb.shape[0], len(self.models)
            store = (np.empty((n, m), np.float32), np.empty((n, m), np.float32), np.zeros(n, dtype=bool))
            self._memo[state] = store
        return store

    # ------------------------------------------------------------------ API
    def estimate(self, queries: Tensor, ran: Tensor) -> QualityEstimate:
        device = torch.as_tensor(ran).device
        rows = checked_row_ids(queries, self.query_emb.shape[0], out_of_range=IndexError)
        ran_np = torch.as_tensor(ran, dtype=torch.bool).cpu().numpy()
        if ran_np.shape != (rows.size, len(self.models)):
            raise ValueError(f"ran must be [{rows.size}, {len(self.models)}], got {ran_np.shape}")
        ids = bitmask(torch.from_numpy(ran_np)).numpy()
        stores = {int(sid): self._store(int(sid)) for sid in np.unique(ids)}
        at_state = {sid: np.nonzero(ids == sid)[0] for sid in stores}
        filled = np.empty(rows.size, dtype=bool)
        for sid, at in at_state.items():
            filled[at] = stores[sid][2][rows[at]]
        # positions whose (row, ran-set) is not memoised yet, each pair once
        todo_a = np.nonzero(~filled)[0]
        if todo_a.size:
            _, first = np.unique(np.stack([rows[todo_a], ids[todo_a]], 1), axis=0, return_index=True)
            missing = todo_a[np.sort(first)]
            for s in range(0, len(missing), self.batch_size):
                sel = missing[s : s + self.batch_size]
                p, lv = self._compute(rows[sel], ran_np[sel])
                for k, b in enumerate(sel):
                    store = stores[int(ids[b])]
                    store[0][rows[b]], store[1][rows[b]], store[2][rows[b]] = p[k], lv[k], True
        m = len(self.models)
        mean = np.empty((rows.size, m), dtype=np.float32)
        logvar = np.empty((rows.size, m), dtype=np.float32)
        for sid, at in at_state.items():
            store = stores[sid]
            mean[at], logvar[at] = store[0][rows[at]], store[1][rows[at]]
        mean_t = torch.from_numpy(mean)
        if self.uncertainty == "variance":
            std = (self.var_scale * torch.from_numpy(logvar).exp()).sqrt()
            return QualityEstimate(mean_t, std=std).to(device)
        if self.uncertainty == "covariance":
            self._check_covered(ids)
            cov = self.covariances[torch.from_numpy(ids)] + COV_JITTER * torch.eye(m)
            return QualityEstimate(mean_t, cov=cov).to(device)
        return QualityEstimate(mean_t).to(device)

    def _check_covered(self, ids: np.ndarray) -> None:
        if self._covered is None or bool(self._covered[ids].all()):
            return
        state = int(ids[~self._covered[ids]][0])
        cov = self.covariance_coverage
        raise UncoveredRanSetError(
            f"ran-set {ran_set_names(state, self.models)} ({bin(state).count('1')} models run) is not in this "
            f"artifact's residual covariance table, which covers the ran-sets with at most {cov['max_run']} models "
            f"run and the prefixes of the chains {cov['chains']} ({int(self._covered.sum())} of {self._covered.size} "
            f"sets); use uncertainty 'variance' or 'none' for deeper states"
        )
