"""Learned cascade routing against the strategies it contains, budget by budget, on real data.

For each trained estimator artifact (``--artifact NAME=PATH``, from ``cascade-routing train-eval``)
it runs the evaluation protocol (:func:`cascade_routing.training.heldout.evaluate`: λ fitted per
budget on the calibration split, realised quality and cost on the test split) and reports:

- AUC per strategy, learned and paper-style baseline estimator;
- learned cascade routing's AUC minus learned routing's, minus the paper-style baseline
  estimator's cascade routing, and minus that of the best other strategy in the table (any
  estimator, linear interpolation included), each with a 95% paired bootstrap CI over test queries
  (:func:`cascade_routing.evaluation.metrics.paired_auc_interval`): whether a miss is larger than
  the test split's noise;
- per budget: mean test quality of learned cascade routing minus learned routing, paired over the
  test queries, with a 95% bootstrap CI (:func:`cascade_routing.evaluation.compare.compare_per_budget`);
- budget adherence per strategy: realised mean test cost / budget (mean over the sweep with a 95%
  bootstrap CI over test queries, and worst);
- at the largest budget: cascade routing's quality vs the best single model's test quality, and the
  paired difference (95% CI) against the model that is best on the *calibration* split (the single
  model a user would have picked without looking at the test queries);
- how often each guard fired (routing; the best single model the budget affords, run alone; the
  optimal cascade over the pool; where the latter two fired, their calibration quality and that of
  the cascade routing fit they replaced) and
  which λ shapes cascade routing and the threshold cascade kept, over the sweep's budgets, and on
  the calibration split (where λ is fitted) how far the fitted cascade routing falls below the
  routing it contains at its worst budget (the guard candidate: the same policy limited to depth 1,
  fitted to the same budget on the same rows), and at how many budgets it is below by ≥ 0.005 points.

Run (2 CPU cores):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_learned_cr.py \\
        --artifact routerbench-subset=artifacts/routerbench.safetensors --out benchmarks/results/learned_cr

Writes ``<out>/<name>/`` (the evaluation's files plus ``per_budget.csv``) and ``<out>/summary.json``,
``<out>/summary.md`` (datasets already in ``<out>/summary.json`` and not rerun are kept).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from artifact_specs import add_artifact_option, artifact_specs, with_earlier_results  # noqa: E402

ADHERENCE_ORDER = ("routing", "threshold_cascade", "optimal_cascade", "cascade_routing")



def sweeps_by_strategy(result, estimator: str = "learned") -> dict:
    return {r.strategy: r for r in result.curves[f"{estimator} estimator"]}


def answer_signal(metrics: dict) -> dict:
    """Mean over models of the learned estimator's test AUROC before any model ran and after only
    the model's own answer: the information a cascade can act on after its first model."""
    ex, own = metrics.get("exante_auroc"), metrics.get("own_answer_auroc")
    if ex is None or own is None:
        return {}
    return {"exante_auroc": round(ex, 3), "own_answer_auroc": round(own, 3), "gain": round(own - ex, 3)}


def paired_auc_gap(result, a, b) -> tuple[float, float, float]:
    """AUC(a) − AUC(b) of two sweeps of ``result`` with its paired bootstrap 95% CI (the test split's
    reference points, the protocol's resamples and seed)."""
    from cascade_routing.evaluation.metrics import paired_auc_interval
    from cascade_routing.evaluation.sweep import reference_points

    ref = reference_points(result.extra["test_quality"], result.extra["test_cost"])
    diff, low, high = paired_auc_interval((a.per_query_cost, a.per_query_quality), (b.per_query_cost, b.per_query_quality),
                                          ref.c_min, ref.c_max, ref.q_lowest, result.config["num_resamples"],
                                          result.config["seed"])
    return round(diff, 3), round(low, 3), round(high, 3)


def best_other_gap(result) -> dict:
    """Learned cascade routing's AUC minus the best other strategy's (every estimator's curves, linear
    interpolation included), with :func:`paired_auc_gap`'s CI."""
    named = {}
    for estimator, curves in result.curves.items():
        for r in curves:
            key = r.strategy if r.strategy == "linear_interpolation" else f"{estimator.split()[0]}/{r.strategy}"
            named[key] = r
    cr = named.pop("learned/cascade_routing")
    best_name = max(named, key=lambda k: named[k].auc)
    diff, low, high = paired_auc_gap(result, cr, named[best_name])
    return {"strategy": best_name, "auc": round(named[best_name].auc, 3), "cr_minus_best": diff, "ci95": [low, high]}


def report_one(name: str, path: str, out: Path, budgets_per_pair: int | None, resamples: int | None) -> dict:
    from cascade_routing.training.heldout import evaluate
    from cascade_routing.evaluation.compare import adherence_interval, budget_adherence, compare_per_budget, paired_interval

    kwargs = {}
    if budgets_per_pair is not None:
        kwargs["budgets_per_pair"] = budgets_per_pair
    if resamples is not None:
        kwargs["num_resamples"] = resamples
    result = evaluate(path, out_dir=str(out / name), log_wandb=False, **kwargs)
    learned = sweeps_by_strategy(result)
    cr, rt = learned["cascade_routing"], learned["routing"]
    cmp = compare_per_budget(cr, rt)
    with open(out / name / "per_budget.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["budget", "strategy", "realised_cost", "quality", "cost_over_budget"])
        for strategy, res in learned.items():
            if strategy == "linear_interpolation":
                continue
            for b, c, q in zip(res.budgets, res.costs, res.qualities):
                w.writerow([f"{b:.6g}", strategy, f"{c:.6g}", f"{q:.4f}", f"{c / b:.4f}"])
        w.writerow([])
        w.writerow(["budget", "cr_minus_routing", "ci_low", "ci_high"])
        for b, d, lo, hi in zip(cmp.budgets, cmp.diff, cmp.ci_low, cmp.ci_high):
            w.writerow([f"{b:.6g}", f"{d:.4f}", f"{lo:.4f}", f"{hi:.4f}"])
    best_single = float(result.extra["best_single_quality"])
    adherence = {}
    for s, r in learned.items():
        if s != "linear_interpolation":
            mean, low, high = adherence_interval(r)
            adherence[s] = {"mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)],
                            "max": round(float(budget_adherence(r).max()), 4)}
    models, test_q = result.extra["models"], result.extra["test_quality"]
    cal_best = int(result.extra["calibration_mean_quality"].argmax())
    gap = paired_interval(cr.per_query_quality[-1], test_q[:, cal_best])
    guard = sum(1 for f in cr.fitted if f.max_depth == 1 and f.models is None)
    cascades = sum(1 for f in cr.fitted if f.cascade)
    singles = [models[f.models[0]] for f in cr.fitted if f.models is not None]
    cal_gap = calibration_gap_to_routing(cr.fitted)
    worst = cmp.worst_index
    summary = {
        "auc": {f"{r['estimator']}/{r['strategy']}": r["auc"] for r in result.rows},
        "cr_minus_routing_auc": round(cr.auc - rt.auc, 3),
        "cr_minus_routing_auc_ci95": list(paired_auc_gap(result, cr, rt)[1:]),
        "best_other_strategy": best_other_gap(result),
        "cr_minus_baseline_cr_auc": dict(zip(("diff", "low", "high"), paired_auc_gap(
            result, cr, sweeps_by_strategy(result, "baseline")["cascade_routing"]))),
        "per_budget_cr_minus_routing": {"min": round(float(cmp.diff[worst]), 4), "at_budget": cmp.worst[0],
                                         "min_ci95": [round(float(cmp.ci_low[worst]), 4), round(float(cmp.ci_high[worst]), 4)],
                                         "max": round(float(cmp.diff.max()), 4)},
        "answer_signal": answer_signal(result.estimator_metrics["learned"]),
        "largest_budget": {"budget": float(cr.budgets[-1]), "cascade_routing": round(float(cr.qualities[-1]), 4),
                           "routing": round(float(rt.qualities[-1]), 4), "best_single_model": best_single,
                           "calibration_best_model": models[cal_best],
                           "cr_minus_calibration_best_model": round(gap[0], 4),
                           "cr_minus_calibration_best_model_ci95": [round(gap[1], 4), round(gap[2], 4)]},
        "budget_adherence": adherence,
        "routing_guard_fired": f"{guard} of {len(cr.fitted)} budgets",
        "single_model_guard_fired": f"{len(singles)} of {len(cr.fitted)} budgets"
                                    + (f" ({', '.join(sorted(set(singles)))})" if singles else ""),
        "cascade_guard_fired": f"{cascades} of {len(cr.fitted)} budgets",
        "cascade_guard": [{"budget": float(b), "calibration_quality": round(float(f.calibration_quality), 4),
                           "cascade_routing_calibration_quality": round(float(f.info["shape_scores"][0]), 4)}
                          for b, f in zip(cr.budgets, cr.fitted) if f.cascade],
        "single_model_guard": [{"budget": float(b), "model": models[f.models[0]],
                                "calibration_quality": round(float(f.calibration_quality), 4),
                                "cascade_routing_calibration_quality": round(float(f.info["shape_scores"][0]), 4)}
                               for b, f in zip(cr.budgets, cr.fitted) if f.models is not None],
        "calibration_cr_minus_routing": cal_gap,
        "lambda_shapes_kept": shapes_kept(cr.fitted),
        "threshold_cascade_shapes_kept": shapes_kept(learned["threshold_cascade"].fitted),
        "budgets": len(cr.budgets),
        "test_queries": int(cr.per_query_quality.shape[1]),
    }
    return summary


def shapes_kept(fitted: list) -> dict[str, int]:
    """{λ shape: number of budgets it was fitted with} (``[1.0]``: the constant λ); budgets where the
    single-model or the cascade guard fired are left out (their fit is another policy's)."""
    shapes = [tuple(f.info.get("shape", [1.0])) for f in fitted if f.models is None and not f.cascade]
    return {str(list(s)): shapes.count(s) for s in sorted(set(shapes))}


def calibration_gap_to_routing(fitted: list) -> dict | None:
    """{"min": worst calibration quality of the fitted CR minus its routing-guard candidate (the
    routing it contains, fitted to the same budget on the same rows; ``info["routing_score"]``),
    "budgets_below": how many budgets are below it by ≥ 0.005 points}, or None without a guard."""
    gaps = [round(float(f.calibration_quality), 6) - f.info["routing_score"] for f in fitted if "routing_score" in f.info]
    if not gaps:
        return None
    return {"min": round(min(gaps), 5), "budgets_below": sum(g <= -5e-5 for g in gaps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_artifact_option(parser)
    parser.add_argument("--out", default="benchmarks/results/learned_cr")
    parser.add_argument("--budgets-per-pair", type=int, default=None, help="default: the evaluation protocol's")
    parser.add_argument("--resamples", type=int, default=None, help="default: the evaluation protocol's")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = with_earlier_results(out, {name: report_one(name, path, out, args.budgets_per_pair, args.resamples)
                                           for name, path in artifact_specs(parser, args.artifact)})
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    lines = ["| dataset | CR − best other strategy AUC [95% paired CI] (that strategy) | CR − routing AUC [95% paired CI] "
             "| CR − baseline estimator's CR AUC [95% paired CI] | worst per-budget CR − routing [95% CI] "
             "| CR / routing / best model at the largest budget | CR − calibration's best model there [95% CI] "
             "| guard fired: routing; single model; cascade | calibration: CR − its routing, worst budget (budgets below) | AUROC ex-ante → after own answer |",
             "|---|---|---:|---:|---:|---|---|---|---|---|"]
    for name, s in summaries.items():
        lb, pb, sig = s["largest_budget"], s["per_budget_cr_minus_routing"], s.get("answer_signal", {})
        ci = pb.get("min_ci95")
        bo = s.get("best_other_strategy")
        lines.append(f"| {name} | "
                     + (f"{bo['cr_minus_best']:+.2f} [{bo['ci95'][0]:+.2f}, {bo['ci95'][1]:+.2f}] ({bo['strategy']})" if bo else "–")
                     + f" | {s['cr_minus_routing_auc']:+.2f}"
                     + (f" [{s['cr_minus_routing_auc_ci95'][0]:+.2f}, {s['cr_minus_routing_auc_ci95'][1]:+.2f}]"
                        if "cr_minus_routing_auc_ci95" in s else "")
                     + (" | {diff:+.2f} [{low:+.2f}, {high:+.2f}]".format(**s["cr_minus_baseline_cr_auc"])
                        if "cr_minus_baseline_cr_auc" in s else " | –")
                     + f" | {pb['min']:+.4f}"
                     + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
                     + f" | {lb['cascade_routing']:.3f} / {lb['routing']:.3f} / {lb['best_single_model']:.3f} "
                     + (f"| {lb['cr_minus_calibration_best_model']:+.4f} [{lb['cr_minus_calibration_best_model_ci95'][0]:+.4f}, "
                        f"{lb['cr_minus_calibration_best_model_ci95'][1]:+.4f}] ({lb['calibration_best_model']}) "
                        if "calibration_best_model" in lb else "| – ")
                     + f"| {s['routing_guard_fired']}; {s.get('single_model_guard_fired', '–')}; "
                       f"{s.get('cascade_guard_fired', '–')} | "
                     + (f"{s['calibration_cr_minus_routing']['min']:+.4f} ({s['calibration_cr_minus_routing']['budgets_below']}) | "
                        if s.get("calibration_cr_minus_routing") else "– | ")
                     + (f"{sig['exante_auroc']:.3f} → {sig['own_answer_auroc']:.3f}" if sig else "–") + " |")
    lines += ["", "Budget adherence (realised mean test cost / budget, mean over the sweep [95% CI over test queries]):", "",
              "| dataset | " + " | ".join(ADHERENCE_ORDER) + " |", "|---|" + "---:|" * len(ADHERENCE_ORDER)]
    for name, s in summaries.items():
        cells = []
        for strategy in ADHERENCE_ORDER:
            a = s["budget_adherence"].get(strategy)
            cells.append("–" if a is None else f"{a['mean']:.3f}" + (f" [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]" if "ci95" in a else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "λ shapes kept per budget (shape: budgets; [1.0] is the constant λ):", "",
              "| dataset | cascade routing | threshold cascade |", "|---|---|---|"]
    for name, s in summaries.items():
        cells = [", ".join(f"{k}: {v}" for k, v in s.get(key, {}).items()) or "–"
                 for key in ("lambda_shapes_kept", "threshold_cascade_shapes_kept")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
