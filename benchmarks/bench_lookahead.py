"""A one-step look-ahead value for cascade routing's next step, against the myopic one, on calibration halves.

With uncertainty ``none`` a supermodel's value is the max of point estimates, so cascade routing gives
a cheap first model no credit for what its answer will reveal (its first step is routing), while a
cascade always starts with it. This benchmark measures a policy that does give that credit, the
knowledge gradient of the next model. At a state with run set R and post-hoc means μ:

    stop value        V_R  = max_{k in R} μ_k                         (-inf when nothing ran)
    after running m   A_-m = max(V_R, max_{j != m} max(V_R, μ_j) - λ c_j)   (one more model, point estimates;
                                                                         V_R only when the depth limit is reached)
    value of running  Q_m  = -λ c_m + E[max(X_m, A_-m)],   X_m ~ N(μ_m, σ_m²)

with E[max(X, A)] = A + (μ - A) Φ(d) + σ φ(d), d = (μ - A) / σ. X_m is m's estimate once its own
answer is in: σ_m² = α ρ_{m,k} μ_m (1 - μ_m), where ρ_{m,k} = Σ (μ'_m - μ_m)² / Σ μ_m (1 - μ_m) is
measured on the **val** split over random run sets of size k (the share of a model's Bernoulli
variance its own answer resolves). The policy runs the argmax of Q when it beats V_R (ties: the higher
myopic value max(V_R, μ_m) - λ c_m, then the cheaper model), with cascade routing's pool and depth
limit. With σ = 0 (α = 0) it makes exactly cascade routing's decisions under uncertainty ``none``.

For each artifact (``--artifact NAME=PATH``) the calibration split is halved at random (``--seeds``
halvings, both folds); λ of routing, the optimal cascade, cascade routing (``none``, one constant λ, no
guard) and the look-ahead at each ``--alphas`` value is fitted per budget on one half and scored on
the other (3 budgets per pair of non-dominated models of the scored half), AUC averaged over folds.

Run (2 CPU cores; 10-45 s per artifact at ``--seeds 4``):

    CASCADE_ROUTING_DATA_DIR=../shared/data/raw .venv/bin/python benchmarks/bench_lookahead.py \\
        --artifact rational-llm-cascades=artifacts/rational.safetensors --out benchmarks/results/lookahead

Writes ``<out>/summary.json`` and ``<out>/summary.md`` (artifacts already in ``<out>/summary.json`` and
not rerun are kept).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from artifact_specs import (add_artifact_option, add_seeds_option, artifact_specs, calibration_folds,  # noqa: E402
                            with_earlier_results, write_summary)

from cascade_routing.policies.base import Policy, check_inputs  # noqa: E402
from cascade_routing.policies.cascade_routing import CascadeRouting  # noqa: E402

STRATEGIES = ("routing", "optimal_cascade", "cascade_routing")


def expected_max_normal(mu: torch.Tensor, sigma: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """E[max(X, a)] for X ~ N(mu, sigma²) (elementwise; sigma > 0): a + (mu - a) Φ(d) + sigma φ(d),
    d = (mu - a) / sigma; mu where a is -inf."""
    d = (mu - a) / sigma
    cdf = 0.5 * (1 + torch.erf(d / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * d * d) / math.sqrt(2 * math.pi)
    finite = torch.isfinite(a)
    value = torch.where(finite, a + (mu - a) * cdf + sigma * pdf, mu)
    return torch.where(finite, torch.maximum(value, torch.maximum(mu, a)), value)  # rounding at |d| large


class LookaheadPolicy(Policy):
    """The look-ahead policy of the module docstring; ``rho`` [M, K]: ρ per model and run-set size."""

    name = "cascade_routing"

    def __init__(self, rho: np.ndarray, alpha: float, pool: tuple[int, ...] | None, max_depth: int = 5,
                 tie_tol: float = 1e-6) -> None:
        self.rho = torch.as_tensor(np.asarray(rho), dtype=torch.float64)
        self.alpha = float(alpha)
        self.max_depth = max_depth
        self.tie_tol = tie_tol
        self._pool_rule = CascadeRouting(max_depth=max_depth, pool=pool)  # the same allowed models

    def decide(self, estimate, cost, ran, lam, cache=None, rows=None, max_depth=None, **_) -> torch.Tensor:
        lam = check_inputs(estimate, cost, ran, lam).to(torch.float64)[:, None]
        mu, c = estimate.mean.to(torch.float64), cost.to(torch.float64)
        m = mu.shape[1]
        depth = self.max_steps(m) if max_depth is None else min(self.max_steps(m), int(max_depth))
        allowed = self._pool_rule.allowed(estimate, cost, ran)
        steps = ran.sum(1)
        ninf = torch.tensor(-math.inf, dtype=torch.float64)
        stop = torch.where(ran, mu, ninf).amax(1)[:, None]
        can = ~ran & (steps < depth)[:, None] & (True if allowed is None else allowed)
        then = torch.where(can & (steps + 2 <= depth)[:, None], torch.maximum(stop, mu) - lam * c, ninf)
        best2 = then.topk(min(2, m), dim=1)
        second = best2.values[:, 1:2] if m > 1 else torch.full_like(stop, -math.inf)
        without = torch.where(torch.arange(m)[None, :] == best2.indices[:, :1], second, best2.values[:, :1])
        after = torch.maximum(stop, without)
        rho = self.rho[:, steps.clamp(max=self.rho.shape[1] - 1)].T
        sigma = (self.alpha * rho * (mu * (1 - mu)).clamp_min(0)).sqrt().clamp_min(1e-9)
        q = torch.where(can, expected_max_normal(mu, sigma, after) - lam * c, ninf)
        best = q.amax(1, keepdim=True)
        myopic = torch.where(can & (q >= best - self.tie_tol), torch.maximum(stop, mu) - lam * c, ninf)
        near = myopic >= myopic.amax(1, keepdim=True) - self.tie_tol
        choice = torch.where(near & can, c, torch.full_like(c, math.inf)).argmin(1)
        go = torch.isfinite(best[:, 0]) & (best[:, 0] > stop[:, 0] + self.tie_tol)
        return torch.where(go, choice, torch.full_like(choice, -1))


def resolved_share(estimator, num_rows: int, num_models: int, sizes: int, draws: int = 3, seed: int = 0) -> np.ndarray:
    """ρ [M, sizes]: Σ (μ'_m − μ_m)² / Σ μ_m (1 − μ_m) over ``draws`` random run sets of each size k <
    ``sizes`` per row, μ_m the estimate of an unrun m at that set and μ'_m once m's answer is added."""
    from cascade_routing.evaluation.estimate_bias import random_sets_of_size

    generator = torch.Generator().manual_seed(seed)
    rho = np.zeros((num_models, sizes))
    for k in range(sizes):
        moved, spread = np.zeros(num_models), np.zeros(num_models)
        for _ in range(draws):
            ran = random_sets_of_size(num_rows, num_models, k, generator)
            before = estimator.estimate(torch.arange(num_rows), ran).mean.double()
            for j in range(num_models):
                rows = (~ran[:, j]).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                with_j = ran[rows].clone()
                with_j[:, j] = True
                after = estimator.estimate(rows, with_j).mean.double()[:, j]
                b = before[rows, j]
                moved[j] += float(((after - b) ** 2).sum())
                spread[j] += float((b * (1 - b)).clamp_min(1e-6).sum())
        rho[:, k] = moved / np.maximum(spread, 1e-9)
    return rho


def report_one(path: str, seeds: int, alphas: list[float]) -> dict:
    from cascade_routing.calibration.binding import bind_split
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.evaluation.sweep import budget_sweep
    from cascade_routing.policies.pool import nondominated_pool
    from cascade_routing.policies.registry import CASCADE_ROUTING_MAX_DEPTH, calibrated_policy
    from cascade_routing.training.heldout import datamodule_for

    artifact = load_artifact(path)
    splits = datamodule_for(artifact).splits
    val_estimator, _ = bind_split(artifact, splits["val"], uncertainty="none")
    n_val, m = splits["val"].quality.shape
    rho = resolved_share(val_estimator, n_val, m, min(m, CASCADE_ROUTING_MAX_DEPTH))
    data = splits["calibration"].dataset
    estimator, cost_estimator = bind_split(artifact, splits["calibration"], uncertainty="none")
    aucs: dict[str, list[float]] = {}
    for fit, score, budgets in calibration_folds(data, cost_estimator, seeds):
        policies = {s: calibrated_policy(s, data.quality[fit], data.cost[fit], step_ratios=None, routing_guard=False)
                    for s in STRATEGIES}
        pool = nondominated_pool(data.quality[fit], data.cost[fit])
        policies.update({f"lookahead α={a:g}": LookaheadPolicy(rho, a, pool) for a in alphas})
        for name, policy in policies.items():
            sweep = budget_sweep(policy, estimator, cost_estimator, data.quality, data.cost, fit, score, budgets,
                                 texts=list(data.queries), num_resamples=1)
            aucs.setdefault(name, []).append(float(sweep.auc))
    return {"artifact": path, "halvings": seeds, "folds": 2 * seeds, "rho": rho.round(4).tolist(),
            "auc": {name: float(np.mean(v)) for name, v in aucs.items()},
            "auc_sd": {name: float(np.std(v)) for name, v in aucs.items()}}


def summary_markdown(results: dict[str, dict]) -> str:
    names = list(dict.fromkeys(k for res in results.values() for k in res["auc"]))
    lines = ["| artifact | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for artifact, res in results.items():
        cells = [f"{res['auc'][k]:.2f}" if k in res["auc"] else "–" for k in names]
        lines.append(f"| {artifact} ({res['folds']} folds) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_artifact_option(parser)
    add_seeds_option(parser, 4)
    parser.add_argument("--alphas", default="0.1,0.25,0.5,1", help="comma-separated scales α of the look-ahead's σ²")
    parser.add_argument("--out", default="benchmarks/results/lookahead")
    args = parser.parse_args(argv)
    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        parser.error(f"--alphas must be comma-separated numbers, got {args.alphas!r}")
    if any(not math.isfinite(a) or a < 0 for a in alphas):
        parser.error(f"--alphas must be finite numbers >= 0, got {args.alphas!r}")
    torch.set_num_threads(1)
    results = {name: report_one(path, args.seeds, alphas) for name, path in artifact_specs(parser, args.artifact)}
    results = with_earlier_results(args.out, results)
    write_summary(args.out, results, summary_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
