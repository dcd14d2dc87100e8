"""Choose the artifact's default uncertainty mode by the decisions it yields on the calibration split.

Candidates: variance head, residual covariance, each also shrunk toward none by α
(σ² → α·σ², Σ → α·Σ, α in :data:`SELECTION_SCALES`), and none. Scored by 2-fold cross-fitting on the
calibration split only (λ fitted on one half, cascade-routing AUC on the other, few budgets);
``none`` stays unless another candidate beats it by more than its bootstrap noise
(:func:`select_uncertainty`).
"""

from __future__ import annotations

import copy
import time

import numpy as np

from cascade_routing.calibration.binding import bind_split
from cascade_routing.calibration.lambda_tables import min_reachable_budget
from cascade_routing.estimators.artifact import EstimatorArtifact
from cascade_routing.evaluation.metrics import paired_auc_gain_quantile, sweep_budgets
from cascade_routing.evaluation.sweep import budget_sweep, reference_points
from cascade_routing.policies.registry import calibrated_policy
from cascade_routing.policies.significance import DEFAULT_LEVEL

SELECTION_MODES = ("none", "variance", "covariance")  # ties go to the earlier (simpler, cheaper) mode
SELECTION_SCALES = (1.0, 0.3, 0.1)  # shrinkage α of the learned uncertainty tried by the export
MIN_CALIBRATION_ROWS = 4  # two calibration halves of two queries each, at the least


def candidate_name(mode: str, scale: float) -> str:
    """``mode`` at α = 1 (and always for ``none``), else ``mode*α`` (e.g. ``covariance*0.3``)."""
    return mode if mode == "none" or scale == 1.0 else f"{mode}*{scale:g}"


def scaled_estimator(base, mode: str, scale: float = 1.0):
    """A shallow copy of a bound :class:`LearnedQualityEstimator` (sharing its memo of network outputs)
    with uncertainty ``mode`` and its variance / covariance multiplied by ``scale``."""
    qe = copy.copy(base)
    qe.uncertainty = mode
    if scale != 1.0:
        qe.var_scale = base.var_scale * scale
        if base.covariances is not None:
            qe.covariances = base.covariances * scale
    return qe


def _subsample_budgets(budgets: np.ndarray, max_budgets: int) -> np.ndarray:
    """At most ``max_budgets`` of ``budgets`` (sorted), evenly spaced by index, ends kept."""
    budgets = np.unique(np.asarray(budgets, dtype=np.float64))
    if max_budgets <= 0 or budgets.size <= max_budgets:
        return budgets
    idx = np.unique(np.round(np.linspace(0, budgets.size - 1, max_budgets)).astype(int))
    return budgets[idx]


def _candidates(artifact: EstimatorArtifact, modes: tuple[str, ...], scales: tuple[float, ...]
                ) -> tuple[dict[str, tuple[str, float]], list[str]]:
    """({candidate name: (mode, α)} in the order modes × scales (``none`` once), modes skipped because
    the artifact cannot serve them (``covariance`` without tables))."""
    usable = [m for m in modes if not (m == "covariance" and artifact.covariances is None)]
    skipped = [m for m in modes if m not in usable]
    if not usable:
        raise ValueError(f"no usable uncertainty mode among {modes} (artifact has no covariances)")
    if not scales or any(not (a > 0) for a in scales):
        raise ValueError(f"uncertainty scales must be > 0, got {scales}")
    candidates: dict[str, tuple[str, float]] = {}
    for mode in usable:
        for a in ((1.0,) if mode == "none" else scales):
            candidates.setdefault(candidate_name(mode, float(a)), (mode, float(a)))
    return candidates, skipped


def calibration_halves(n: int, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The two folds ``((A, B), (B, A))`` (fit rows, scored rows) of a seeded random halving of ``n``
    rows, each half sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    half_a, half_b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
    return (half_a, half_b), (half_b, half_a)


def score_budgets(ds, score_rows: np.ndarray, budgets_per_pair: int, max_budgets: int, floor: float) -> np.ndarray:
    """The budgets a fold is scored at: ``budgets_per_pair`` between the scored half's non-dominated
    models, at most ``max_budgets`` of them (``<= 0``: all), none below ``floor``."""
    c, q = ds.cost[score_rows], ds.quality[score_rows]
    b = _subsample_budgets(sweep_budgets(c.mean(0), q.mean(0), budgets_per_pair), max_budgets)
    return np.unique(np.maximum(b, floor))


def _fold_sweep(ds, qe, cost_est, fit_rows: np.ndarray, score_rows: np.ndarray, budgets: np.ndarray, strategy: str,
                num_samples: int, seed: int):
    """λ of ``strategy`` fitted per budget on ``fit_rows``, simulated on ``score_rows`` (no bootstrap)."""
    # one constant λ and no guard: modes are compared under the plain policy (shapes and the guard are
    # chosen per budget afterwards, when the λ tables are fitted)
    policy = calibrated_policy(strategy, ds.quality[fit_rows], ds.cost[fit_rows], num_samples=num_samples,
                               seed=seed, step_ratios=None, routing_guard=False)
    return budget_sweep(policy, qe, cost_est, ds.quality, ds.cost, fit_rows, score_rows, budgets,
                        texts=list(ds.queries), strategy=strategy, num_resamples=1, seed=seed)


def _choose(ds, folds, names: list[str], scores: dict[str, float],
            fold_points: dict[str, list[tuple[np.ndarray, np.ndarray]]], level: float, seed: int
            ) -> tuple[str, dict[str, float]]:
    """(winner, {candidate: bootstrap ``1 − level`` quantile of its 2-fold AUC gain over the default
    ``names[0]``}): the highest-scoring candidate among the default and those whose score is above the
    default's with a gain quantile > 0 (ties → the earlier)."""
    refs = []
    for _, score_rows in folds:
        ref = reference_points(ds.quality[score_rows], ds.cost[score_rows])
        refs.append((ref.c_min, ref.c_max, ref.q_lowest))
    default = names[0]
    gain_low = {name: round(paired_auc_gain_quantile(fold_points[name], fold_points[default], refs, 1.0 - level,
                                                     seed=seed), 4) for name in names[1:]}
    eligible = [name for name in names[1:] if scores[name] > scores[default] and gain_low[name] > 0.0]
    return max([default, *eligible], key=lambda name: (scores[name], -names.index(name))), gain_low


def _score_candidates(ds, candidates: dict[str, tuple[str, float]], base_q, cost_est, folds, fold_budgets,
                      strategy: str, num_samples: int, seed: int, progress: bool
                      ) -> tuple[dict[str, list[float]], dict[str, list[tuple[np.ndarray, np.ndarray]]]]:
    """Per candidate (mode, α): the AUC of each fold (λ fitted on one half, scored on the other) and
    the fold's per-query (cost, quality) points, for :func:`select_uncertainty`."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(candidates) * 2, desc="select uncertainty (calibration, 2-fold)", unit="fold",
                   leave=False)
    fold_scores: dict[str, list[float]] = {}
    fold_points: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for name, (mode, a) in candidates.items():
        qe = scaled_estimator(base_q, mode, a)  # shares the memo of network outputs
        for (fit_rows, score_rows), budgets in zip(folds, fold_budgets):
            res = _fold_sweep(ds, qe, cost_est, fit_rows, score_rows, budgets, strategy, num_samples, seed)
            fold_scores.setdefault(name, []).append(round(float(res.auc), 4))
            fold_points.setdefault(name, []).append((res.per_query_cost, res.per_query_quality))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return fold_scores, fold_points


def select_uncertainty(
    artifact: EstimatorArtifact,
    split,
    modes: tuple[str, ...] = SELECTION_MODES,
    scales: tuple[float, ...] = (1.0,),
    strategy: str = "cascade_routing",
    budgets_per_pair: int = 3,
    max_budgets: int = 6,
    num_samples: int = 64,
    seed: int = 0,
    progress: bool = True,
    level: float = DEFAULT_LEVEL,
) -> dict:
    """Score each uncertainty mode by the decisions it yields, on ``split`` (the calibration split) only.

    The rows are permuted (``seed``) and cut into halves A, B. For each mode and each fold (fit on
    A → score on B, fit on B → score on A), the engine's ``budget_sweep`` refits λ of ``strategy``
    per budget on the fit half and simulates on the other; the fold's score is the paper's AUC
    (×100) on the scored half (budgets: ``budgets_per_pair`` between the scored half's
    non-dominated models, at most ``max_budgets`` of them; one bootstrap resample, ignored).
    Candidates: every mode of ``modes`` at every shrinkage ``scales`` α (variance and covariance
    multiplied by α; ``none`` once), named by :func:`candidate_name`, in the order modes × scales.
    Cascade routing is run with one constant λ and without the routing guard here. A candidate's
    score is the mean over both folds. The first candidate (``none``: E[max] of the means) is the
    default; another candidate replaces it only when its gain is more than noise: the ``1 − level``
    quantile of the paired bootstrap of the mean 2-fold AUC gain
    (:func:`~cascade_routing.evaluation.metrics.paired_auc_gain_quantile`, queries of both halves
    resampled) is above 0. Among such candidates the highest score wins (ties → the earlier).
    Modes the artifact cannot serve (``covariance`` without tables) are skipped and listed. The
    network runs once per (row, ran-set): all candidates share the estimate memo.

    Returns ``{"chosen" (mode), "scale" (α), "scores": {candidate: mean AUC}, "folds": {candidate:
    [auc_AB, auc_BA]}, "gain_lower": {candidate: bootstrap quantile of the gain over the default},
    "chosen_by", "skipped", "strategy", "budgets", "rows", "seed", "seconds", "criterion"}``.
    """
    t0 = time.perf_counter()
    ds = split.dataset
    n = ds.quality.shape[0]
    if n < MIN_CALIBRATION_ROWS:
        raise ValueError(f"uncertainty selection needs >= {MIN_CALIBRATION_ROWS} calibration rows, got {n}")
    candidates, skipped = _candidates(artifact, modes, scales)
    folds = calibration_halves(n, seed)
    base_q, cost_est = bind_split(artifact, split, uncertainty="none")
    floor = min_reachable_budget(cost_est, ds.cost) * (1 + 1e-6)
    fold_budgets = [score_budgets(ds, score_rows, budgets_per_pair, max_budgets, floor) for _, score_rows in folds]
    fold_scores, fold_points = _score_candidates(ds, candidates, base_q, cost_est, folds, fold_budgets, strategy,
                                                 num_samples, seed, progress)
    scores = {name: round(float(np.mean(v)), 4) for name, v in fold_scores.items()}
    names = list(candidates)
    default = names[0]
    best, gain_low = _choose(ds, folds, names, scores, fold_points, level, seed)
    return {
        "chosen": candidates[best][0],
        "scale": candidates[best][1],
        "scores": scores,
        "folds": fold_scores,
        "skipped": skipped,
        "strategy": strategy,
        "budgets": [[round(float(x), 8) for x in b] for b in fold_budgets],
        "rows": [int(fit_rows.size) for fit_rows, _ in folds],
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
        "gain_lower": gain_low,
        "chosen_by": "default" if best == default else f"paired bootstrap (level {level})",
        "criterion": (f"mean 2-fold AUC (x100) on the calibration split, λ fitted on one half and scored on the "
                      f"other; {default!r} unless a candidate's AUC gain over it has a bootstrap "
                      f"{1.0 - level:g} quantile > 0"),
    }
