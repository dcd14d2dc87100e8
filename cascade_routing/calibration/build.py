"""Turn a trained quality network + its encoded data splits into an :class:`EstimatorArtifact`.

Steps (all on held-out splits, never on the training rows):

1. variance-head calibration ``c_m`` and residual covariances per ran-set on the calibration split
   (the paper's centered covariance and the uncentered second moment), for the ran-sets the stored
   policies can read -- every set with at most ``covariance_max_run`` models run (cascade routing's
   depth), the prefixes of the cost order and of the pool (the cascades' chains) -- and the sets the
   calibration report of step 2 draws; entries of other sets are never computed;
2. the methods compared on the val split (:func:`uncertainty.calibration_report`, NLL and 90%
   coverage, reported); the covariance table (centered or second moment) with the lower NLL is stored,
   restricted to the sets the policies can read (``EstimatorArtifact.covariance_coverage``);
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
   λ shapes and the guards: routing, the best single model the budget affords, the optimal cascade
   over the pool, :func:`~cascade_routing.policies.fitting.fit_lambda`).

:func:`export_trained` runs this and saves the artifact. It is plain torch (no Lightning): the
training stage calls it at the end of ``fit`` (:class:`~cascade_routing.training.export.ExportArtifact`)
and on a saved checkpoint (``cascade-routing export --ckpt``,
:func:`~cascade_routing.training.export.export_checkpoint`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cascade_routing.calibration.binding import refresh_query_embeddings
from cascade_routing.calibration.lambda_tables import fit_lambda_tables
from cascade_routing.calibration.selection import SELECTION_MODES, SELECTION_SCALES, candidate_name, select_uncertainty
from cascade_routing.calibration.uncertainty import (
    calibration_report,
    fit_variance_scale,
    report_ran_sets,
    residual_moments,
)
from cascade_routing.estimators.artifact import EstimatorArtifact, encoder_reference
from cascade_routing.estimators.cost import CostModel
from cascade_routing.estimators.learned import coverage_ids
from cascade_routing.estimators.masks import on_all_sets
from cascade_routing.policies.pool import nondominated_pool
from cascade_routing.policies.registry import CASCADE_ROUTING_MAX_DEPTH, POOLED_STRATEGIES, STRATEGIES

MAX_COVARIANCE_MODELS = 11  # 2^11 ran-sets × M² floats; above this only the variance head is stored


def _uncertainty_tables(network, cal, val, models: list[str], coverage: dict | None):
    """Steps 1–2: ``(var_scale, report, method with the lowest val NLL, covariance table kind or None,
    that table or None)``; covariance tables only for ``M <= MAX_COVARIANCE_MODELS``, computed for the
    sets of ``coverage`` (None: all) and of the report, stored with NaN outside ``coverage``."""
    var_scale = fit_variance_scale(network, cal)
    tables = {}
    if len(models) <= MAX_COVARIANCE_MODELS:
        kept = coverage_ids(coverage, models)
        sets = None if coverage is None else torch.unique(torch.cat([kept, report_ran_sets(val)]))
        # one network pass over every (row, ran-set) pair gives both tables
        tables["residual_covariance"], tables["residual_second_moment"] = residual_moments(network, cal, sets=sets)
    report = calibration_report(network, val, var_scale, tables)
    chosen_by_nll = min(report, key=lambda k: report[k]["nll"])
    best_table = min(tables, key=lambda k: report[k]["nll"]) if tables else None
    table = tables[best_table] if best_table else None
    if table is not None and coverage is not None:  # drop the sets only the report read
        table = on_all_sets(table[kept], kept, len(models))
    return var_scale, report, chosen_by_nll, best_table, table


def covariance_coverage(models: list[str], pool: list[str], max_run: int | None) -> dict | None:
    """The ran-sets a covariance table is kept for: every set with at most ``max_run`` models run (cascade
    routing's depth) plus the prefixes of the cost order and of ``pool`` (the cascades' chains, which may
    run more models); None (every set) when ``max_run`` is None or covers all."""
    if max_run is None or max_run >= len(models):
        return None
    return {"max_run": int(max_run), "chains": [list(models), list(pool)]}


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
    covariance_max_run: int | None = CASCADE_ROUTING_MAX_DEPTH,
) -> EstimatorArtifact:
    """See the module docstring. ``module.network`` must be trained (``module.hparams`` is recorded);
    ``datamodule`` set up (``splits``, ``models``, encoder settings). ``covariance_max_run``: the
    covariance table holds the sets with at most this many models run plus the chains' prefixes
    (:func:`covariance_coverage`; None: every ran-set).

    ``select_modes=None`` skips the decision-quality selection (step 4); the default is then the
    method with the lower val NLL, as before.
    """
    t0 = time.perf_counter()
    network = module.network.cpu().eval()
    refresh_query_embeddings(network, datamodule)
    cal, val = datamodule.splits["calibration"], datamodule.splits["val"]
    models = list(datamodule.models)
    frontier = [models[i] for i in nondominated_pool(cal.dataset.quality, cal.dataset.cost)]
    coverage = covariance_coverage(models, frontier, covariance_max_run)
    var_scale, report, chosen_by_nll, best_table, covs = _uncertainty_tables(network, cal, val, models, coverage)
    uncertainty_seconds = round(time.perf_counter() - t0, 2)
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
        covariance_coverage=coverage if covs is not None else None,
        calibration=report,
        data_config=datamodule.data_config(),
        train_config={k: v for k, v in module.hparams.items() if not str(k).startswith('_')},  # not LightningCLI's _instantiator
    )
    art.embed_tokenizer()  # a carried encoder's own tokenizer travels in the file too (no folder needed)
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
        t_fit = time.perf_counter()
        art.fitted = fit_lambda_tables(art, cal, strategies, budgets_per_pair, progress=progress)
        art.metrics["lambda_tables_seconds"] = round(time.perf_counter() - t_fit, 2)
    art.metrics["uncertainty_tables_seconds"] = uncertainty_seconds  # steps 1-2 (the residual pass)
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

    The one export step: the training stage's ``ExportArtifact`` callback (end of ``fit``) and
    ``export_checkpoint`` (``cascade-routing export --ckpt``) both call it. ``path`` None: :func:`default_artifact_path`.
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
