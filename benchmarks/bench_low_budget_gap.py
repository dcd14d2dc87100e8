"""Where learned cascade routing falls below the routing it contains at one budget: why, and two fixes measured.

For each trained artifact (``--artifact NAME=PATH``) the learned routing and cascade routing are
swept as in the evaluation protocol (λ fitted per budget on the calibration split, realised on the
test split, the protocol's budget grid) and the script reports:

1. **Second steps** at every budget: over the queries where cascade routing ran a second model,
   the gain it predicted when it chose to (``max(μ̂_a, μ̂_b) − μ̂_a`` under the estimate after the first
   model *a* ran, *b* the second model) against the realised gain (quality of the answer it
   returned minus the first model's quality), on the calibration and on the test split. A predicted gain above the realised one means escalations are overvalued and
   cascade routing, to meet the budget, pays for them with cheaper first choices than routing's.
2. **A guard without a noise margin**: the export keeps the routing fallback only when it beats the
   fitted cascade routing on the calibration split by more than its bootstrap noise. Here it fires
   wherever routing's calibration quality is above the fitted cascade routing's at all; reported:
   how often it fires, the test AUC and the worst per-budget test difference to routing.
3. **A per-model recalibration of the means**: for each model and each state (run / not run) a
   Platt map ``μ' = σ(a·logit(μ̂) + b)``, fitted by cross-entropy against realised quality over the
   fit rows' ran-sets (none, each single model, two random pairs per row). It is fitted on the
   calibration split and scored on test, and cross-fitted on ``--seeds`` random halvings of the
   calibration split (fitted with λ on one half, scored on the other; the rule the export uses to
   choose among estimator variants), for routing and cascade routing.

Run (2 CPU cores, about 2 minutes per artifact):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_low_budget_gap.py \\
        --artifact rational-llm-cascades=artifacts/rational.safetensors \\
        --artifact routerbench-subset=artifacts/routerbench.safetensors --out benchmarks/results/low_budget_gap

Writes ``<out>/summary.json`` and ``<out>/summary.md`` (datasets already there and not rerun are kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from artifact_specs import add_artifact_option, add_seeds_option, artifact_specs, calibration_folds, with_earlier_results  # noqa: E402

STRATEGIES = ("routing", "cascade_routing")


class RecalibratedMeans:
    """A bound quality estimator whose means pass through per-model Platt maps: ``ab`` [2, M, 2] holds
    (a, b) for models not run (index 0) and run (index 1); the uncertainty is passed through."""

    def __init__(self, base, ab: torch.Tensor) -> None:
        self.base, self.ab, self.models = base, ab, base.models

    def estimate(self, rows, ran):
        from cascade_routing.interfaces import QualityEstimate

        est = self.base.estimate(rows, ran)
        state = torch.as_tensor(ran, dtype=torch.bool).long().cpu()
        cols = torch.arange(state.shape[1])
        a, b = self.ab[state, cols, 0], self.ab[state, cols, 1]
        logit = torch.logit(est.mean.double().cpu().clamp(1e-4, 1 - 1e-4))
        mean = torch.sigmoid(a * logit + b).to(est.mean)
        return QualityEstimate(mean, std=est.std, cov=est.cov)


def fitting_ran_sets(n: int, m: int, seed: int) -> list[torch.Tensor]:
    """bool [n, m] masks: nothing run, each single model, and two masks of a random pair per row."""
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.zeros(n, m, dtype=torch.bool)]
    for j in range(m):
        single = torch.zeros(n, m, dtype=torch.bool)
        single[:, j] = True
        masks.append(single)
    for _ in range(2):
        pair = torch.zeros(n, m, dtype=torch.bool)
        for _ in range(2):
            pair[torch.arange(n), torch.randint(m, (n,), generator=gen)] = True
        masks.append(pair)
    return masks


def fit_platt_maps(estimator, rows: np.ndarray, quality: np.ndarray, seed: int = 0, ridge: float = 1e-3) -> torch.Tensor:
    """[2, M, 2] Platt maps (a, b) per state × model, by L-BFGS on the cross-entropy of σ(a·logit(μ̂) + b)
    against the realised quality over :func:`fitting_ran_sets` of ``rows``, with a ridge pulling
    (a, b) toward the identity (1, 0); a (state, model) cell with fewer than 50 points keeps it."""
    m = quality.shape[1]
    preds, targets, states = [], [], []
    for ran in fitting_ran_sets(len(rows), m, seed):
        preds.append(estimator.estimate(torch.as_tensor(rows), ran).mean.double())
        targets.append(torch.as_tensor(quality[rows], dtype=torch.float64))
        states.append(ran)
    pred, target, state = torch.cat(preds), torch.cat(targets), torch.cat(states)
    ab = torch.zeros(2, m, 2, dtype=torch.float64)
    ab[..., 0] = 1.0
    for s in (0, 1):
        for j in range(m):
            cell = state[:, j] == bool(s)
            if int(cell.sum()) < 50:
                continue
            x, y = torch.logit(pred[cell, j].clamp(1e-4, 1 - 1e-4)), target[cell, j]
            w = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS([w], max_iter=100)

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(w[0] * x + w[1], y) \
                    + ridge * ((w[0] - 1) ** 2 + w[1] ** 2)
                loss.backward()
                return loss

            opt.step(closure)
            ab[s, j] = w.detach()
    return ab


def sweeps(data, estimator, cost_est, fit_rows, score_rows, budgets) -> dict:
    """{strategy: budget_sweep result} for routing and cascade routing, λ fitted on ``fit_rows``."""
    from cascade_routing.evaluation.sweep import budget_sweep
    from cascade_routing.policies.registry import calibrated_policy

    out = {}
    for strategy in STRATEGIES:
        policy = calibrated_policy(strategy, data.quality[fit_rows], data.cost[fit_rows], seed=0)
        out[strategy] = budget_sweep(policy, estimator, cost_est, data.quality, data.cost, fit_rows, score_rows,
                                     budgets, texts=list(data.queries), strategy=strategy, num_resamples=1)
    return out


def second_steps(data, estimator, cost_est, policy, fitted, rows: np.ndarray, uniforms) -> dict | None:
    """Predicted vs realised gain of cascade routing's second models on ``rows`` (see module docstring)."""
    from cascade_routing.policies.rollout import simulate

    sim = simulate(policy, estimator, cost_est, data.quality[rows], data.cost[rows], fitted, uniforms[rows],
                   torch.as_tensor(rows), {})
    two = (sim.order[:, 1] >= 0).nonzero().flatten() if sim.order.shape[1] > 1 else torch.empty(0, dtype=torch.long)
    if two.numel() == 0:
        return None
    idx = torch.arange(two.numel())
    first, second = sim.order[two, 0], sim.order[two, 1]
    ran = torch.zeros(two.numel(), len(estimator.models), dtype=torch.bool)
    ran[idx, first] = True
    table_rows = torch.as_tensor(rows[two.numpy()])
    mean = estimator.estimate(table_rows, ran).mean.double()
    predicted = torch.clamp(mean[idx, second] - mean[idx, first], min=0.0)
    quality = torch.as_tensor(data.quality[rows[two.numpy()]], dtype=torch.float64)
    realised = sim.quality[two].double() - quality[idx, first]
    return {"queries": int(two.numel()), "of": int(len(rows)), "predicted_gain": round(float(predicted.mean()), 4),
            "realised_gain": round(float(realised.mean()), 4),
            "first_model_estimate": round(float(mean[idx, first].mean()), 4),
            "first_model_quality": round(float(quality[idx, first].mean()), 4)}


def guard_without_margin(result: dict, ref) -> dict:
    """Cascade routing with routing's test points wherever routing's calibration quality is above it."""
    from cascade_routing.evaluation.metrics import auc

    cr, rt = result["cascade_routing"], result["routing"]
    fires = np.array([f.max_depth != 1 and f.info.get("routing_score", -np.inf) > f.calibration_quality
                      for f in cr.fitted])
    pq, pc = cr.per_query_quality.copy(), cr.per_query_cost.copy()
    pq[fires], pc[fires] = rt.per_query_quality[fires], rt.per_query_cost[fires]
    return {"fires": f"{int(fires.sum())} of {fires.size} budgets",
            "auc": round(float(auc(pc.mean(1), pq.mean(1), ref.c_min, ref.c_max, ref.q_lowest)), 2),
            "worst_vs_routing": round(float((pq.mean(1) - rt.qualities).min()), 4)}


def report_one(path: str, seeds: int) -> dict:
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.evaluation.compare import compare_per_budget
    from cascade_routing.evaluation.sweep import reference_points
    from cascade_routing.policies.fitting import query_uniforms
    from cascade_routing.policies.registry import calibrated_policy
    from cascade_routing.training.heldout import _bound_estimators, _test_budgets, concat_splits, datamodule_for

    art = load_artifact(path)
    dm = datamodule_for(art)
    cal, test = dm.splits["calibration"], dm.splits["test"]
    table = concat_splits(cal, test)
    data = table.dataset
    n_cal = cal.quality.shape[0]
    fit_rows, test_rows = np.arange(n_cal), np.arange(n_cal, data.quality.shape[0])
    bound, cost_est, _ = _bound_estimators(art, dm, table, ("learned",), None, False)
    learned = bound["learned"]
    budgets, _ = _test_budgets(art, cal, data.quality[test_rows], data.cost[test_rows], 5)
    ref = reference_points(data.quality[test_rows], data.cost[test_rows])
    base = sweeps(data, learned, cost_est, fit_rows, test_rows, budgets)
    cmp = compare_per_budget(base["cascade_routing"], base["routing"])
    worst = int(np.argmin(cmp.diff))
    policy = calibrated_policy("cascade_routing", data.quality[fit_rows], data.cost[fit_rows], seed=0)
    uniforms = query_uniforms(list(data.queries))
    steps = []
    for i, fitted in enumerate(base["cascade_routing"].fitted):
        steps.append({"budget": float(budgets[i]), "cr_minus_routing_test": round(float(cmp.diff[i]), 4),
                      "calibration": second_steps(data, learned, cost_est, policy, fitted, fit_rows, uniforms),
                      "test": second_steps(data, learned, cost_est, policy, fitted, test_rows, uniforms)})
    recal = sweeps(data, RecalibratedMeans(learned, fit_platt_maps(learned, fit_rows, data.quality)), cost_est,
                   fit_rows, test_rows, budgets)
    recal_cmp = compare_per_budget(recal["cascade_routing"], recal["routing"])
    halves = []
    for fit, score, fold_budgets in calibration_folds(data, cost_est, seeds):
        plain = sweeps(data, learned, cost_est, fit, score, fold_budgets)
        mapped = sweeps(data, RecalibratedMeans(learned, fit_platt_maps(learned, fit, data.quality)), cost_est,
                        fit, score, fold_budgets)
        halves.append({s: round(float(mapped[s].auc - plain[s].auc), 2) for s in STRATEGIES})
    return {
        "test": {"routing_auc": round(float(base["routing"].auc), 2), "cascade_routing_auc": round(float(base["cascade_routing"].auc), 2),
                 "worst_budget": float(budgets[worst]), "worst_cr_minus_routing": round(float(cmp.diff[worst]), 4)},
        "second_steps": steps,
        "guard_without_margin": guard_without_margin(base, ref),
        "recalibrated_test": {"routing_auc": round(float(recal["routing"].auc), 2),
                              "cascade_routing_auc": round(float(recal["cascade_routing"].auc), 2),
                              "worst_cr_minus_routing": round(float(recal_cmp.diff.min()), 4)},
        "recalibrated_minus_plain_on_calibration_halves": halves,
    }


def summary_lines(results: dict) -> list[str]:
    lines = ["| dataset | test AUC routing / CR | worst budget: CR − routing | second steps there, calibration: predicted → realised gain (queries) | same, test | guard without margin: fires, CR AUC, worst CR − routing | recalibrated means, test: routing / CR AUC, worst CR − routing | recalibrated − plain AUC on calibration halves, routing; CR per fold |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        t, g, rc = r["test"], r["guard_without_margin"], r["recalibrated_test"]
        at = next(s for s in r["second_steps"] if s["budget"] == t["worst_budget"])
        cells = []
        for split in ("calibration", "test"):
            s = at[split]
            cells.append("–" if s is None else f"{s['predicted_gain']:+.3f} → {s['realised_gain']:+.3f} ({s['queries']} of {s['of']})")
        folds = ", ".join(f"{h['routing']:+.2f}; {h['cascade_routing']:+.2f}" for h in r["recalibrated_minus_plain_on_calibration_halves"])
        lines.append(f"| {name} | {t['routing_auc']:.2f} / {t['cascade_routing_auc']:.2f} | {t['worst_cr_minus_routing']:+.4f} at "
                     f"{t['worst_budget']:.3g} | {cells[0]} | {cells[1]} | {g['fires']}, {g['auc']:.2f}, {g['worst_vs_routing']:+.4f} | "
                     f"{rc['routing_auc']:.2f} / {rc['cascade_routing_auc']:.2f}, {rc['worst_cr_minus_routing']:+.4f} | {folds} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_artifact_option(parser)
    add_seeds_option(parser, default=2)
    parser.add_argument("--out", default="benchmarks/results/low_budget_gap")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = with_earlier_results(out, {name: report_one(path, args.seeds) for name, path in artifact_specs(parser, args.artifact)})
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    lines = summary_lines(results)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
