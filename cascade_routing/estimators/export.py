"""Turn a trained :class:`QualityEstimatorModule` + its data module into an :class:`EstimatorArtifact`.

Steps (all on held-out splits, never on the training rows):

1. variance-head calibration ``c_m`` and residual covariances per ran-set on the calibration split
   (the paper's centered covariance and the uncentered second moment);
2. the methods compared on the val split (:func:`uncertainty.calibration_report`, NLL and 90%
   coverage, reported); the covariance table (centered or second moment) with the lower NLL is stored;
3. the cost model fitted on the training split;
4. the artifact's default uncertainty mode among variance head / residual covariance / none, each
   learned form also shrunk toward none by a factor α (σ² → α·σ², Σ → α·Σ, α in
   :data:`SELECTION_SCALES`), chosen by the decision quality it yields (:func:`select_uncertainty`):
   2-fold cross-fitting on the calibration split only (λ fitted on one half, cascade-routing AUC on
   the other, few budgets); ``none`` stays unless another candidate beats it by more than its
   bootstrap noise; the per-candidate scores are stored
   in the artifact (``uncertainty_selection``) and the chosen α is folded into the stored
   ``var_scale`` / ``covariances`` (so serving and evaluation use it with no extra field);
5. the model pool of the cascades and cascade routing: the non-dominated models of the calibration
   split (``EstimatorArtifact.pools``);
6. λ/γ fitted on the calibration split for every strategy at each budget of the paper's grid
   (``budgets_per_pair`` budgets between consecutive non-dominated models by calibration cost),
   with the chosen uncertainty mode and pool (cascade routing also chooses per budget among its
   λ shapes and the routing guard, :func:`~cascade_routing.policies.fitting.fit_lambda`).

:func:`export_trained` runs this and saves the artifact; :class:`ExportArtifact` calls it at the end of
``fit`` (global rank 0, best checkpoint weights; skipped under ``fast_dev_run``), and
:func:`export_checkpoint` (``cascade-routing export --ckpt``) on a saved checkpoint.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from cascade_routing.estimators import encoding
from cascade_routing.estimators.artifact import EstimatorArtifact, encoder_reference
from cascade_routing.estimators.cost import CostModel
from cascade_routing.estimators.uncertainty import calibration_report, fit_variance_scale, residual_moments
from cascade_routing.policies.pool import nondominated_pool
from cascade_routing.policies.significance import DEFAULT_LEVEL
from cascade_routing.policies.registry import POOLED_STRATEGIES, STRATEGIES, calibrated_policy, make_policy  # noqa: F401

MAX_COVARIANCE_MODELS = 11  # 2^11 ran-sets × M² floats; above this only the variance head is stored


def split_embedding_lookup(split) -> "callable":
    """An ``answer_embedder`` that serves cached embeddings of this split's responses by text."""
    table: dict[str, np.ndarray] = {}
    if split.dataset.responses is not None:
        emb = split.answer_emb.numpy()
        for (i, m), text in np.ndenumerate(split.dataset.responses):
            table.setdefault("" if text is None else str(text), emb[i, m])
    dim = split.answer_emb.shape[-1]

    def embed(texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in table]
        if missing:
            raise KeyError(f"{len(missing)} answer texts are not in the cached split (first: {missing[0][:60]!r})")
        return np.stack([table[t] for t in texts]) if texts else np.zeros((0, dim), np.float32)

    return embed


def refresh_query_embeddings(network, datamodule, names=("calibration", "val", "test")) -> None:
    """Re-encode the queries of the given splits with a fine-tuned query encoder (in place).

    The cached embeddings come from the frozen encoder; a network that carries its own encoder
    must see its own embeddings in calibration, λ fitting and evaluation.
    """
    if network.encoder is None:
        return
    for name in names:
        split = datamodule.splits[name]
        emb = encoding.encode_texts(list(split.dataset.queries), datamodule.tokenizer, network.encoder,
                                    "transformer", datamodule.max_length, truncation=datamodule.truncation)
        split.query_emb = torch.from_numpy(emb)


def bind_split(artifact: EstimatorArtifact, split, uncertainty: str | None = None, with_cost: bool = True):
    """Bind the artifact to an encoded split using its cached embeddings (no encoder run).

    ``features`` passed on include ``cost`` (the recorded cost, read only where a model ran).
    """
    ds = split.dataset
    feats = dict(ds.features)
    if with_cost:
        feats["cost"] = ds.cost
    return artifact.bind(
        ds.queries,
        ds.responses,
        feats,
        ds.tasks,
        query_embeddings=split.query_emb.numpy(),
        answer_embedder=split_embedding_lookup(split),
        uncertainty=uncertainty,
    )


def min_reachable_budget(cost_estimator, cost: np.ndarray) -> float:
    """Mean true cost when every query runs only its cheapest model *by estimate* (λ → ∞).

    No policy driven by these cost estimates can spend less, so budgets below it are raised to it.
    """
    n, m = cost.shape
    est = cost_estimator.estimate(torch.arange(n), torch.zeros(n, m, dtype=torch.bool))
    pick = est.argmin(1).numpy()
    return float(cost[np.arange(n), pick].mean())


def fit_lambda_tables(
    artifact: EstimatorArtifact,
    split,
    strategies=STRATEGIES,
    budgets_per_pair: int = 3,
    num_samples: int = 128,
    progress: bool = True,
) -> dict[str, dict[float, object]]:
    """strategy -> {budget: FittedLambda} fitted on ``split`` (the calibration split).

    A budget below what the cost estimates can reach (:func:`min_reachable_budget`) is fitted at
    that floor; the table key stays the requested budget and the FittedLambda records its own.
    """
    from cascade_routing.evaluation.metrics import sweep_budgets
    from cascade_routing.policies.fitting import fit_lambdas, query_uniforms

    ds = split.dataset
    qe, ce = bind_split(artifact, split)
    budgets = sweep_budgets(ds.cost.mean(0), ds.quality.mean(0), budgets_per_pair)
    floor = max(float(ds.cost.mean(0).min()), min_reachable_budget(ce, ds.cost) * (1 + 1e-6))
    uniforms = query_uniforms(ds.queries)
    out: dict[str, dict[float, object]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(strategies), desc="fit λ (calibration)", unit="strategy", leave=False)
    for strategy in strategies:
        policy = artifact.policy(strategy, num_samples=num_samples)
        # every budget of the strategy at once (the bisections advance together, batched)
        fits = fit_lambdas(policy, qe, ce, ds.quality, ds.cost, [max(float(b), floor) for b in budgets],
                           uniforms=uniforms, cache={})
        out[strategy] = {float(b): f for b, f in zip(budgets, fits)}
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


SELECTION_MODES = ("none", "variance", "covariance")  # ties go to the earlier (simpler, cheaper) mode
SELECTION_SCALES = (1.0, 0.3, 0.1)  # shrinkage α of the learned uncertainty tried by the export


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
    from cascade_routing.evaluation.metrics import paired_auc_gain_quantile, sweep_budgets
    from cascade_routing.evaluation.sweep import budget_sweep, reference_points

    t0 = time.perf_counter()
    ds = split.dataset
    n = ds.quality.shape[0]
    if n < 4:
        raise ValueError(f"uncertainty selection needs >= 4 calibration rows, got {n}")
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
    perm = np.random.default_rng(seed).permutation(n)
    half_a, half_b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
    folds = ((half_a, half_b), (half_b, half_a))
    base_q, cost_est = bind_split(artifact, split, uncertainty="none")
    fold_budgets = []
    floor = min_reachable_budget(cost_est, ds.cost) * (1 + 1e-6)
    for fit_rows, score_rows in folds:
        c, q = ds.cost[score_rows], ds.quality[score_rows]
        b = _subsample_budgets(sweep_budgets(c.mean(0), q.mean(0), budgets_per_pair), max_budgets)
        fold_budgets.append(np.unique(np.maximum(b, floor)))
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
            # one constant λ and no guard: modes are compared under the plain policy (shapes and the
            # guard are chosen per budget afterwards, when the λ tables are fitted)
            policy = calibrated_policy(strategy, ds.quality[fit_rows], ds.cost[fit_rows], num_samples=num_samples,
                                       seed=seed, step_ratios=None, routing_guard=False)
            res = budget_sweep(policy, qe, cost_est, ds.quality, ds.cost, fit_rows, score_rows, budgets,
                               texts=list(ds.queries), strategy=strategy, num_resamples=1, seed=seed)
            fold_scores.setdefault(name, []).append(round(float(res.auc), 4))
            fold_points.setdefault(name, []).append((res.per_query_cost, res.per_query_quality))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    scores = {name: round(float(np.mean(v)), 4) for name, v in fold_scores.items()}
    names = list(candidates)
    refs = []
    for _, score_rows in folds:
        ref = reference_points(ds.quality[score_rows], ds.cost[score_rows])
        refs.append((ref.c_min, ref.c_max, ref.q_lowest))
    default = names[0]
    gain_low = {name: round(paired_auc_gain_quantile(fold_points[name], fold_points[default], refs, 1.0 - level,
                                                     seed=seed), 4) for name in names[1:]}
    eligible = [name for name in names[1:] if scores[name] > scores[default] and gain_low[name] > 0.0]
    best = max([default, *eligible], key=lambda name: (scores[name], -names.index(name)))
    return {
        "chosen": candidates[best][0],
        "scale": candidates[best][1],
        "scores": scores,
        "folds": fold_scores,
        "skipped": skipped,
        "strategy": strategy,
        "budgets": [[round(float(x), 8) for x in b] for b in fold_budgets],
        "rows": [int(half_a.size), int(half_b.size)],
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
        "gain_lower": gain_low,
        "chosen_by": "default" if best == default else f"paired bootstrap (level {level})",
        "criterion": (f"mean 2-fold AUC (x100) on the calibration split, λ fitted on one half and scored on the "
                      f"other; {default!r} unless a candidate's AUC gain over it has a bootstrap "
                      f"{1.0 - level:g} quantile > 0"),
    }


def build_artifact(
    module,
    datamodule,
    strategies=STRATEGIES,
    budgets_per_pair: int = 3,
    fit_lambdas: bool = True,
    progress: bool = True,
    select_modes: tuple[str, ...] | None = SELECTION_MODES,
    selection_seed: int = 0,
    select_scales: tuple[float, ...] = SELECTION_SCALES,
) -> EstimatorArtifact:
    """See the module docstring. ``module.network`` must be trained; ``datamodule`` set up.

    ``select_modes=None`` skips the decision-quality selection (step 4); the default is then the
    method with the lower val NLL, as before.
    """
    t0 = time.perf_counter()
    network = module.network.cpu().eval()
    refresh_query_embeddings(network, datamodule)
    cal, val = datamodule.splits["calibration"], datamodule.splits["val"]
    m = len(datamodule.models)
    var_scale = fit_variance_scale(network, cal)
    tables = {}
    if m <= MAX_COVARIANCE_MODELS:
        # one network pass over every (row, ran-set) pair gives both tables
        tables["residual_covariance"], tables["residual_second_moment"] = residual_moments(network, cal)
    report = calibration_report(network, val, var_scale, tables)
    chosen_by_nll = min(report, key=lambda k: report[k]["nll"])
    best_table = min(tables, key=lambda k: report[k]["nll"]) if tables else None
    covs = tables[best_table] if best_table else None
    encoder_ref, encoder_tensors = encoder_reference(datamodule, network)  # carries a non-default frozen encoder
    art = EstimatorArtifact(
        models=list(datamodule.models),
        network_config=network.config.to_dict(),
        state_dict={**{k: v.detach().cpu().clone() for k, v in network.state_dict().items()}, **encoder_tensors},
        cost_model=CostModel.fit(datamodule.splits["train"].dataset),
        encoder=encoder_ref,
        task_vocabulary=datamodule.task_vocabulary,
        binary=datamodule.binary_quality,
        uncertainty="variance" if chosen_by_nll == "variance_head" else "covariance",
        covariance_kind=best_table,
        var_scale=var_scale,
        covariances=covs,
        calibration=report,
        data_config=datamodule.data_config(),
        train_config=dict(module.hparams),
    )
    frontier = [art.models[i] for i in nondominated_pool(cal.dataset.quality, cal.dataset.cost)]
    art.pools = {strategy: frontier for strategy in strategies if strategy in POOLED_STRATEGIES}
    if select_modes:
        sel = select_uncertainty(art, cal, tuple(select_modes), tuple(select_scales), seed=selection_seed,
                                 progress=progress)
        art.uncertainty_selection = sel
        art.uncertainty = sel["chosen"]
        if sel["scale"] != 1.0:  # fold the chosen shrinkage into the stored tables (serving reads them)
            if sel["chosen"] == "variance":
                art.var_scale = art.var_scale * sel["scale"]
            elif sel["chosen"] == "covariance":
                art.covariances = art.covariances * sel["scale"]
    if fit_lambdas:
        art.fitted = fit_lambda_tables(art, cal, strategies, budgets_per_pair, progress=progress)
    art.metrics["export_seconds"] = round(time.perf_counter() - t0, 2)
    return art


def default_artifact_path(datamodule) -> Path:
    """``artifacts/<dataset>.safetensors`` (``<dataset>-<encoder folder>`` with a non-default encoder)."""
    stem = Path(str(datamodule.dataset_name)).name
    if datamodule.encoder_path:
        stem += "-" + Path(str(datamodule.encoder_path)).name
    return Path("artifacts") / f"{stem}.safetensors"


def export_trained(
    module,
    datamodule,
    path: str | Path | None = None,
    budgets_per_pair: int = 3,
    fit_lambdas: bool = True,
    select: bool = True,
    checkpoint: str = "",
) -> Path:
    """Build the artifact of a trained module (:func:`build_artifact`), save it, print a summary.

    The one export step: :class:`ExportArtifact` (end of ``fit``) and :func:`export_checkpoint`
    (``cascade-routing export --ckpt``) both call it. ``path`` None: :func:`default_artifact_path`.
    """
    art = build_artifact(module, datamodule, budgets_per_pair=budgets_per_pair, fit_lambdas=fit_lambdas,
                         select_modes=SELECTION_MODES if select else None)
    art.metrics["best_checkpoint"] = checkpoint
    out = art.save(path or default_artifact_path(datamodule))
    print(f"estimator artifact written to {out}")
    for name, rep in art.calibration.items():
        print(f"  uncertainty {name}: NLL {rep['nll']:.3f}, 90% coverage {rep['coverage90']:.3f}")
    sel = art.uncertainty_selection
    if sel:
        scores = ", ".join(f"{k} {v:.2f}" for k, v in sel["scores"].items())
        print(f"  uncertainty by calibration 2-fold {sel['strategy']} AUC: {scores} -> "
              f"{candidate_name(sel['chosen'], sel.get('scale', 1.0))} ({sel['seconds']:.0f} s)")
    return out


def export_checkpoint(
    ckpt: str | Path,
    path: str | Path | None = None,
    budgets_per_pair: int = 3,
    fit_lambdas: bool = True,
    select: bool = True,
    cache_dir: str | None = None,
) -> Path:
    """Export a Lightning checkpoint (``best.ckpt``) to an artifact, without retraining.

    The module comes from ``QualityEstimatorModule.load_from_checkpoint`` and the data module from
    the checkpoint's datamodule hyperparameters (same dataset, splits and encoder; embeddings from
    the cache); then :func:`export_trained`.
    """
    from cascade_routing.estimators.datamodule import RoutingDataModule
    from cascade_routing.estimators.module import QualityEstimatorModule

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters")
    if not hparams:
        raise ValueError(f"{ckpt} carries no datamodule hyperparameters (trained before they were saved); retrain")
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # LightningCLI's _instantiator etc.
    if cache_dir is not None:
        hparams["cache_dir"] = cache_dir
    datamodule = RoutingDataModule(**hparams)
    datamodule.setup("fit")
    module = QualityEstimatorModule.load_from_checkpoint(ckpt, map_location="cpu")
    return export_trained(module, datamodule, path, budgets_per_pair, fit_lambdas, select, checkpoint=str(ckpt))


class ExportArtifact(L.Callback):
    """At the end of ``fit``: reload the best checkpoint's weights and export (:func:`export_trained`).

    Skipped under ``fast_dev_run`` (and after an interrupted fit), so a debug run never writes or
    overwrites an artifact. To export again without retraining: ``cascade-routing export --ckpt``.

    Args:
        path: output file (``.safetensors``); None: :func:`default_artifact_path`.
        budgets_per_pair: budgets between consecutive non-dominated models for the λ tables.
        fit_lambdas: fit the λ/γ tables (set false for quick experiments).
        select_uncertainty: choose the default uncertainty mode by calibration-split decision
            quality (:func:`select_uncertainty`); false: by val NLL.
    """

    def __init__(self, path: str | None = None, budgets_per_pair: int = 3, fit_lambdas: bool = True,
                 select_uncertainty: bool = True) -> None:
        self.path = path
        self.budgets_per_pair = budgets_per_pair
        self.fit_lambdas = fit_lambdas
        self.select_uncertainty = select_uncertainty
        self.artifact_path: Path | None = None
        self.skipped: str | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.fast_dev_run or trainer.interrupted:
            self.skipped = "fast_dev_run" if trainer.fast_dev_run else "interrupted"
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
