"""Bounded load test of the cascade-routing server on loopback (127.0.0.1 only).

Starts two real processes through the CLI — ``cascade-routing replay-backend`` (answers from the
recorded test split, with ``--latency-ms`` per answer) and ``cascade-routing serve`` — then fires
``--requests`` chat completions at once from an asyncio client (at most ``--concurrency`` in flight),
each with a unique ``X-Request-ID``, cycling over the test queries.

Checks (exit code 1 if any fails):
- zero lost responses (every request answered 200) and zero duplicated/mismatched ones (each
  request id echoed exactly once, in the header and in ``routing.request_id``, and the answer is a
  recorded response of the model the trace names for that query);
- mean spend per request <= budget x (1 + ``--budget-tolerance``) (λ is fitted on the calibration
  split; the test queries are different ones, so a deviation is possible and reported);
- with ``--check-simulation`` (default on): the server's mean spend and quality over these very
  requests equal the offline ``simulate`` of the same checkpoint and budget (so any gap to the
  budget is the estimators' calibration -> test generalisation, not the serving path).

Reports: throughput (requests/s), client latency p50/p95, the routing overhead per request (server
time not spent awaiting its own backend calls: ``routing.routing_ms``, which includes waiting for
the batch and the queue), its pure compute share (estimators + policy, ``routing.compute_ms``: the
batch's compute time divided by the batch size), the mean micro-batch size, and, as the baseline measured in the same
run, the throughput of the same number of requests sent straight to the replay backend of the
cheapest model (one backend call per request, no routing) at the same concurrency.

Without ``--checkpoint`` it builds a small real artifact (tiny random encoder, untrained network,
λ fitted on a calibration split) on a synthetic dataset of ``--queries`` rows; with
``--checkpoint PATH`` it uses that trained artifact and the dataset/split recorded in it.

    .venv/bin/python benchmarks/load_test.py --requests 1000 --concurrency 200 --latency-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cascade_routing"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy within {timeout_s}s; log:\n{log.read_text()[-3000:]}")


def prepare(args, work: Path):
    """(checkpoint path, test dataset, replay CLI dataset args, budget, strategy)."""
    from cascade_routing.estimators.artifact import load_artifact

    strategy = args.strategy
    if args.checkpoint:
        from cascade_routing.data import load_dataset

        art = load_artifact(args.checkpoint)
        cfg = art.data_config
        ds = load_dataset(cfg["dataset"])
        fractions = cfg["split"]
        test = ds.split(fractions, seed=cfg.get("split_seed", 0))["test"]
        spec = ",".join(f"{k}={v}" for k, v in fractions.items())
        data_args = ["--dataset", cfg["dataset"], "--split", "test", "--split-fractions", spec,
                     "--seed", str(cfg.get("split_seed", 0))]
        path = args.checkpoint
    else:
        sys.path.insert(0, str(REPO))
        from tests.serving_helpers import make_tiny_artifact, synthetic_dataset

        ds = synthetic_dataset(args.queries, seed=1)
        path, splits = make_tiny_artifact(ds, work / "artifact", strategies=(strategy,))
        test = splits["test"]
        test.save(work / "test-split")
        data_args = ["--dataset", str(work / "test-split")]
        art = load_artifact(path)
    budgets = sorted(art.fitted[strategy])
    budget = args.budget if args.budget is not None else budgets[len(budgets) // 2]
    return str(path), test, data_args, budget, strategy


def simulate_split(checkpoint: str, test, strategy: str, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-row realised cost and quality of ``simulate`` (same checkpoint, budget, λ mix) on ``test``."""
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.estimators.export import make_policy
    from cascade_routing.evaluation import simulate
    from cascade_routing.policies import query_uniforms

    art = load_artifact(checkpoint)
    qe, ce = art.bind(test.queries, test.responses, {**test.features, "cost": test.cost}, test.tasks)
    sim = simulate(make_policy(strategy), qe, ce, test.quality, test.cost, art.fitted_lambda(strategy, budget),
                   query_uniforms(test.queries))
    return sim.cost.numpy(), sim.quality.numpy()


async def fire(url: str, payloads: list[tuple[str, dict]], concurrency: int, timeout_s: float):
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def one(rid: str, body: dict):
            async with sem:
                t0 = time.perf_counter()
                try:
                    resp = await client.post(url, json=body, headers={"X-Request-ID": rid})
                except httpx.HTTPError as err:
                    return rid, None, f"{type(err).__name__}: {err}", time.perf_counter() - t0
                return rid, resp, None, time.perf_counter() - t0

        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(rid, body) for rid, body in payloads))
        return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=200, help="client requests in flight at most")
    p.add_argument("--latency-ms", type=float, default=20.0, help="replay latency per answer")
    p.add_argument("--queries", type=int, default=200, help="synthetic dataset size (without --checkpoint)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--strategy", default="cascade_routing")
    p.add_argument("--budget", type=float, default=None, help="default: the middle fitted budget")
    p.add_argument("--budget-tolerance", type=float, default=0.10)
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound on the whole request phase")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--no-check-simulation", dest="check_simulation", action="store_false",
                   help="skip the offline simulation of the same requests")
    args = p.parse_args(argv)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="cr-load-") as tmp:
        work = Path(tmp)
        t_prep = time.perf_counter()
        checkpoint, test, data_args, budget, strategy = prepare(args, work)
        print(f"prepared {test.num_queries} test queries, {test.num_models} models, budget {budget:.6g} "
              f"({strategy}) in {time.perf_counter() - t_prep:.1f}s", flush=True)
        rport, sport = free_port(), free_port()
        backends = work / "backends.yaml"
        rlog, slog = work / "replay.log", work / "server.log"
        procs = []
        try:
            procs.append(subprocess.Popen(
                CLI + ["replay-backend", *data_args, "--port", str(rport), "--latency-ms", str(args.latency_ms),
                       "--write-backends", str(backends), "--log-level", "warning"],
                stdout=rlog.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO))
            wait_healthy(f"http://127.0.0.1:{rport}", procs[0], 120, rlog)
            procs.append(subprocess.Popen(
                CLI + ["serve", "--checkpoint", checkpoint, "--backends", str(backends), "--budget", str(budget),
                       "--strategy", strategy, "--port", str(sport), "--log-level", "warning"],
                stdout=slog.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO))
            server = f"http://127.0.0.1:{sport}"
            wait_healthy(server, procs[1], 180, slog)

            rows = [i % test.num_queries for i in range(args.requests)]
            payloads = []
            for k, i in enumerate(rows):
                body = {"model": "cascade-routing", "messages": [{"role": "user", "content": test.queries[i]}]}
                if test.tasks is not None:
                    body["routing"] = {"task": test.tasks[i]}
                payloads.append((f"req-{k:05d}", body))
            results, wall = asyncio.run(asyncio.wait_for(
                fire(server + "/v1/chat/completions", payloads, args.concurrency, 120.0), args.max_seconds))
            stats = httpx.get(server + "/v1/routing/stats", timeout=10).json()

            cheapest = test.models[0]
            direct = [(f"direct-{k:05d}", {"model": cheapest, "messages": body["messages"]})
                      for k, (_, body) in enumerate(payloads)]
            base_results, base_wall = asyncio.run(asyncio.wait_for(
                fire(f"http://127.0.0.1:{rport}/{cheapest}/v1/chat/completions", direct, args.concurrency, 120.0),
                args.max_seconds))
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if args.check_simulation:
            t_sim = time.perf_counter()
            sim_costs, sim_qualities = simulate_split(checkpoint, test, strategy, budget)
            print(f"offline simulation of the test split in {time.perf_counter() - t_sim:.1f}s", flush=True)

    # ------------------------------------------------------------------ checks
    problems: list[str] = []
    seen: dict[str, int] = {}
    costs, overhead, backend_ms, latency, models_run, compute, batch, quality = [], [], [], [], [], [], [], []
    expected_rid = {rid: rows[k] for k, (rid, _) in enumerate(payloads)}
    for rid, resp, err, lat in results:
        if resp is None or resp.status_code != 200:
            problems.append(f"{rid}: {err or (resp.status_code, resp.text[:200])}")
            continue
        body = resp.json()
        echoed = body["routing"]["request_id"]
        if echoed != rid or resp.headers.get("x-request-id") != rid:
            problems.append(f"{rid}: echoed id {echoed!r} / header {resp.headers.get('x-request-id')!r}")
        seen[echoed] = seen.get(echoed, 0) + 1
        i = expected_rid[rid]
        j = test.model_index(body["routing"]["model"])
        if body["choices"][0]["message"]["content"] != test.responses[i, j]:
            problems.append(f"{rid}: answer text is not the recorded answer of {test.models[j]} for row {i}")
        costs.append(body["routing"]["total_cost"])
        quality.append(float(test.quality[i, j]))
        overhead.append(body["routing"]["routing_ms"])
        compute.append(body["routing"]["compute_ms"])
        batch.append(body["routing"]["batch_size"])
        backend_ms.append(body["routing"]["backend_ms"])
        models_run.append(len(body["routing"]["models_run"]))
        latency.append(lat * 1000)
    lost = args.requests - len(costs)
    duplicated = sum(c - 1 for c in seen.values() if c > 1)
    missing_ids = len(set(expected_rid) - set(seen))
    mean_cost = float(np.mean(costs)) if costs else float("nan")
    base_ok = sum(1 for _, r, _, _ in base_results if r is not None and r.status_code == 200)
    report = {
        "command": "python benchmarks/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "requests": args.requests, "concurrency": args.concurrency, "latency_ms": args.latency_ms,
        "test_queries": test.num_queries, "models": test.models, "strategy": strategy,
        "ok": len(costs), "lost": lost, "duplicated": duplicated, "missing_ids": missing_ids,
        "wall_s": wall, "throughput_rps": args.requests / wall,
        "client_latency_ms_p50": float(np.percentile(latency, 50)) if latency else None,
        "client_latency_ms_p95": float(np.percentile(latency, 95)) if latency else None,
        "routing_overhead_ms_mean": float(np.mean(overhead)) if overhead else None,
        "routing_overhead_ms_p50": float(np.percentile(overhead, 50)) if overhead else None,
        "routing_overhead_ms_p95": float(np.percentile(overhead, 95)) if overhead else None,
        "routing_compute_ms_mean": float(np.mean(compute)) if compute else None,
        "batch_size_mean": float(np.mean(batch)) if batch else None,
        "backend_wait_ms_mean": float(np.mean(backend_ms)) if backend_ms else None,
        "models_run_mean": float(np.mean(models_run)) if models_run else None,
        "budget": budget, "mean_cost": mean_cost, "mean_cost_over_budget": mean_cost / budget if budget else None,
        "server_stats_mean_cost": stats["mean_cost"], "server_stats_requests": stats["requests"],
        "baseline_direct_backend_rps": args.requests / base_wall, "baseline_ok": base_ok,
        "throughput_ratio_vs_direct_backend": (args.requests / wall) / (args.requests / base_wall),
    }
    if lost:
        problems.append(f"{lost} lost responses")
    if duplicated or missing_ids:
        problems.append(f"{duplicated} duplicated and {missing_ids} missing request ids")
    if stats["requests"] != len(costs):
        problems.append(f"server counted {stats['requests']} requests, client got {len(costs)}")
    if not mean_cost <= budget * (1 + args.budget_tolerance):
        problems.append(f"mean spend {mean_cost:.6g} over budget {budget:.6g} (+{args.budget_tolerance:.0%})")
    if args.check_simulation and costs:
        idx = np.asarray([expected_rid[r] for r, resp, _, _ in results if resp is not None and resp.status_code == 200])
        sim_cost, sim_quality = float(sim_costs[idx].mean()), float(sim_qualities[idx].mean())
        report["offline_simulation_mean_cost"] = sim_cost
        report["offline_simulation_mean_quality"] = sim_quality
        report["server_mean_quality"] = float(np.mean(quality))
        if not np.isclose(sim_cost, mean_cost, rtol=1e-9, atol=0) or not np.isclose(sim_quality, np.mean(quality)):
            problems.append(f"server mean cost/quality {mean_cost:.6g}/{np.mean(quality):.4f} != offline "
                            f"simulation {sim_cost:.6g}/{sim_quality:.4f}")
    report["problems"] = problems[:20]
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
