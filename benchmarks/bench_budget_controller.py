"""Budget keeping on a shifted request stream: fixed offline λ vs the online λ controller vs an
exact hindsight λ, served through the live server (replay backends on loopback).

The stream (test rows only, unique query texts, no row twice): ``--segment`` requests of the task
whose fixed-λ spend is highest, then ``--segment`` of the cheapest task, then ``--segment`` drawn
from all tasks, in which every model's price is multiplied by ``--price-factor`` (a price change;
default 1). It is sent sequentially to ``serve`` twice (fixed λ; ``--budget-controller``); every
response is checked against the offline simulation of the same stream (``simulate`` for fixed λ,
``simulate_controlled`` for the controller): same models run, same cost (exit code 1 otherwise).
The hindsight λ is ``fit_lambda`` on the stream's own outcomes at the same budget (the best a
single λ could have done knowing the stream in advance; offline only).

Reports per policy: realised mean spend / budget (whole stream and per segment), mean quality,
and for the controller the requests until the trailing-``--window`` mean spend stays within
±``--tolerance`` of the budget, per segment.

    python benchmarks/bench_budget_controller.py --checkpoint artifacts/routerbench.safetensors
    python benchmarks/bench_budget_controller.py --estimators synthetic   # no checkpoint needed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cascade_routing.data import load_dataset  # noqa: E402
from cascade_routing.evaluation import simulate  # noqa: E402
from cascade_routing.evaluation.online import convergence_index, settling_index, simulate_controlled  # noqa: E402
from cascade_routing.policies import fit_lambda, make_policy, query_uniforms  # noqa: E402
from cascade_routing.policies.controller import ControllerConfig  # noqa: E402
from cascade_routing.serving import BackendPool, CascadeRouter, parse_backends  # noqa: E402
from cascade_routing.serving.replay import backends_document, create_replay_app  # noqa: E402
from cascade_routing.serving.server import BackgroundServer, create_app  # noqa: E402


class _RowsOf:
    """An estimator bound to the whole dataset, seen through a row map (server-side binding)."""

    def __init__(self, base, rows: torch.Tensor) -> None:
        self.base, self.rows = base, rows

    def estimate(self, queries, ran):
        return self.base.estimate(self.rows[queries.cpu()], ran)


def text_binder(qe, ce, texts: list[str]):
    """A server binder over dataset-wide estimators: a query's row is that of its text."""
    index: dict[str, int] = {}
    for i, t in enumerate(texts):
        index.setdefault(t, i)

    def bind(queries, responses=None, features=None, tasks=None):
        rows = torch.tensor([index[q] for q in queries], dtype=torch.long)
        return _RowsOf(qe, rows), _RowsOf(ce, rows)

    return bind


def prepare(args):
    """(universe dataset U, pool rows of U, offline (qe, ce) over U, fitted λ, server binder, policy,
    budget, feature names, description)."""
    policy = make_policy(args.strategy)
    if args.estimators == "synthetic":
        from cascade_routing.evaluation.synthetic import synthetic_estimators

        ds = load_dataset(args.dataset)
        parts = ds.split({"calibration": 0.2, "test": 0.8}, seed=args.seed)
        universe = ds
        rng_rows = {q: i for i, q in reversed(list(enumerate(ds.queries)))}
        cal_rows = torch.tensor(sorted({rng_rows[q] for q in parts["calibration"].queries}))
        test_texts = set(parts["test"].queries) - set(parts["calibration"].queries)
        qe, ce = synthetic_estimators(ds, args.noise, cal_rows, seed=args.seed)
        budget = args.budget or float(np.quantile(ds.cost.mean(0), 0.5))
        fitted = fit_lambda(policy, qe, ce, ds.quality[cal_rows], ds.cost[cal_rows], budget,
                            uniforms=query_uniforms([ds.queries[i] for i in cal_rows]), rows=cal_rows)
        binder = text_binder(qe, ce, ds.queries)
        features = ("tokens_in", "tokens_out", "latency_ms", "cost")
        pool = [i for i, q in enumerate(ds.queries) if q in test_texts]
        what = f"synthetic estimators ({args.noise} noise), λ fitted on a 20% calibration split"
    else:
        from cascade_routing.estimators.artifact import load_artifact
        from cascade_routing.serving.checkpoint import artifact_feature_names

        art = load_artifact(args.checkpoint)
        cfg = art.data_config
        ds = load_dataset(cfg["dataset"])
        universe = ds.split(cfg["split"], seed=cfg.get("split_seed", 0))["test"]
        qe, ce = art.bind(universe.queries, universe.responses, {**universe.features, "cost": universe.cost},
                          universe.tasks)
        budgets = sorted(art.fitted[args.strategy])
        budget = args.budget or budgets[len(budgets) // 2]
        fitted = art.fitted_lambda(args.strategy, budget)
        budget = float(fitted.budget) if fitted.budget is not None else budget
        binder = art.bind
        features = artifact_feature_names(art)
        what = f"checkpoint {args.checkpoint}"
    counts: dict[str, int] = {}
    for q in universe.queries:
        counts[q] = counts.get(q, 0) + 1
    pool = [i for i in (pool if args.estimators == "synthetic" else range(universe.num_queries))
            if counts[universe.queries[i]] == 1]
    return universe, pool, qe, ce, fitted, binder, policy, budget, features, what


def make_stream(universe, pool, qe, ce, policy, fitted, segment: int, seed: int):
    """(stream rows of U, segment lengths, segment names, per-task fixed-λ mean spend)."""
    rows = torch.tensor(pool)
    u = query_uniforms([universe.queries[i] for i in pool])
    sim = simulate(policy, qe, ce, universe.quality[rows], universe.cost[rows], fitted, u, rows)
    tasks = np.array([universe.tasks[i] for i in pool])
    spend = {t: float(sim.cost[torch.as_tensor(tasks == t)].mean()) for t in sorted(set(tasks))}
    high, low = max(spend, key=spend.get), min(spend, key=spend.get)
    rng = np.random.default_rng(seed)
    pool_arr = np.array(pool)

    used: set[int] = set()

    def draw(cands):
        cands = np.array([c for c in cands if c not in used])
        out = rng.choice(cands, size=min(segment, len(cands)), replace=False).tolist()
        used.update(out)
        return out

    segs = [draw(pool_arr[tasks == high]), draw(pool_arr[tasks == low]), draw(pool_arr)]
    names = [f"{high} (most expensive)", f"{low} (cheapest)", "mixed"]
    return sum(segs, []), [len(s) for s in segs], names, spend


def serve_stream(served, binder, policy, fitted, budget, features, controller, latency_ms):
    """Send the ``served`` dataset's queries in order through replay + server (sequentially); per
    request (models_run, cost, λ factor)."""
    sub = served
    replay = BackgroundServer(create_replay_app(sub, latency_ms=latency_ms)).start()
    executor = ThreadPoolExecutor(1)
    try:
        router = CascadeRouter(policy, binder, {budget: fitted}, served.models, budget=budget,
                               feature_names=features, executor=executor)
        doc = backends_document(sub, replay.url, timeout_s=60, max_retries=0)
        app = create_app(router, BackendPool(parse_backends(doc, "replay")), budget, controller=controller)
        out = []
        with BackgroundServer(app) as srv, httpx.Client(timeout=120) as client:
            for i in range(served.num_queries):
                body = {"model": "cascade-routing", "messages": [{"role": "user", "content": served.queries[i]}]}
                if served.tasks is not None:
                    body["routing"] = {"task": served.tasks[i]}
                resp = client.post(srv.url + "/v1/chat/completions", json=body)
                resp.raise_for_status()
                r = resp.json()["routing"]
                out.append((r["models_run"], r["total_cost"], (r["controller"] or {}).get("lam_factor", 1.0)))
        return out
    finally:
        replay.stop()
        executor.shutdown()


def lam_settled(factors: np.ndarray, window: int, tolerance: float) -> int | None:
    """Requests until log λ stays within log(1 ± tolerance) of its level at the segment's end
    (the mean log factor over its last ``window`` requests)."""
    logs = np.log(factors)
    return settling_index(logs, float(logs[-window:].mean()), float(np.log1p(tolerance)))


def check_equal(served, offline_order, offline_cost, models, label) -> int:
    bad = 0
    for k, (run, cost, _) in enumerate(served):
        expected = [models[j] for j in offline_order[k].tolist() if j >= 0]
        if run != expected or abs(cost - float(offline_cost[k])) > 1e-9 * max(1.0, abs(cost)) + 1e-15:
            bad += 1
            if bad <= 3:
                print(f"  MISMATCH {label} request {k}: server {run} {cost:.6g}, offline {expected} "
                      f"{float(offline_cost[k]):.6g}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--estimators", choices=["artifact", "synthetic"], default="artifact")
    p.add_argument("--checkpoint", default="artifacts/routerbench.safetensors")
    p.add_argument("--dataset", default="routerbench-subset", help="synthetic mode only")
    p.add_argument("--noise", default="medium", help="synthetic mode only")
    p.add_argument("--strategy", default="cascade_routing")
    p.add_argument("--budget", type=float, default=None, help="default: the middle fitted budget")
    p.add_argument("--segment", type=int, default=200, help="requests per segment of the stream")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--kp", type=float, default=0.5)
    p.add_argument("--ki", type=float, default=0.05)
    p.add_argument("--max-factor", type=float, default=30.0)
    p.add_argument("--tolerance", type=float, default=0.1, help="convergence band around the budget")
    p.add_argument("--price-factor", type=float, default=1.0,
                   help="multiply every price in the third (mixed) segment by this (artifact mode)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="replay latency per answer")
    p.add_argument("--offline-only", action="store_true", help="skip the server runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    universe, pool, qe, ce, fitted, binder, policy, budget, features, what = prepare(args)
    stream, lengths, names, task_spend = make_stream(universe, pool, qe, ce, policy, fitted, args.segment, args.seed)
    served = universe.subset(stream, name="stream")
    if args.price_factor != 1.0:
        if args.estimators == "synthetic":
            raise SystemExit("--price-factor needs --estimators artifact (the synthetic cost estimator reads U's costs)")
        served.cost[-lengths[2]:] *= args.price_factor
        names[2] += f", prices x{args.price_factor:g}"
    if args.estimators == "artifact":  # offline estimators see what the server sees: the served rows
        qe, ce = binder(served.queries, served.responses, {**served.features, "cost": served.cost}, served.tasks)
        rows = torch.arange(served.num_queries)
    else:
        rows = torch.tensor(stream)
    u = query_uniforms(served.queries)
    quality, cost = torch.as_tensor(served.quality), torch.as_tensor(served.cost)
    cfg = ControllerConfig(window=args.window, k_p=args.kp, k_i=args.ki, max_factor=args.max_factor)
    fixed = simulate(policy, qe, ce, quality, cost, fitted, u, rows)
    ctrl = simulate_controlled(policy, qe, ce, quality, cost, fitted, budget, cfg, uniforms=u, rows=rows)
    hind = fit_lambda(policy, qe, ce, quality, cost, budget, uniforms=u, rows=rows)
    hind_sim = simulate(policy, qe, ce, quality, cost, hind, u, rows)
    bounds = np.cumsum([0] + lengths)

    def seg(x):
        x = np.asarray(x, dtype=np.float64)
        return [float(x[a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:])]

    res = {
        "what": what, "strategy": args.strategy, "budget": budget, "stream": dict(zip(names, lengths)),
        "fixed_lambda_task_spend_over_budget": {t: v / budget for t, v in task_spend.items()},
        "controller": vars(args) | {"window": cfg.window},
        "fixed": {"mean_cost_over_budget": fixed.mean_cost / budget, "mean_quality": fixed.mean_quality,
                  "segments_cost_over_budget": [v / budget for v in seg(fixed.cost)]},
        "controlled": {"mean_cost_over_budget": ctrl.mean_cost / budget, "mean_quality": ctrl.mean_quality,
                       "segments_cost_over_budget": [v / budget for v in seg(ctrl.result.cost)],
                       "lam_factor_at_segment_ends": [float(ctrl.lam_factor[b - 1]) for b in bounds[1:]],
                       "converged_after": [convergence_index(ctrl.result.cost.numpy()[a:b], budget, args.window,
                                                             args.tolerance)
                                           for a, b in zip(bounds[:-1], bounds[1:])],
                       "lam_settled_after": [lam_settled(ctrl.lam_factor.numpy()[a:b], args.window, args.tolerance)
                                             for a, b in zip(bounds[:-1], bounds[1:])]},
        "hindsight": {"mean_cost_over_budget": hind_sim.mean_cost / budget, "mean_quality": hind_sim.mean_quality,
                      "lam_over_offline": float(hind.lam_high[0] / fitted.lam_high[0]) if float(fitted.lam_high[0])
                      else None},
    }
    mismatches = 0
    if not args.offline_only:
        ts = time.perf_counter()
        served_fixed = serve_stream(served, binder, policy, fitted, budget, features, None, args.latency_ms)
        served_ctrl = serve_stream(served, binder, policy, fitted, budget, features, cfg, args.latency_ms)
        mismatches += check_equal(served_fixed, fixed.order, fixed.cost, served.models, "fixed")
        mismatches += check_equal(served_ctrl, ctrl.result.order, ctrl.result.cost, served.models, "controller")
        res["server"] = {
            "requests": 2 * len(stream), "mismatches_vs_offline": mismatches,
            "fixed_mean_cost_over_budget": float(np.mean([c for _, c, _ in served_fixed])) / budget,
            "controlled_mean_cost_over_budget": float(np.mean([c for _, c, _ in served_ctrl])) / budget,
            "wall_s": time.perf_counter() - ts,
        }
    res["wall_s"] = time.perf_counter() - t0
    print(f"{what}; strategy {args.strategy}; budget {budget:.6g} USD; stream "
          + ", ".join(f"{n}: {k}" for n, k in zip(names, lengths)))
    print(f"{'policy':<22}{'spend/budget':>13}{'quality':>9}   per segment spend/budget")
    for key, label in (("fixed", "offline λ (fixed)"), ("controlled", "online controller"), ("hindsight", "hindsight λ")):
        r = res[key]
        segs = " ".join(f"{v:.3f}" for v in r.get("segments_cost_over_budget", []))
        print(f"{label:<22}{r['mean_cost_over_budget']:>13.4f}{r['mean_quality']:>9.4f}   {segs}")
    print(f"controller: λ factor at segment ends {[round(x, 3) for x in res['controlled']['lam_factor_at_segment_ends']]}, "
          f"trailing-{args.window} spend within ±{args.tolerance:.0%} of the budget from request "
          f"{res['controlled']['converged_after']} of each segment on, λ within ±{args.tolerance:.0%} of its "
          f"segment-end level from request {res['controlled']['lam_settled_after']} on")
    if "server" in res:
        print(f"server: {res['server']['requests']} requests, {mismatches} mismatches vs offline simulation, "
              f"{res['server']['wall_s']:.0f} s")
    print(f"wall {res['wall_s']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
