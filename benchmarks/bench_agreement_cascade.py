"""A hand-built agreement cascade against learned routing and cascade routing, on one artifact's test split.

On routerbench-subset most of what the post-hoc estimates know comes from agreement between several
answers (ARC and Winogrande answers are single letters), which costs two models before it can be
used. This benchmark measures what that information is worth to a policy written for it, without
the learned estimator:

- the top model t: the last model of the calibration split's non-dominated pool (its best model);
- per task, on the calibration split only: every pair (a, b) of other models is a candidate
  "run a and b; if their answers are the same (lower-cased, whitespace collapsed), return that
  answer (the quality of the pair's better model on agreement); otherwise run t". The candidate kept
  is the one whose mean (cost, quality) on the task's calibration rows lies farthest above the
  upper hull of the task's single models (the best mix of two single models at that cost). A task
  whose kept pair agrees on fewer than ``MIN_AGREEMENT`` of its calibration rows (code answers never
  match exactly) sends every query to t;
- ``--escalate`` fractions f: only disagreements whose query uniform (a hash of the text,
  :func:`~cascade_routing.policies.fitting.query_uniforms`) is below f run t; the others return b's
  answer. f traces the policy's cost-quality line.

Each variant is applied to the test split, and learned routing and cascade routing (the artifact's
policies with their pools; λ fitted on the calibration split with the library's fit, the guards
included) are fitted to the variant's mean calibration cost as the budget and scored on the same
test rows: the table gives each one's realised test cost and quality. Since the agreement cascade's
test cost is not fitted to anything, routing and cascade routing are also fitted to that realised
test cost (equal spend; nothing of the agreement cascade is chosen on the test split), and the
paired difference agreement cascade − that routing gets a 95% bootstrap CI over the test queries.

Run (2 CPU cores, about 1 min):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_agreement_cascade.py \\
        --artifact routerbench-subset=artifacts/routerbench.safetensors --out benchmarks/results/agreement_cascade

Writes ``<out>/summary.json`` and ``<out>/summary.md`` (artifacts already there and not rerun are kept).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from artifact_specs import add_artifact_option, artifact_specs, with_earlier_results, write_summary  # noqa: E402

MIN_AGREEMENT = 0.05
DEFAULT_ESCALATE = (0.0, 0.5, 1.0)
_SPACE = re.compile(r"\s+")


def normalised(answer: object) -> str | None:
    """An answer lower-cased with whitespace collapsed; None for a missing answer (never agrees)."""
    return None if answer is None else _SPACE.sub(" ", str(answer).strip().lower())


def agree(responses: np.ndarray, a: int, b: int) -> np.ndarray:
    """bool [N]: models a and b gave the same normalised answer (a missing answer agrees with nothing)."""
    out = []
    for row in responses:
        x, y = normalised(row[a]), normalised(row[b])
        out.append(x is not None and x == y)
    return np.asarray(out, dtype=bool)


def hull_quality(mean_cost: np.ndarray, mean_quality: np.ndarray, cost: float) -> float:
    """The best mean quality a mix of at most two single models reaches at mean cost ``cost``
    (the upper hull of the points (mean_cost_m, mean_quality_m)); −inf below the cheapest model."""
    best = -np.inf
    for c1, q1 in zip(mean_cost, mean_quality):
        if c1 <= cost:
            best = max(best, q1)
    for (c1, q1), (c2, q2) in itertools.combinations(sorted(zip(mean_cost, mean_quality)), 2):
        if c1 <= cost <= c2 and c2 > c1:
            best = max(best, q1 + (q2 - q1) * (cost - c1) / (c2 - c1))
    return float(best)


class TaskRule(NamedTuple):
    """Per task: run ``pair`` first and return ``stop``'s answer when they agree (None: run ``top`` only)."""

    pair: tuple[int, int] | None
    stop: int | None
    agreement: float


def choose_rules(quality: np.ndarray, cost: np.ndarray, responses: np.ndarray, tasks: list[str], top: int
                 ) -> dict[str, TaskRule]:
    """The kept candidate of every task, chosen on these (calibration) rows: see the module docstring."""
    tasks_arr = np.asarray(tasks)
    rules = {}
    for task in sorted(set(tasks)):
        rows = tasks_arr == task
        q, c, r = quality[rows], cost[rows], responses[rows]
        best: tuple[float, TaskRule] | None = None
        for a, b in itertools.combinations([m for m in range(quality.shape[1]) if m != top], 2):
            same = agree(r, a, b)
            stop = a if same.any() and q[same, a].mean() >= q[same, b].mean() else b
            qual = np.where(same, q[:, stop], q[:, top]).mean()
            spend = (c[:, a] + c[:, b] + np.where(same, 0.0, c[:, top])).mean()
            gain = qual - hull_quality(c.mean(0), q.mean(0), spend)
            if best is None or gain > best[0]:
                best = (gain, TaskRule((a, b), stop, float(same.mean())))
        rule = best[1]
        rules[task] = rule if rule.agreement >= MIN_AGREEMENT else TaskRule(None, None, rule.agreement)
    return rules


def apply_rules(rules: dict[str, TaskRule], quality: np.ndarray, cost: np.ndarray, responses: np.ndarray,
                tasks: list[str], top: int, uniforms: np.ndarray, escalate: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-query (quality [N], cost [N]) of the agreement cascade; a disagreement runs ``top`` only where
    ``uniforms < escalate`` (else it returns the stop model's answer). A task without a rule raises."""
    out_q, out_c = np.empty(len(tasks)), np.empty(len(tasks))
    tasks_arr = np.asarray(tasks)
    for task in sorted(set(tasks)):
        if task not in rules:
            raise ValueError(f"task {task!r} has no rule (the calibration split has no query of it)")
        rows = np.nonzero(tasks_arr == task)[0]
        rule = rules[task]
        if rule.pair is None:
            out_q[rows], out_c[rows] = quality[rows, top], cost[rows, top]
            continue
        a, b = rule.pair
        same = agree(responses[rows], a, b)
        up = ~same & (uniforms[rows] < escalate)
        out_q[rows] = np.where(up, quality[rows, top], quality[rows, rule.stop])
        out_c[rows] = cost[rows, a] + cost[rows, b] + np.where(up, cost[rows, top], 0.0)
    return out_q, out_c


def report_one(path: str, escalate: tuple[float, ...]) -> dict:
    from cascade_routing.calibration.binding import bind_split
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.evaluation.compare import paired_interval
    from cascade_routing.evaluation.sweep import budget_sweep
    from cascade_routing.policies.fitting import query_uniforms
    from cascade_routing.policies.pool import nondominated_pool
    from cascade_routing.training.heldout import concat_splits, datamodule_for

    artifact = load_artifact(path)
    dm = datamodule_for(artifact)
    cal, test = dm.splits["calibration"], dm.splits["test"]
    dc, dt = cal.dataset, test.dataset
    if dc.responses is None or dc.tasks is None:
        raise SystemExit(f"{path}: the dataset has no responses or no tasks; the agreement cascade needs both")
    names = list(dc.models)
    top = nondominated_pool(dc.quality, dc.cost)[-1]
    rules = choose_rules(dc.quality, dc.cost, dc.responses, list(dc.tasks), top)
    joint = concat_splits(cal, test)
    estimator, cost_estimator = bind_split(artifact, joint, uncertainty=artifact.uncertainty)
    n_cal = dc.quality.shape[0]
    fit_rows, test_rows = np.arange(n_cal), n_cal + np.arange(dt.quality.shape[0])
    u_cal = query_uniforms(list(dc.queries)).numpy()
    u_test = query_uniforms(list(dt.queries)).numpy()
    out: dict = {"artifact": path, "top_model": names[top], "test_rows": int(test_rows.size),
                 "rules": {task: {"pair": None if r.pair is None else [names[j] for j in r.pair],
                                  "stop": None if r.stop is None else names[r.stop],
                                  "calibration_agreement": r.agreement} for task, r in rules.items()},
                 "variants": []}
    for f in escalate:
        _, cal_cost = apply_rules(rules, dc.quality, dc.cost, dc.responses, list(dc.tasks), top, u_cal, f)
        q_agree, c_agree = apply_rules(rules, dt.quality, dt.cost, dt.responses, list(dt.tasks), top, u_test, f)
        budget = float(cal_cost.mean())
        row = {"escalate": f, "budget": budget, "agreement_cascade": [float(c_agree.mean()), float(q_agree.mean())]}
        for strategy in ("routing", "cascade_routing"):
            # budgets: the variant's calibration cost, and its realised test cost (equal spend)
            sweep = budget_sweep(artifact.policy(strategy), estimator, cost_estimator, joint.dataset.quality,
                                 joint.dataset.cost, fit_rows, test_rows, np.array([budget, float(c_agree.mean())]),
                                 texts=list(joint.dataset.queries), strategy=strategy, num_resamples=1)
            row[strategy] = [float(sweep.costs[0]), float(sweep.qualities[0])]
            row[f"{strategy}_equal_spend"] = [float(sweep.costs[1]), float(sweep.qualities[1])]
            row[f"agreement_minus_{strategy}_equal_spend"] = list(
                paired_interval(q_agree, sweep.per_query_quality[1], num_resamples=2000))
        out["variants"].append(row)
        print(row, flush=True)
    return out


def summary_markdown(results: dict[str, dict]) -> str:
    lines = ["| dataset | escalated share of disagreements | budget (calibration cost) | test cost / quality: agreement "
             "cascade | learned routing | learned cascade routing | routing at the agreement cascade's test cost | "
             "agreement cascade − that routing (points) [95% CI] |", "|---|---:|---:|---|---|---|---|---|"]
    for name, r in results.items():
        for v in r["variants"]:
            d = v["agreement_minus_routing_equal_spend"]
            cells = " | ".join(f"{v[k][0]:.3g} / {v[k][1]:.4f}"
                               for k in ("agreement_cascade", "routing", "cascade_routing", "routing_equal_spend"))
            lines.append(f"| {name} | {v['escalate']:g} | {v['budget']:.3g} | {cells} | "
                         f"{100 * d[0]:+.2f} [{100 * d[1]:+.2f}, {100 * d[2]:+.2f}] |")
    lines.append("")
    for name, r in results.items():
        rules = "; ".join(f"{task}: " + ("all to the top model" if rule["pair"] is None else
                                         f"{' + '.join(rule['pair'])}, stop with {rule['stop']}")
                          + f" (agreement {rule['calibration_agreement']:.2f})" for task, rule in r["rules"].items())
        lines.append(f"{name}: top model {r['top_model']}; {rules}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_artifact_option(parser)
    parser.add_argument("--escalate", type=float, nargs="+", default=list(DEFAULT_ESCALATE),
                        help="shares of the disagreements that run the top model, each in [0, 1]")
    parser.add_argument("--out", default="benchmarks/results/agreement_cascade")
    args = parser.parse_args(argv)
    if any(not 0.0 <= f <= 1.0 for f in args.escalate):
        parser.error(f"--escalate values must lie in [0, 1], got {args.escalate}")
    torch.set_num_threads(1)
    results = {name: report_one(path, tuple(args.escalate)) for name, path in artifact_specs(parser, args.artifact)}
    results = with_earlier_results(args.out, results)
    write_summary(args.out, results, summary_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
