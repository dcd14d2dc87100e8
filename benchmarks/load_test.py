"""Bounded load test of the cascade-routing server on loopback (127.0.0.1 only).

Starts two real processes through the CLI — ``cascade-routing replay-backend`` (answers from the
recorded test split, with ``--latency-ms`` per answer) and ``cascade-routing serve`` (spend store:
a SQLite file in the run's temp folder) — then, ``--repeat`` times, fires ``--requests`` chat
completions from an asyncio client (at most ``--concurrency`` in flight), each with a unique
``X-Request-ID``, cycling over the test queries. Like the OpenAI SDK, the client retries a 429
``server_busy`` (the server's ``--max-concurrent`` reached) after its ``Retry-After``.

Faults (each optional, mixed into the same run):
- ``--poison F``: a fraction F of the requests is bad (lone surrogate, NaN temperature, wrong
  type, unknown field); each must get 400 and nothing else may notice;
- ``--slow-model M``: the replay answers model M only after ``--slow-ms`` (default 45 s, past the
  replay backends' 30 s timeout, so every call to it times out); requests that would use it fall
  back (backend timeout, then the circuit breaker) or hit the server's deadline (504; ``serve``'s
  default 120 s, or ``--deadline-s``);
- ``--disconnect F``: a fraction F of the clients gives up after ``--disconnect-after-s``;
- ``--sigterm-after N``: SIGTERM to ``serve`` once N responses arrived in the LAST round; the
  server must answer everything it accepted within ``--shutdown-timeout-s`` (200, or 503
  ``server_shutting_down`` for what could not finish) and exit; later requests are refused
  (connection error); none may be cut off mid-answer.

Checks (exit code 1 if any fails):
- lost 0 (every good request answered 200; with a slow model 504 also counts as answered) and
  duplicated 0 (each request id echoed exactly once, in the header and ``routing.request_id``, and
  the answer is the recorded response of the model the trace names);
- the spend account (read from the store after the server exited) equals the sum of the delivered
  costs (``cost_by_outcome.answered``) plus the costs of the timed-out, errored and cancelled
  requests (the other outcomes), with one record per accepted request;
- without faults: mean spend <= budget x (1 + ``--budget-tolerance``), and with
  ``--check-simulation`` (default) the server's mean spend and quality equal the offline
  ``simulate`` of the same checkpoint, budget and requests.

Reports: throughput (requests/s) and, as the baseline measured in the same run, the throughput of
the same number of requests sent straight to the replay backend of the cheapest model at the same
concurrency, from the same client, right after each round (the ratio is the median over rounds of
round / its direct phase, each measured seconds after its round; ``--client-pools K``, default
8, spreads the client's connections over K httpx pools: with one pool of 200 connections the
client's own pool bookkeeping, not the server, bounds both figures on 2 cores, and the ratio moves
with K); client latency p50/p95/p99; the routing overhead per request (server time not awaiting its
own backends, ``routing.routing_ms``) and its compute share (``compute_ms``); the backend calls per
request; the server's RSS before the requests and after each round (growth that keeps going round
after round is a leak, growth in the first round only is warm-up); the CPU time (user + system) per
request of the replay backend, ``serve`` and this client, per round and in each direct phase (on a
shared machine CPU per request survives the load where wall time does not).

Without ``--checkpoint`` it builds a small real artifact (tiny random encoder, untrained network,
λ fitted on a calibration split) on a synthetic dataset of ``--queries`` rows; with
``--checkpoint PATH`` it uses that trained artifact and the dataset/split recorded in it.

    .venv/bin/python benchmarks/load_test.py --requests 1000 --concurrency 200 --latency-ms 20
    .venv/bin/python benchmarks/load_test.py --requests 1000 --concurrency 200 --poison 0.05 \
        --disconnect 0.05 --slow-model WizardLM-13B-V1.2 --sigterm-after 900 --checkpoint artifacts/routerbench.safetensors
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cascade_routing"]
sys.path.insert(0, str(REPO))
from tests.serving_helpers import free_port, wait_healthy  # noqa: E402


def prepare(args, work: Path):
    """(checkpoint path, test dataset, replay CLI dataset args, budget, strategy, whether the requests
    carry ``routing.task``: only when the test split has labels and the checkpoint knows tasks, since
    the server refuses a label its checkpoint does not know)."""
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.serving.checkpoint import artifact_tasks

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
        from tests.serving_helpers import make_tiny_artifact, synthetic_dataset

        ds = synthetic_dataset(args.queries, seed=1)
        path, splits = make_tiny_artifact(ds, work / "artifact", strategies=(strategy,))
        test = splits["test"]
        test.save(work / "test-split")
        data_args = ["--dataset", str(work / "test-split")]
        art = load_artifact(path)
    budgets = sorted(art.fitted[strategy])
    budget = args.budget if args.budget is not None else budgets[len(budgets) // 2]
    send_tasks = test.tasks is not None and bool(artifact_tasks(art))
    return str(path), test, data_args, budget, strategy, send_tasks


def simulate_split(checkpoint: str, test, strategy: str, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-row realised cost and quality of ``simulate`` (same checkpoint, budget, λ mix) on ``test``."""
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.evaluation import simulate
    from cascade_routing.policies import query_uniforms

    art = load_artifact(checkpoint)
    qe, ce = art.bind(test.queries, test.responses, {**test.features, "cost": test.cost}, test.tasks)
    sim = simulate(art.policy(strategy), qe, ce, test.quality, test.cost, art.fitted_lambda(strategy, budget),
                   query_uniforms(test.queries))
    return sim.cost.numpy(), sim.quality.numpy()


POISON = [
    b'{"model": "cascade-routing", "messages": [{"role": "user", "content": "\\ud800 bad"}]}',
    b'{"model": "cascade-routing", "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "cascade-routing", "messages": [{"role": "user", "content": 42}]}',
    b'{"model": "cascade-routing", "frobnicate": true, "messages": [{"role": "user", "content": "hi"}]}',
]


async def fire(url: str, payloads: list[tuple[str, bytes, float | None]], concurrency: int, timeout_s: float,
               on_response=None, pools: int = 1):
    """POST every payload (id, body, client timeout or None) from ``pools`` httpx clients (request k on
    client k mod ``pools``, each with ``concurrency / pools`` connections); returns
    [(id, response | None, error, s)]."""
    sem = asyncio.Semaphore(concurrency)
    busy = [0]
    per_pool = max(1, concurrency // pools)
    limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(timeout=timeout_s, limits=limits))
                   for _ in range(pools)]

        async def one(k: int, rid: str, body: bytes, give_up: float | None):
            client = clients[k % pools]
            async with sem:
                t0 = time.perf_counter()
                while True:  # like the OpenAI SDK: a 429 server_busy is retried after its Retry-After
                    try:
                        resp = await client.post(url, content=body, timeout=give_up or timeout_s,
                                                 headers={"X-Request-ID": rid, "Content-Type": "application/json"})
                    except httpx.HTTPError as err:
                        return rid, None, f"{type(err).__name__}: {err}", time.perf_counter() - t0
                    if resp.status_code != 429 or "server_busy" not in resp.text:
                        break
                    busy[0] += 1
                    await asyncio.sleep(float(resp.headers.get("retry-after", "1")) * random.uniform(0.5, 1.5))
                if on_response is not None:
                    on_response()
                return rid, resp, None, time.perf_counter() - t0

        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(k, *p) for k, p in enumerate(payloads)))
        return out, time.perf_counter() - t0, busy[0]


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (None if the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants alive now (``serve --workers N``: the parent and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(entry.name)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))  # fields[1]: the parent's pid
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` and its descendants (MB; None if ``pid`` is gone)."""
    sizes = []
    for member in process_tree(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        sizes += [int(line.split()[1]) / 1024.0 for line in lines if line.startswith("VmRSS:")]
    return sum(sizes) if sizes else None


def cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by process ``pid`` and its live descendants (all their
    threads; None = this process; NaN if ``pid`` is gone)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    ticks = [int(f[11]) + int(f[12]) for f in map(_stat_fields, process_tree(pid)) if f is not None]  # utime, stime
    return sum(ticks) / os.sysconf("SC_CLK_TCK") if ticks else float("nan")


def account_problems(account: dict, counts: dict, delivered: float, total_requests: int) -> list[str]:
    """How the stored spend account disagrees with what the clients saw (empty: it agrees).

    ``account``: the server's totals (``requests``, ``answered``, ``total_cost``, ``cost_by_outcome``);
    ``counts``: the client-side outcome counts; ``delivered``: the summed cost of the answers received.
    Every request the server accepted is in the account (poison refused with 400, connections refused
    or cut by the SIGTERM are not accepted), except those whose client gave up before the server read
    them (it never routed them; they spent nothing): at least ``accepted - gave_up`` records, at
    most ``accepted``. A request the server answered and billed while its client
    was giving up, or while the SIGTERM cut its connection, is answered in the account but never
    received: at most ``gave_up + cut_after_sigterm`` of them, and the answered cost is then at least
    the delivered cost; otherwise the two are equal.
    """
    problems = []
    by_outcome = account["cost_by_outcome"]
    unreceived = account["answered"] - counts["answered"]
    abandoned = counts["gave_up"] + counts["cut_after_sigterm"]
    if not 0 <= unreceived <= abandoned:
        problems.append(f"account answered {account['answered']} != delivered {counts['answered']} "
                        f"(+ at most {abandoned} abandoned)")
    elif unreceived == 0 and not np.isclose(by_outcome["answered"], delivered, rtol=1e-9, atol=1e-12):
        problems.append(f"account: answered cost {by_outcome['answered']:.9g} != delivered {delivered:.9g}")
    elif by_outcome["answered"] < delivered * (1 - 1e-9) - 1e-12:
        problems.append(f"account: answered cost {by_outcome['answered']:.9g} < delivered {delivered:.9g}")
    if not np.isclose(sum(by_outcome.values()), account["total_cost"], rtol=1e-9, atol=1e-12):
        problems.append("account: total != sum over outcomes")
    accepted = total_requests - counts["poison_400"] - counts["refused_after_sigterm"] - counts["cut_after_sigterm"]
    if not accepted - counts["gave_up"] <= account["requests"] <= accepted:
        problems.append(f"account holds {account['requests']} requests, {accepted} were accepted "
                        f"({counts['gave_up']} of them abandoned by their clients)")
    return problems


def cpu_snapshot(procs) -> tuple[float, float, float]:
    """(replay, serve, this client) CPU seconds so far."""
    return cpu_s(procs[0].pid), cpu_s(procs[1].pid) if len(procs) > 1 else float("nan"), cpu_s()


def cpu_per_request_ms(before, after, n: int) -> dict[str, float]:
    """CPU milliseconds per request of each process between two :func:`cpu_snapshot`\ s."""
    return {name: (a - b) * 1000.0 / n for name, b, a in zip(("replay", "serve", "client"), before, after)}


def direct_phase(replay_url: str, test, rows: list[int], round_index: int, procs, args) -> dict:
    """The baseline of one round: the same queries sent straight to the replay backend of the cheapest
    model, from the same client at the same concurrency; returns its wall time, answers and CPU/request."""
    cheapest = test.models[0]
    direct = [(f"direct{round_index}-{k:05d}", json.dumps({"model": cheapest, "messages": [
        {"role": "user", "content": test.queries[i]}]}).encode(), None) for k, i in enumerate(rows)]
    cpu_before = cpu_snapshot(procs)
    results, wall, _ = asyncio.run(asyncio.wait_for(
        fire(f"{replay_url}/{cheapest}/v1/chat/completions", direct, args.concurrency, 120.0, pools=args.client_pools),
        args.max_seconds))
    failed = [f"{rid}: {err or (r.status_code, r.text[:120])}" for rid, r, err, _ in results
              if r is None or r.status_code != 200]
    return {"wall_s": wall, "ok": len(results) - len(failed), "failed": failed[:5],
            "cpu_ms_per_request": cpu_per_request_ms(cpu_before, cpu_snapshot(procs), len(direct))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a relative ``--checkpoint`` (and ``--json``) is resolved against the caller's
    working directory (``serve`` runs in the repository root)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=200, help="client requests in flight at most")
    p.add_argument("--client-pools", type=int, default=None,
                   help="httpx clients the requests are spread over (default: 8, at most --concurrency; each "
                        "with concurrency / K connections; "
                        "the server spreads its upstream connections the same way); httpcore scans a pool's "
                        "connections for every request, so one pool of 200 (K = 1) costs this client more CPU "
                        "per request than the replay backend needs")
    p.add_argument("--repeat", type=int, default=1, help="rounds against the same server processes")
    p.add_argument("--latency-ms", type=float, default=20.0, help="replay latency per answer")
    p.add_argument("--queries", type=int, default=200, help="synthetic dataset size (without --checkpoint)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--strategy", default="cascade_routing")
    p.add_argument("--budget", type=float, default=None, help="default: the middle fitted budget")
    p.add_argument("--budget-tolerance", type=float, default=0.10)
    p.add_argument("--poison", type=float, default=0.0, help="fraction of bad requests (each must get 400)")
    p.add_argument("--disconnect", type=float, default=0.0, help="fraction of clients that give up early")
    p.add_argument("--disconnect-after-s", type=float, default=0.5)
    p.add_argument("--slow-model", default=None, help="replay answers this model after --slow-ms")
    p.add_argument("--slow-ms", type=float, default=45_000.0,
                   help="past the replay backends' timeout (30 s), so no call to the slow model succeeds")
    p.add_argument("--deadline-s", type=float, default=None, help="serve --deadline-s")
    p.add_argument("--sigterm-after", type=int, default=None, help="SIGTERM serve after N responses of the last round")
    p.add_argument("--shutdown-timeout-s", type=float, default=10.0)
    p.add_argument("--server-args", default="", help="extra arguments for `serve` (one string)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound on each request phase")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--no-check-simulation", dest="check_simulation", action="store_false",
                   help="skip the offline simulation of the same requests")
    args = p.parse_args(argv)
    if args.client_pools is None:
        args.client_pools = min(8, args.concurrency)
    if not 1 <= args.client_pools <= args.concurrency:
        p.error(f"--client-pools must be between 1 and --concurrency ({args.concurrency}), got {args.client_pools}")
    for name in ("checkpoint", "json"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).expanduser().resolve()))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    faults = bool(args.poison or args.disconnect or args.slow_model or args.sigterm_after)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="cr-load-") as tmp:
        work = Path(tmp)
        t_prep = time.perf_counter()
        checkpoint, test, data_args, budget, strategy, send_tasks = prepare(args, work)
        print(f"prepared {test.num_queries} test queries, {test.num_models} models, budget {budget:.6g} "
              f"({strategy}) in {time.perf_counter() - t_prep:.1f}s", flush=True)
        rport, sport = free_port(), free_port()
        backends = work / "backends.yaml"
        rlog, slog = work / "replay.log", work / "server.log"
        store = work / "spend.sqlite"
        procs = []
        rounds = []
        sigterm_at: list[float] = []
        try:
            fail = ["--fail", f"{args.slow_model}=slow", "--slow-ms", str(args.slow_ms)] if args.slow_model else []
            procs.append(subprocess.Popen(
                CLI + ["replay-backend", *data_args, "--port", str(rport), "--latency-ms", str(args.latency_ms),
                       "--write-backends", str(backends), "--log-level", "warning", *fail],
                stdout=rlog.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO))
            wait_healthy(f"http://127.0.0.1:{rport}", procs[0], 120, rlog)
            extra = ["--deadline-s", str(args.deadline_s)] if args.deadline_s else []
            procs.append(subprocess.Popen(
                CLI + ["serve", "--checkpoint", checkpoint, "--backends", str(backends), "--budget", str(budget),
                       "--strategy", strategy, "--port", str(sport), "--log-level", "warning",
                       "--store", f"sqlite:///{store}", "--shutdown-timeout-s", str(args.shutdown_timeout_s),
                       *extra, *args.server_args.split()],
                stdout=slog.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO))
            server = f"http://127.0.0.1:{sport}"
            wait_healthy(server, procs[1], 180, slog)
            rss_before = rss_mb(procs[1].pid)

            rows = [i % test.num_queries for i in range(args.requests)]
            for r in range(args.repeat):
                payloads, kinds = [], {}
                for k, i in enumerate(rows):
                    rid = f"r{r}-{k:05d}"
                    roll = rng.random()
                    if roll < args.poison:
                        payloads.append((rid, POISON[k % len(POISON)], None))
                        kinds[rid] = "poison"
                        continue
                    body = {"model": "cascade-routing", "messages": [{"role": "user", "content": test.queries[i]}]}
                    if send_tasks:
                        body["routing"] = {"task": test.tasks[i]}
                    give_up = args.disconnect_after_s if roll < args.poison + args.disconnect else None
                    kinds[rid] = "disconnect" if give_up else "good"
                    payloads.append((rid, json.dumps(body).encode(), give_up))
                last = r == args.repeat - 1
                counter = [0]

                def on_response(last=last, counter=counter):
                    counter[0] += 1
                    if last and args.sigterm_after and counter[0] == args.sigterm_after:
                        procs[1].send_signal(signal.SIGTERM)
                        sigterm_at.append(time.monotonic())

                cpu_before = cpu_snapshot(procs)
                results, wall, busy = asyncio.run(asyncio.wait_for(
                    fire(server + "/v1/chat/completions", payloads, args.concurrency, 300.0, on_response,
                         args.client_pools),
                    args.max_seconds))
                rss_round = rss_mb(procs[1].pid)
                cpu_round = cpu_per_request_ms(cpu_before, cpu_snapshot(procs), len(payloads))
                direct = direct_phase(f"http://127.0.0.1:{rport}", test, rows, r, procs, args)
                rounds.append((payloads, kinds, results, wall, busy, rss_round, cpu_round, direct))
                print(f"round {r}: {len(results)} requests in {wall:.1f}s ({busy} busy retries), server RSS "
                      f"{rss_round} MB; straight to the backend in {direct['wall_s']:.1f}s", flush=True)
            rss_after = rss_mb(procs[1].pid)
            stats_live = None
            if not args.sigterm_after:
                stats_live = httpx.get(server + "/v1/routing/stats", timeout=10).json()

        finally:
            exit_s = None
            for proc in reversed(procs):
                if proc.poll() is None and not (proc is procs[-1] and sigterm_at):
                    proc.terminate()
            for proc in procs:
                try:
                    proc.wait(args.shutdown_timeout_s + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if sigterm_at and len(procs) > 1:
                exit_s = time.monotonic() - sigterm_at[0]  # upper bound: measured after the last direct phase
        from cascade_routing.serving.accounts import SpendLedger
        from cascade_routing.serving.store import SQLiteStore

        account = SpendLedger(SQLiteStore(store)).snapshot()
        if args.check_simulation and not faults:
            t_sim = time.perf_counter()
            sim_costs, sim_qualities = simulate_split(checkpoint, test, strategy, budget)
            print(f"offline simulation of the test split in {time.perf_counter() - t_sim:.1f}s", flush=True)
        server_exit = procs[1].returncode if len(procs) > 1 else None
        server_log_tail = slog.read_text()[-2000:] if slog.exists() else ""

    # ------------------------------------------------------------------ checks
    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    problems: list[str] = []
    per_round = []
    seen: dict[str, int] = {}
    costs, overhead, latency, compute, batch, quality, sim_idx = [], [], [], [], [], [], []
    calls, backend = [], []  # backend calls (attempted models) and time awaiting them, per answered request
    counts = {"answered": 0, "deadline_504": 0, "shutdown_503": 0, "poison_400": 0, "gave_up": 0,
              "refused_after_sigterm": 0, "lost": 0, "cut_after_sigterm": 0}
    for r, (payloads, kinds, results, wall, busy, rss_round, cpu_round, direct) in enumerate(rounds):
        per_round.append({"round": r, "wall_s": wall, "throughput_rps": len(payloads) / wall,
                          "retried_429_server_busy": busy, "server_rss_mb_after": rss_round,
                          "cpu_ms_per_request": cpu_round, "direct_backend_rps": len(payloads) / direct["wall_s"],
                          "direct_ok": direct["ok"], "direct_cpu_ms_per_request": direct["cpu_ms_per_request"],
                          "throughput_ratio_vs_direct_backend": direct["wall_s"] / wall})
        if direct["ok"] != len(payloads):
            problems.append(f"round {r}: the direct baseline got {direct['ok']} of {len(payloads)} answers: "
                            f"{direct['failed']}")
        row_of = {rid: rows[k] for k, (rid, _, _) in enumerate(payloads)}
        first_of_round = len(latency)
        for rid, resp, err, lat in results:
            kind = kinds[rid]
            if kind == "poison":
                if resp is not None and resp.status_code == 400:
                    counts["poison_400"] += 1
                elif resp is None and sigterm_at and "ConnectError" in (err or ""):
                    counts["refused_after_sigterm"] += 1  # the server had stopped accepting: never seen
                else:
                    problems.append(f"{rid}: poison got {err or (resp.status_code, resp.text[:120])}")
                continue
            if resp is None:
                if kind == "disconnect" and "Timeout" in (err or ""):
                    counts["gave_up"] += 1
                elif sigterm_at and "ConnectError" in (err or ""):
                    counts["refused_after_sigterm"] += 1
                elif sigterm_at:
                    counts["cut_after_sigterm"] += 1
                    problems.append(f"{rid}: cut off after SIGTERM: {err}")
                else:
                    counts["lost"] += 1
                    problems.append(f"{rid}: lost: {err}")
                continue
            if resp.status_code == 504 and (args.deadline_s or args.slow_model):
                counts["deadline_504"] += 1
                continue
            if resp.status_code == 503 and sigterm_at and "server_shutting_down" in resp.text:
                counts["shutdown_503"] += 1
                continue
            if resp.status_code != 200:
                counts["lost"] += 1
                problems.append(f"{rid}: HTTP {resp.status_code} {resp.text[:200]}")
                continue
            body = resp.json()
            echoed = body["routing"]["request_id"]
            if echoed != rid or resp.headers.get("x-request-id") != rid:
                problems.append(f"{rid}: echoed id {echoed!r} / header {resp.headers.get('x-request-id')!r}")
            seen[echoed] = seen.get(echoed, 0) + 1
            i = row_of[rid]
            j = test.model_index(body["routing"]["model"])
            if body["choices"][0]["message"]["content"] != test.responses[i, j]:
                problems.append(f"{rid}: answer text is not the recorded answer of {test.models[j]} for row {i}")
            counts["answered"] += 1
            costs.append(body["routing"]["total_cost"])
            quality.append(float(test.quality[i, j]))
            overhead.append(body["routing"]["routing_ms"])
            compute.append(body["routing"]["compute_ms"])
            batch.append(body["routing"]["batch_size"])
            calls.append(len(body["routing"]["attempted"]))
            backend.append(body["routing"]["backend_ms"])
            latency.append(lat * 1000)
            sim_idx.append(i)
        per_round[-1].update(answered=len(latency) - first_of_round,
                             client_latency_ms_p50=pct(latency[first_of_round:], 50),
                             routing_overhead_ms_p50=pct(overhead[first_of_round:], 50),
                             routing_compute_ms_mean=float(np.mean(compute[first_of_round:]))
                             if len(compute) > first_of_round else None)
    duplicated = sum(c - 1 for c in seen.values() if c > 1)
    mean_cost = float(np.mean(costs)) if costs else float("nan")
    delivered = float(np.sum(costs))
    total_requests = args.requests * args.repeat
    best_wall = min(r[3] for r in rounds)
    ratios = [r["throughput_ratio_vs_direct_backend"] for r in per_round]

    report = {
        "command": "python benchmarks/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average": os.getloadavg(),
        "requests": total_requests, "concurrency": args.concurrency, "client_pools": args.client_pools, "latency_ms": args.latency_ms,
        "test_queries": test.num_queries, "models": test.num_models, "strategy": strategy,
        **counts, "duplicated": duplicated, "rounds": per_round,
        "client_latency_ms_p50": pct(latency, 50), "client_latency_ms_p95": pct(latency, 95),
        "client_latency_ms_p99": pct(latency, 99),
        "routing_overhead_ms_p50": pct(overhead, 50), "routing_overhead_ms_p95": pct(overhead, 95),
        "routing_compute_ms_mean": float(np.mean(compute)) if compute else None,
        "backend_ms_p50": pct(backend, 50),
        "backend_calls_per_request_mean": float(np.mean(calls)) if calls else None,
        "batch_size_mean": float(np.mean(batch)) if batch else None,
        "budget": budget, "mean_cost": mean_cost, "mean_cost_over_budget": mean_cost / budget if budget else None,
        "delivered_cost": delivered, "account": {k: account[k] for k in (
            "requests", "answered", "errors", "timeouts", "disconnects", "shutdowns", "total_cost", "cost_by_outcome",
            "cancelled_calls", "failures")},
        "server_rss_mb_before": rss_before, "server_rss_mb_after": rss_after,
        "server_exit_code": server_exit, "sigterm_to_exit_s_at_most": exit_s,
        "baseline_direct_backend_rps": float(np.median([r["direct_backend_rps"] for r in per_round])),
        "baseline_cpu_ms_per_request": per_round[-1]["direct_cpu_ms_per_request"],
        "throughput_rps_best_round": args.requests / best_wall,
        # the median over rounds of (routed round / the direct phase right after it)
        "throughput_ratio_vs_direct_backend": float(np.median(ratios)),
        "throughput_ratio_range": [min(ratios), max(ratios)],
        # the same, counting every backend call of a routed request (the direct baseline makes one)
        "backend_call_ratio_vs_direct_backend": float(np.median(ratios) * np.mean(calls)) if calls else None,
    }
    if counts["lost"] or duplicated:
        problems.append(f"{counts['lost']} lost, {duplicated} duplicated")
    report["answered_not_received"] = account["answered"] - counts["answered"]
    problems += account_problems(account, counts, delivered, total_requests)
    if stats_live is not None and stats_live["requests"] != account["requests"]:
        problems.append("live stats and stored account disagree")
    if args.sigterm_after and server_exit is None:
        problems.append("serve did not exit after SIGTERM")
    if not faults and not mean_cost <= budget * (1 + args.budget_tolerance):
        problems.append(f"mean spend {mean_cost:.6g} over budget {budget:.6g} (+{args.budget_tolerance:.0%})")
    if args.check_simulation and not faults and costs:
        idx = np.asarray(sim_idx)
        sim_cost, sim_quality = float(sim_costs[idx].mean()), float(sim_qualities[idx].mean())
        report["offline_simulation_mean_cost"] = sim_cost
        report["offline_simulation_mean_quality"] = sim_quality
        report["server_mean_quality"] = float(np.mean(quality))
        if not np.isclose(sim_cost, mean_cost, rtol=1e-9, atol=0) or not np.isclose(sim_quality, np.mean(quality)):
            problems.append(f"server mean cost/quality {mean_cost:.6g}/{np.mean(quality):.4f} != offline "
                            f"simulation {sim_cost:.6g}/{sim_quality:.4f}")
    report["problems"] = problems[:20]
    if problems:
        report["server_log_tail"] = server_log_tail
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
