"""Per-step λ: gradient through the smooth relaxation vs derivative-free random search.

Same number of policy evaluations for both (a relaxed forward+backward pass, or one exact
simulation, counts as one), both starting from the constant-λ fit and both refitted exactly
(bisection on the λ-shape's scale + γ) on the fit rows. Reported: test quality at each budget for
constant λ, relaxation-tuned λ_t and random-search λ_t, on the RouterBench subset with synthetic
estimators. Usage: ``python benchmarks/bench_relaxation.py [--pool 5] [--noise medium] [--evals 30]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cascade_routing.data import load_dataset
from cascade_routing.data.splits import partition_indices
from cascade_routing.evaluation.synthetic import synthetic_estimators
from cascade_routing.evaluation import simulate
from cascade_routing.evaluation.metrics import sweep_budgets
from cascade_routing.evaluation.reproduce import PAPER_POOLS, resolve_models
from cascade_routing.policies.registry import make_policy
from cascade_routing.policies import fit_lambda, query_uniforms
from cascade_routing.policies.relaxation import random_search_step_lambdas, tune_step_lambdas


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", default="5 models", choices=list(PAPER_POOLS))
    ap.add_argument("--noise", default="medium")
    ap.add_argument("--strategies", default="optimal_cascade,cascade_routing")
    ap.add_argument("--evals", type=int, default=30)
    ap.add_argument("--budgets", type=int, default=3)
    ap.add_argument("--fit-fraction", type=float, default=0.05)
    args = ap.parse_args()
    ds = load_dataset("routerbench-subset")
    names = resolve_models(ds.models, PAPER_POOLS[args.pool]) if PAPER_POOLS[args.pool] else ds.models
    ds = ds.select_models(names)
    split = partition_indices(ds.num_queries, {"fit": args.fit_fraction, "test": 1 - args.fit_fraction},
                              groups=ds.tasks, seed=0)
    fit, test = split["fit"], split["test"]
    qe, ce = synthetic_estimators(ds, args.noise, fit, 0, dtype=torch.float64)
    u = query_uniforms(ds.queries)
    all_b = sweep_budgets(ds.cost[test].mean(0), ds.quality[test].mean(0), 10)
    budgets = all_b[np.linspace(1, len(all_b) - 2, args.budgets).astype(int)]
    wins = {"relaxation": 0, "random_search": 0, "tie": 0}
    for strategy in args.strategies.split(","):
        for b in budgets:
            pol = make_policy(strategy, step_ratios=None, routing_guard=False)  # one constant λ to start from
            kw = dict(uniforms=u[fit], rows=torch.as_tensor(fit))
            const = fit_lambda(pol, qe, ce, ds.quality[fit], ds.cost[fit], float(b), **kw)
            t0 = time.perf_counter()
            relax, _ = tune_step_lambdas(pol, qe, ce, ds.quality[fit], ds.cost[fit], float(b), args.evals,
                                         init=const, **kw)
            t_relax = time.perf_counter() - t0
            t0 = time.perf_counter()
            rand, _ = random_search_step_lambdas(pol, qe, ce, ds.quality[fit], ds.cost[fit], float(b), args.evals,
                                                 init=const, **kw)
            t_rand = time.perf_counter() - t0
            out = {}
            for name, f in (("constant", const), ("relaxation", relax), ("random_search", rand)):
                r = simulate(pol, qe, ce, ds.quality[test], ds.cost[test], f, u[test], torch.as_tensor(test))
                out[name] = (r.mean_quality, r.mean_cost)
            d = out["relaxation"][0] - out["random_search"][0]
            wins["tie" if abs(d) < 1e-9 else ("relaxation" if d > 0 else "random_search")] += 1
            print(f"{strategy:16s} budget {b:.3e}: " + "  ".join(
                f"{k} q={v[0]:.4f} c={v[1]:.3e}" for k, v in out.items())
                  + f"  (relax {t_relax:.1f}s, random {t_rand:.1f}s)")
    print(f"test-quality wins over {sum(wins.values())} (strategy, budget) cells with {args.evals} evaluations each: {wins}")


if __name__ == "__main__":
    main()
