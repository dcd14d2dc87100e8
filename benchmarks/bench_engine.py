"""Benchmark: batched cascade-routing decisions vs a plain per-query pure-Python implementation.

Setup: 4,096 queries × 11 models, synthetic estimators with uncertainty (medium noise, independent
Gaussians), cascade routing with max_depth 5, 128 antithetic Sobol draws; run once in float64
and once in float32 (the baseline always computes in Python floats from the same inputs and draws). The batched engine simulates every query to the end; each
(query, step) decision is a *query-step*. The baseline is the same algorithm written per query in
plain Python (itertools over supermodels, loops over the draws): it replays a random subsample of
the engine's recorded (query, state) decisions, must return identical decisions (asserted), and its
time per query-step is extrapolated to all query-steps. Prints query-steps/s of both and the ratio.

On CPU the engine uses the fused numba kernels (``--backend auto``); ``--backend torch`` times the
plain torch ops instead (the GPU path). The load average is printed with the figures (2 shared cores:
the ratio moves with it). ``--json FILE`` appends the figures as one JSON line.

Usage: ``python benchmarks/bench_engine.py [--threads 1] [--device cuda] [--backend torch] [--queries 4096]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cascade_routing sets it; torch must not be imported first
import random
import time

import numpy as np
import torch

from cascade_routing.evaluation.synthetic import SyntheticCostEstimator, SyntheticQualityEstimator
from cascade_routing.evaluation import simulate
from cascade_routing.policies import CascadeRouting
from cascade_routing.policies.supermodels import normal_draws


def make_problem(n: int, m: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    rng = np.random.default_rng(seed)
    quality = (rng.random((n, m)) < np.linspace(0.4, 0.9, m)).astype(float)
    cost = np.geomspace(1e-4, 5e-3, m)[None, :] * rng.uniform(0.7, 1.3, (n, m))
    models = [f"model{i}" for i in range(m)]
    fit = np.arange(min(n, 500))
    qe = SyntheticQualityEstimator(quality, models, "medium", fit, seed, dtype=dtype)
    ce = SyntheticCostEstimator(cost, models, "medium", fit, seed, dtype=dtype)
    return quality, cost, qe, ce


def baseline_decide(mean, std, cost, ran, lam, z, depth, tie_tol=1e-6):
    """Pure Python, one query: enumerate S ⊇ ran, E[max] from the draws, argmax value, next model."""
    m = len(mean)
    r = [j for j in range(m) if ran[j]]
    if len(r) >= min(depth, m):
        return -1
    free = [j for j in range(m) if not ran[j]]
    k = len(z)
    best = None
    for size in range(0, depth - len(r) + 1):
        for add in itertools.combinations(free, size):
            members = r + list(add)
            if not members:
                continue
            total = 0.0
            for row in z:
                total += max(mean[j] + std[j] * row[j] for j in members)
            added = sum(cost[j] for j in add)
            cand = (total / k - lam * added, added, add)
            if best is None:
                best = [cand]
            elif cand[0] > best[0][0] + tie_tol:
                best = [c for c in best if c[0] >= cand[0] - tie_tol] + [cand]
            elif cand[0] >= best[0][0] - tie_tol:
                best.append(cand)
    top = max(c[0] for c in best)
    near = [c for c in best if c[0] >= top - tie_tol]
    add = min(near, key=lambda c: c[1])[2]
    if not add:
        return -1
    return min(add, key=lambda j: (cost[j], j))


class Recorder(CascadeRouting):
    """Cascade routing that keeps every decision's inputs and outputs (for the baseline replay)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log = []

    def decide(self, estimate, cost, ran, lam, **kw):
        out = super().decide(estimate, cost, ran, lam, **kw)
        self.log.append((estimate.mean.cpu(), estimate.std.cpu(), cost.cpu(), ran.cpu(),
                         torch.as_tensor(lam).expand(len(out)).cpu(), out.cpu()))
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--models", type=int, default=11)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--lam", type=float, default=60.0, help="λ (USD⁻¹); sets how many models run")
    ap.add_argument("--baseline-steps", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "numba"],
                    help="E[max] backend on CPU (CASCADE_ROUTING_EMAX_BACKEND)")
    ap.add_argument("--chunk-mb", type=int, default=32,
                    help="working-memory bound of one E[max] chunk (CascadeRouting chunk_bytes); larger on a GPU")
    ap.add_argument("--json", default=None, help="append the figures of each dtype as a JSON line to this file")
    args = ap.parse_args()
    os.environ["CASCADE_ROUTING_EMAX_BACKEND"] = args.backend
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, backend {args.backend}, "
          f"load average {os.getloadavg()[0]:.2f} (1 min)")
    for dtype in args.dtypes.split(","):
        bench(args, getattr(torch, dtype))


def bench(args, dtype: torch.dtype) -> None:
    dev = torch.device(args.device)
    quality, cost, qe, ce = make_problem(args.queries, args.models, dtype=dtype)
    qe.to(dev), ce.to(dev)
    policy = CascadeRouting(max_depth=args.depth, num_samples=args.samples, chunk_bytes=args.chunk_mb * 2**20)

    def run():
        res = simulate(policy, qe, ce, quality, cost, args.lam)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return res

    run()  # warm-up (tables, draws, kernels)
    # record decisions (CPU) for the baseline replay of a random subsample of query-steps
    rec = Recorder(max_depth=args.depth, num_samples=args.samples, chunk_bytes=args.chunk_mb * 2**20)
    simulate(rec, qe, ce, quality, cost, args.lam)
    events = [(s, i) for s, (_, _, _, _, _, out) in enumerate(rec.log) for i in range(len(out))]
    rnd = random.Random(0)
    sample = rnd.sample(events, min(args.baseline_steps, len(events)))
    z = normal_draws(args.samples, args.models, policy.seed, dtype=dtype).double().tolist()

    def baseline_pass() -> float:
        mismatches = 0
        t0 = time.perf_counter()
        for s, i in sample:
            mean, std, c, ran, lam, out = rec.log[s]
            got = baseline_decide(mean[i].double().tolist(), std[i].double().tolist(), c[i].double().tolist(),
                                  ran[i].tolist(), float(lam[i]), z, args.depth)
            mismatches += int(got != int(out[i]))
        elapsed = (time.perf_counter() - t0) / len(sample)
        assert mismatches == 0, f"{mismatches} of {len(sample)} baseline decisions differ from the engine"
        return elapsed

    # interleave engine runs and baseline passes so both see the same machine load; keep the best of each
    engine_times, base_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = run()
        engine_times.append(time.perf_counter() - t0)
        base_times.append(baseline_pass())
    runs = res.ran.sum(1)
    query_steps = int((runs + (runs < args.depth).long()).sum())
    assert len(events) == query_steps, (len(events), query_steps)
    engine_t, base_t = min(engine_times), min(base_times)
    engine_rate = query_steps / engine_t
    print(f"[{dtype}] engine ({dev}): {args.queries} queries x {args.models} models, depth {args.depth}, K={args.samples}: "
          f"{query_steps} query-steps in {engine_t:.3f} s (best of {args.repeats}) = {engine_rate:,.0f} query-steps/s "
          f"= {engine_t / query_steps * 1e6:.1f} us per query-step; mean models run {runs.double().mean():.2f}")
    base_rate = 1.0 / base_t
    print(f"[{dtype}] baseline (pure Python, per query): {base_t * 1e3:.2f} ms per query-step (best of {args.repeats} "
          f"passes over {len(sample)} sampled query-steps, identical decisions) = {base_rate:,.1f} query-steps/s; "
          f"extrapolated total {base_t * query_steps:.0f} s")
    load = os.getloadavg()[0]
    print(f"[{dtype}] speed-up: {engine_rate / base_rate:,.0f}x (load average {load:.2f})")
    if args.json:
        row = {"device": str(dev), "dtype": str(dtype).replace("torch.", ""), "backend": args.backend,
               "threads": torch.get_num_threads(), "queries": args.queries, "models": args.models,
               "depth": args.depth, "samples": args.samples, "query_steps": query_steps,
               "engine_s": engine_t, "engine_query_steps_per_s": engine_rate, "baseline_ms_per_step": base_t * 1e3,
               "speedup": engine_rate / base_rate, "identical_decisions": True, "load_average": load}
        with open(args.json, "a") as fh:
            fh.write(json.dumps(row) + "\n")

if __name__ == "__main__":
    main()
