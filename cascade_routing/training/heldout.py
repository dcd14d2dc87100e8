"""Evaluate a trained estimator artifact: the paper's AUC per strategy, learned vs paper-style baseline.

Protocol: the artifact's own split of the dataset (same fractions and seed as training). For each
quality estimator (``learned``: the artifact; ``baseline``: :mod:`baseline` fitted on the train
split, residual covariances on the calibration split) and each strategy (routing, threshold
cascade, optimal cascade, cascade routing), the engine's ``budget_sweep``: budgets between the
test split's non-dominated models (plus the most expensive one's calibration cost when that is
higher, so the fitted budgets reach it), λ/γ refitted per budget on the calibration split, realised
quality and cost on the test split, AUC with a bootstrap 95% CI. Both estimators share the
artifact's cost estimator, so the comparison isolates quality estimation. The linear
interpolation between models is reported as a reference. Budgets per pair and bootstrap resamples
default to the shared protocol (:mod:`cascade_routing.evaluation.protocol`). Writes ``results.csv``
(AUC per estimator × strategy), ``points.csv`` (the per-budget points behind each curve: budget,
realised mean cost, mean quality with its bootstrap band), ``table.md``, ``curves.png``/``.svg``,
``estimator_metrics.json`` and ``evaluation.json`` (:func:`describe_evaluation`: dataset, split sizes,
settings, budgets, units, the single-model points behind each AUC, notes), prints the table and logs
all of it to wandb (offline unless ``WANDB_MODE=online``): the AUC table and the points as
``wandb.Table``s, the points as a native line plot, the artifact file as a wandb Artifact.
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cascade_routing.estimators.artifact import DEFAULT_ENCODER, EstimatorArtifact, load_artifact
from cascade_routing.estimators.learned import check_uncertainty_mode
from cascade_routing.training.datamodule import EncodedSplit, RoutingDataModule
from cascade_routing.evaluation import protocol
from cascade_routing.calibration.binding import bind_split, refresh_query_embeddings
from cascade_routing.calibration.lambda_tables import min_reachable_budget
from cascade_routing.policies.registry import STRATEGIES, calibrated_policy

ESTIMATORS = protocol.ESTIMATORS


@dataclass
class EvaluationResult:
    rows: list[dict]
    curves: dict[str, list]
    estimator_metrics: dict
    seconds: float
    out_dir: Path | None = None
    # best_single_quality: the best one-model test mean; test_quality [N_test, M] and calibration_mean_quality
    # [M] (one model alone per query, for paired comparisons against a single model)
    extra: dict = field(default_factory=dict)
    points: list[dict] = field(default_factory=list)  # per-budget points (evaluation.points.POINT_FIELDS)
    config: dict = field(default_factory=dict)  # what was evaluated and how (logged to wandb)


def datamodule_for(artifact: EstimatorArtifact, dataset: str | None = None, cache_dir: str | None = None) -> RoutingDataModule:
    """A data module reproducing the artifact's splits and encodings (embeddings from the cache)."""
    cfg = artifact.data_config
    enc = artifact.encoder.get("path", DEFAULT_ENCODER)
    dm = RoutingDataModule(
        dataset=dataset or cfg["dataset"],
        encoder_path=None if enc == DEFAULT_ENCODER else enc,
        split=cfg.get("split"),
        split_seed=int(cfg.get("split_seed", 0)),
        max_length=int(artifact.encoder["max_length"]),
        truncation=artifact.query_truncation,
        answer_max_length=int(artifact.encoder["answer_max_length"]),
        answer_encoding=artifact.encoder["answer_encoding"],
        answer_truncation=artifact.answer_truncation,
        cache_dir=cache_dir,
    )
    try:
        models = dm.models
    except (ValueError, FileNotFoundError) as err:
        if dataset is not None:
            raise
        raise ValueError(f"the artifact was trained on dataset {cfg['dataset']!r}, which cannot be loaded here "
                         f"({err}); give the dataset with --dataset (evaluate(dataset=...))") from err
    artifact.check_models(models, where=f"dataset {dm.dataset_name!r}")
    dm.setup("test")
    refresh_query_embeddings(artifact.network(), dm)
    return dm


def concat_splits(a: EncodedSplit, b: EncodedSplit) -> EncodedSplit:
    """Rows of ``a`` then rows of ``b`` (one table, so λ can be fitted on a and tested on b); both must
    number the models alike (ValueError otherwise), and the table keeps that order."""
    from cascade_routing.data.dataset import RoutingDataset

    da, db = a.dataset, b.dataset
    if list(da.models) != list(db.models):
        raise ValueError(f"cannot concatenate splits {da.name!r} and {db.name!r}: model order {da.models} "
                         f"differs from {db.models}")
    ds = RoutingDataset(
        queries=da.queries + db.queries,
        models=list(da.models),
        quality=np.concatenate([da.quality, db.quality]),
        cost=np.concatenate([da.cost, db.cost]),
        responses=None if da.responses is None else np.concatenate([da.responses, db.responses]),
        features={k: np.concatenate([da.features[k], db.features[k]]) for k in da.features},
        tasks=None if da.tasks is None else da.tasks + db.tasks,
        query_ids=list(da.query_ids) + list(db.query_ids),
        name=f"{da.name}+{db.name}",
        sort_models=False,
    )
    cat = lambda x, y: torch.cat([x, y])  # noqa: E731
    return EncodedSplit(ds, cat(a.query_emb, b.query_emb), cat(a.answer_emb, b.answer_emb), cat(a.task, b.task),
                        cat(a.static, b.static), cat(a.pair_sim, b.pair_sim), cat(a.quality, b.quality),
                        cat(a.eval_ran, b.eval_ran))


def estimator_metrics(artifact: EstimatorArtifact, split: EncodedSplit, baseline=None) -> dict:
    """:func:`estimate_aurocs` of the learned estimator (and of ``baseline``, if given) on the split,
    after its evaluation ran-sets ``split.eval_ran``."""
    ds = split.dataset
    estimators = {"learned": bind_split(artifact, split)[0]}
    if baseline is not None:
        estimators["baseline"] = baseline.bind(ds.queries, ds.responses, ds.features, ds.tasks)
    return {name: estimate_aurocs(qe, ds.quality, split.eval_ran, ds.models) for name, qe in estimators.items()}


AUROC_LABEL_THRESHOLD = 0.5  # graded quality q counts as a positive label when q >= this (0/1 quality: q itself)


def estimate_aurocs(estimator, quality: np.ndarray, eval_ran: torch.Tensor, models: list[str]) -> dict:
    """Per-model AUROC of three estimates of model m's quality [N, M] (labels: quality ≥
    :data:`AUROC_LABEL_THRESHOLD`, i.e. the quality itself for 0/1 quality; graded quality in [0, 1]
    adds ``"auroc_labels"`` saying so), and their means over the models where they are defined, i.e.
    where the labels take both values (``per_model`` keyed by ``models``):

    - ``exante_auroc``: before any model ran;
    - ``own_answer_auroc``: after only m ran (what a cascade learns from m's own answer; its gain
      over ``exante_auroc`` bounds what running m first and deciding on can add over routing);
    - ``posthoc_auroc``: after the ran-sets ``eval_ran`` [N, M], over the cells where m ran.
    """
    from torchmetrics.functional.classification import binary_auroc

    from cascade_routing.evaluation.revealed import own_answer_aurocs

    n, m = quality.shape
    quality = np.asarray(quality, dtype=np.float64)
    # a cast to long would truncate graded quality (0.9 -> 0): every label 0, every AUROC 0 or undefined
    y = torch.from_numpy(quality >= AUROC_LABEL_THRESHOLD).long()
    rows = torch.arange(n)
    ex = estimator.estimate(rows, torch.zeros(n, m, dtype=torch.bool)).mean
    post = estimator.estimate(rows, eval_ran).mean
    own = own_answer_aurocs(estimator, y)
    per = {}
    for j, model in enumerate(models):
        yj = y[:, j]
        entry = {}
        if 0 < int(yj.sum()) < n:
            entry["exante_auroc"] = float(binary_auroc(ex[:, j], yj))
            if own[j] is not None:
                entry["own_answer_auroc"] = own[j]
        sel = eval_ran[:, j]
        ys = yj[sel]
        if sel.any() and 0 < int(ys.sum()) < ys.numel():
            entry["posthoc_auroc"] = float(binary_auroc(post[sel, j], ys))
        per[model] = entry
    means = {
        k: float(np.mean([e[k] for e in per.values() if k in e]))
        for k in ("exante_auroc", "own_answer_auroc", "posthoc_auroc")
        if any(k in e for e in per.values())
    }
    graded = {} if np.isin(quality, (0.0, 1.0)).all() else {"auroc_labels": f"quality >= {AUROC_LABEL_THRESHOLD}"}
    return {"per_model": per, **means, **graded}


def _bound_estimators(art: EstimatorArtifact, dm: RoutingDataModule, table: EncodedSplit, estimators: tuple[str, ...],
                      uncertainty: str | None, progress: bool):
    """({estimator name: quality estimator bound to ``table``}, the artifact's cost estimator, the
    baseline model or None): the learned estimator, and the paper-style baseline fitted on the train
    split with its covariances on the calibration split when ``"baseline"`` is asked for."""
    from cascade_routing.estimators.baseline import BaselineModel

    data = table.dataset
    learned_q, cost_est = bind_split(art, table, uncertainty=uncertainty)
    bound = {"learned": learned_q}
    baseline = None
    if "baseline" in estimators:
        baseline = BaselineModel.fit(dm.splits["train"].dataset, progress=progress)
        baseline.fit_covariances(dm.splits["calibration"].dataset)
        bound["baseline"] = baseline.bind(data.queries, data.responses, data.features, data.tasks)
    return bound, cost_est, baseline


def _test_budgets(art: EstimatorArtifact, cal: EncodedSplit, test_q: np.ndarray, test_c: np.ndarray,
                  budgets_per_pair: int) -> tuple[np.ndarray, int]:
    """(the protocol's budgets on the test split, how many were raised): a budget the cost estimates
    cannot reach on the fit rows is raised to that floor; the grid itself is
    :func:`~cascade_routing.evaluation.metrics.protocol_budgets`."""
    from cascade_routing.evaluation.metrics import protocol_budgets

    budgets = protocol_budgets(test_c.mean(0), test_q.mean(0), np.asarray(cal.dataset.cost).mean(0), budgets_per_pair)
    fit_ce = bind_split(art, cal)[1]
    floor = min_reachable_budget(fit_ce, cal.dataset.cost) * (1 + 1e-6)
    # budgets raised to the same floor are one budget (one point per budget in points.csv, not copies)
    return np.unique(np.maximum(budgets, floor)), int((budgets < floor).sum())


def _sweeps(data, bound: dict, cost_est, fit_rows: np.ndarray, test_rows: np.ndarray, budgets: np.ndarray,
            estimators: tuple[str, ...], strategies: tuple[str, ...], num_resamples: int, seed: int, progress: bool
            ) -> tuple[list[dict], dict[str, list], list]:
    """(table rows, curves per estimator, curve points): the linear interpolation, then for every
    estimator × strategy λ fitted per budget on ``fit_rows`` and simulated on ``test_rows``."""
    from cascade_routing.evaluation.points import curve_points
    from cascade_routing.evaluation.sweep import budget_sweep, linear_interpolation_sweep

    test_q, test_c = data.quality[test_rows], data.cost[test_rows]
    jobs = [(e, s) for e in estimators for s in strategies]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="evaluate (budget sweeps)", unit="sweep")
    rows: list[dict] = []
    curves: dict[str, list] = {}
    lin = linear_interpolation_sweep(test_q, test_c, budgets, num_resamples, seed)
    points = curve_points(lin, "-", num_resamples, seed)
    rows.append({"estimator": "-", "strategy": "linear_interpolation", "auc": round(lin.auc, 3),
                 "ci_low": round(lin.ci[0], 3), "ci_high": round(lin.ci[1], 3), "seconds": 0.0})
    for est, strategy in jobs:
        t1 = time.perf_counter()
        policy = calibrated_policy(strategy, data.quality[fit_rows], data.cost[fit_rows], seed=seed)
        res = budget_sweep(policy, bound[est], cost_est, data.quality, data.cost,
                           fit_rows, test_rows, budgets, texts=data.queries, strategy=strategy,
                           num_resamples=num_resamples, seed=seed)
        curves.setdefault(f"{est} estimator", [lin]).append(res)
        points += curve_points(res, est, num_resamples, seed)
        rows.append({"estimator": est, "strategy": strategy, "auc": round(res.auc, 3), "ci_low": round(res.ci[0], 3),
                     "ci_high": round(res.ci[1], 3), "seconds": round(time.perf_counter() - t1, 2)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows, curves, points


def evaluate(
    checkpoint: str,
    dataset: str | None = None,
    out_dir: str | None = "eval",
    strategies: tuple[str, ...] = STRATEGIES,
    budgets_per_pair: int = protocol.BUDGETS_PER_PAIR,
    num_resamples: int = protocol.NUM_RESAMPLES,
    estimators: tuple[str, ...] = ESTIMATORS,
    cache_dir: str | None = None,
    progress: bool = True,
    log_wandb: bool = True,
    seed: int = protocol.SEED,
    uncertainty: str | None = None,
) -> EvaluationResult:
    """See the module docstring. Returns the table rows (one per estimator × strategy).

    ``uncertainty`` overrides the artifact's uncertainty method (variance, covariance, none).
    ``out_dir=None`` writes nothing: no output files and no wandb run, whatever ``log_wandb`` says
    (the offline run lives under ``out_dir``). Bad settings (``budgets_per_pair`` or ``num_resamples`` below 1, an unknown strategy, estimator
    or uncertainty name) are a ValueError before anything loads (:func:`~cascade_routing.evaluation.
    protocol.check_settings`, :func:`~cascade_routing.evaluation.protocol.check_names`); the CLI
    passes its flags here unchecked beyond their type, so both refuse a bad value alike.
    """
    protocol.check_settings(budgets_per_pair, num_resamples)
    protocol.check_names(strategies, STRATEGIES, "strategies")
    protocol.check_names(estimators, ESTIMATORS, "estimators")
    if uncertainty is not None:  # None: the artifact's own
        check_uncertainty_mode(uncertainty)
    if out_dir is not None:
        from cascade_routing.training.export import check_output_folder

        check_output_folder(out_dir, "evaluation output folder")
    t0 = time.perf_counter()
    art = load_artifact(checkpoint)
    dm = datamodule_for(art, dataset, cache_dir)
    cal, test = dm.splits["calibration"], dm.splits["test"]
    table = concat_splits(cal, test)
    n_cal = cal.quality.shape[0]
    fit_rows = np.arange(n_cal)
    test_rows = np.arange(n_cal, table.quality.shape[0])
    data = table.dataset
    bound, cost_est, baseline = _bound_estimators(art, dm, table, estimators, uncertainty, progress)
    test_q, test_c = data.quality[test_rows], data.cost[test_rows]
    budgets, raised = _test_budgets(art, cal, test_q, test_c, budgets_per_pair)
    rows, curves, points = _sweeps(data, bound, cost_est, fit_rows, test_rows, budgets, estimators, strategies,
                                   num_resamples, seed, progress)
    metrics = estimator_metrics(art, test, baseline)
    metrics["uncertainty_calibration_val"] = art.calibration
    metrics["budgets_raised_to_reachable_floor"] = raised
    config = {"checkpoint": str(checkpoint), "dataset": dm.dataset_name, "strategies": list(strategies),
              "estimators": list(estimators), "budgets_per_pair": budgets_per_pair, "num_resamples": num_resamples,
              "seed": seed, "uncertainty": uncertainty or art.uncertainty, "data_config": art.data_config,
              "train_config": art.train_config, "network_config": art.network_config}
    description = describe_evaluation(config, list(art.models), test_q, test_c, n_cal, budgets)
    result = EvaluationResult(rows, curves, metrics, time.perf_counter() - t0, points=points, config=config,
                              extra={"best_single_quality": float(test_q.mean(0).max()),
                                     "test_quality": np.asarray(test_q, dtype=np.float64),
                                     "test_cost": np.asarray(test_c, dtype=np.float64),
                                     "calibration_mean_quality": np.asarray(cal.quality, dtype=np.float64).mean(0),
                                     "models": list(art.models), "description": description})
    print_table(rows, metrics, dm.dataset_name, caption=description["caption"], notes=description["notes"])
    if out_dir is not None:
        result.out_dir = write_outputs(result, Path(out_dir))
        if log_wandb:
            log_to_wandb(result, dm.dataset_name, artifact_path=checkpoint)
    return result


def describe_evaluation(config: dict, models: list[str], test_q: np.ndarray, test_c: np.ndarray, n_cal: int,
                        budgets: np.ndarray) -> dict:
    """What an evaluation folder's numbers are (written as ``evaluation.json``): the dataset, split sizes,
    protocol settings and budgets, the units of ``results.csv`` / ``points.csv``, the test split's
    single-model points with the AUC's reference ``c_min``, ``c_max``, ``q_lowest``
    (:func:`~cascade_routing.evaluation.metrics.auc`; with them each AUC is recomputable from
    ``points.csv``), a one-line ``caption`` (printed and in ``table.md``) and ``notes`` on degenerate data."""
    from cascade_routing.evaluation.metrics import nondominated_models

    mc = np.asarray(test_c, dtype=np.float64).mean(0)
    mq = np.asarray(test_q, dtype=np.float64).mean(0)
    nd = [int(i) for i in nondominated_models(mc, mq)]
    n_test, r = int(np.asarray(test_q).shape[0]), config["num_resamples"]
    notes = []
    if len(nd) == 1:
        notes.append(f"{models[nd[0]]} is the cheapest model on the test split and also the best on average "
                     f"(mean quality {mq[nd[0]]:.4f}), so the budget grid is its cost alone, every strategy's "
                     "curve is that model's point and every AUC is its mean quality ×100: a result, not an error")
    caption = (f"AUC ×100 on the test split of {config['dataset']} ({n_test} queries; λ fitted per budget on the "
               f"calibration split, {n_cal} queries); 95% CI: percentile bootstrap over {r} resamples of the "
               "test queries")
    return {
        "dataset": config["dataset"], "checkpoint": config["checkpoint"], "split": "test", "test_queries": n_test,
        "lambda_fitted_on": "calibration", "calibration_queries": int(n_cal),
        **{k: config[k] for k in ("estimators", "strategies", "budgets_per_pair", "num_resamples", "seed",
                                  "uncertainty")},
        "budgets": [float(b) for b in budgets],
        "units": {
            "budget": "USD per query: the mean cost per query that λ (and γ) are fitted to on the calibration split",
            "mean_cost": "USD per query: realised mean cost on the test split",
            "mean_quality": "realised mean quality on the test split, on the dataset's quality scale",
            "quality_ci_low/high": "percentile bootstrap 95% band of mean_quality (test queries resampled)",
            "auc": "area under the (mean_cost, mean_quality) curve on [c_min, c_max] over (c_max - c_min), ×100 "
                   "(cascade_routing.evaluation.metrics.auc)",
            "ci_low/high": "percentile bootstrap 95% CI of the AUC (test queries resampled)",
            "seconds": "wall-clock seconds of the sweep",
        },
        "auc_reference": {"c_min": float(mc.min()), "c_max": float(mc.max()), "q_lowest": float(mq.min())},
        "models": [{"model": m, "test_mean_cost": float(mc[j]), "test_mean_quality": float(mq[j]),
                    "nondominated": j in nd} for j, m in enumerate(models)],
        "caption": caption,
        "notes": notes,
    }


def format_markdown(rows: list[dict], caption: str | None = None) -> str:
    lines = ([caption, ""] if caption else []) + ["| estimator | strategy | AUC | 95% CI |", "|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['strategy']} | {r['auc']:.2f} | [{r['ci_low']:.2f}, {r['ci_high']:.2f}] |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], metrics: dict, dataset: str, caption: str | None = None,
                notes: list[str] | tuple = ()) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=caption or f"AUC on the test split of {dataset} (λ fitted on the calibration split)")
    for col in ("estimator", "strategy", "AUC", "95% CI"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["estimator"], r["strategy"], f"{r['auc']:.2f}", f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]")
    console = Console()
    console.print(table)
    for est in ESTIMATORS:
        if est in metrics:
            console.print(auroc_line(est, metrics[est]))
    for note in notes:
        console.print(f"note: {note}", markup=False)


def auroc_line(estimator: str, metrics: dict) -> str:
    """One line with :func:`estimate_aurocs`'s three means; a mean over fewer than all models says
    how many, and a mean defined for no model (e.g. every model's test outcome constant) says
    ``undefined`` rather than printing NaN."""
    per = metrics.get("per_model", {})
    defined = sum("exante_auroc" in e for e in per.values())
    if not defined:
        return f"{estimator}: AUROCs undefined: no model's outcome varies on the test split"
    over = "models" if defined == len(per) else f"the {defined} of {len(per)} models whose test outcome varies"

    def value(key: str) -> str:
        return f"{metrics[key]:.3f}" if key in metrics else "undefined"

    labels = f" (labels: {metrics['auroc_labels']})" if "auroc_labels" in metrics else ""
    return (f"{estimator}: ex-ante AUROC (mean over {over}) {value('exante_auroc')}, after its own answer only "
            f"{value('own_answer_auroc')}, post-hoc AUROC of run models {value('posthoc_auroc')}{labels}")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(result: EvaluationResult, out: Path) -> Path:
    from cascade_routing.evaluation.plots import plot_curves

    out.mkdir(parents=True, exist_ok=True)
    description = result.extra.get("description")
    _write_csv(out / "results.csv", result.rows)
    if result.points:
        _write_csv(out / "points.csv", result.points)
    (out / "table.md").write_text(format_markdown(result.rows, description and description["caption"]))
    (out / "estimator_metrics.json").write_text(json.dumps(result.estimator_metrics, indent=2))
    if description is not None:
        (out / "evaluation.json").write_text(json.dumps(description, indent=2, ensure_ascii=False))
    # the bands drawn are points.csv's: the same resamples and seed
    plot_curves(result.curves, out / "curves.png", ncols=2, num_resamples=result.config.get("num_resamples", 200),
                seed=result.config.get("seed", 0),
                title=description and (f"test split of {description['dataset']} ({description['test_queries']} "
                                       "queries; λ fitted on the calibration split)"))
    print(f"wrote {out / 'results.csv'}, {out / 'points.csv'}, {out / 'table.md'}, {out / 'curves.png'} (+ .svg)"
          + (f", {out / 'evaluation.json'}" if description is not None else ""))
    return out


def log_to_wandb(result: EvaluationResult, dataset: str, artifact_path: str | None = None) -> None:
    """Log the evaluation to wandb (offline by default), into the active run if there is one.

    ``train-eval`` leaves its training run open, so one experiment is one run: training metrics and
    the full training config, then here the AUC table and the per-budget points (``wandb.Table``),
    a native line plot of the points (one series per estimator/strategy), the estimator metrics and
    the artifact file (``wandb.Artifact``, type ``model``). Standalone ``evaluate`` opens its own run
    whose config is :attr:`EvaluationResult.config`.
    """
    import os

    import wandb

    from cascade_routing.training.loggers import wandb_errors_as_value_errors, wandb_mode

    os.environ.setdefault("WANDB_SILENT", "true")
    own = wandb.run is None
    if own:
        with wandb_errors_as_value_errors():
            run = wandb.init(project="cascade-routing", job_type="evaluate", name=f"evaluate-{dataset}",
                             mode=wandb_mode(), dir=str(result.out_dir), config=result.config)
    else:
        run = wandb.run
        run.config.update({"evaluation": result.config}, allow_val_change=True)
    try:
        cols = list(result.rows[0])
        auc_table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in result.rows])
        point_cols = ["series", *result.points[0]] if result.points else []
        points = wandb.Table(columns=point_cols, data=[[f"{p['estimator']}/{p['strategy']}", *p.values()]
                                                       for p in result.points])
        run.log({
            "evaluation/auc_table": auc_table,
            "evaluation/points": points,
            "evaluation/curves": wandb.plot.line(points, "mean_cost", "mean_quality", stroke="series",
                                                 title=f"quality vs cost on the test split of {dataset}"),
            **{f"evaluation/auc/{r['estimator']}/{r['strategy']}": r["auc"] for r in result.rows},
            **{f"evaluation/{e}/{k}": v for e in ESTIMATORS if e in result.estimator_metrics
               for k, v in result.estimator_metrics[e].items() if isinstance(v, float)},
        })
        if artifact_path is not None and Path(artifact_path).is_file():
            model = wandb.Artifact("estimator-" + re.sub(r"[^A-Za-z0-9_.-]", "-", Path(str(dataset)).name), type="model",
                                   metadata={"uncertainty": result.config.get("uncertainty")})
            model.add_file(str(artifact_path))
            run.log_artifact(model)
    finally:
        run.finish()
