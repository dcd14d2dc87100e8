"""Time to first token: ``stream: true`` vs the same requests without streaming, through the live
server (replay backends on loopback, in-process).

The replay answers after ``--latency-ms`` per model call; streamed, it sends the answer in
``--pieces`` pieces with that latency spread evenly before them (first piece after latency /
pieces), like a real endpoint that starts emitting early. For each strategy the same
``--requests`` test queries are sent sequentially, once without streaming (client time to the whole
body: the baseline) and once with streaming (client time to the first content chunk). Routing
streams the chosen model's tokens through; cascade routing buffers until the cascade decides.
Reports the medians and their ratio; asserts both answers are the same text.

    python benchmarks/bench_streaming.py --checkpoint artifacts/routerbench.safetensors
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cascade_routing.data import load_dataset  # noqa: E402
from cascade_routing.estimators.artifact import load_artifact  # noqa: E402
from cascade_routing.serving import BackendPool, CascadeRouter, parse_backends  # noqa: E402
from cascade_routing.serving.replay import backends_document, create_replay_app  # noqa: E402
from cascade_routing.serving.server import BackgroundServer, create_app  # noqa: E402
from cascade_routing.serving.streaming import sse_data  # noqa: E402


def timed_requests(url: str, bodies: list[dict], stream: bool) -> tuple[list[float], list[str], list[int]]:
    """Per request: seconds to the first content (stream) or the whole body, the text, models run."""
    times, texts, runs = [], [], []
    with httpx.Client(timeout=120) as client:
        for body in bodies:
            t0 = time.perf_counter()
            if not stream:
                r = client.post(url, json=body)
                r.raise_for_status()
                times.append(time.perf_counter() - t0)
                texts.append(r.json()["choices"][0]["message"]["content"])
                runs.append(len(r.json()["routing"]["models_run"]))
                continue
            first, parts, trace = None, [], None
            with client.stream("POST", url, json={**body, "stream": True}) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    event = sse_data(line)
                    if not isinstance(event, dict):
                        continue
                    for choice in event.get("choices", []):
                        piece = choice["delta"].get("content")
                        if piece:
                            first = first if first is not None else time.perf_counter() - t0
                            parts.append(piece)
                    trace = event.get("routing", trace)
            times.append(first)
            texts.append("".join(parts))
            runs.append(len(trace["models_run"]))
    return times, texts, runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="artifacts/routerbench.safetensors")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--latency-ms", type=float, default=400.0)
    p.add_argument("--pieces", type=int, default=8)
    p.add_argument("--strategies", default="routing,cascade_routing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    art = load_artifact(args.checkpoint)
    cfg = art.data_config
    test = load_dataset(cfg["dataset"]).split(cfg["split"], seed=cfg.get("split_seed", 0))["test"]
    seen: dict[str, int] = {}
    for q in test.queries:
        seen[q] = seen.get(q, 0) + 1
    rows = [i for i, q in enumerate(test.queries) if seen[q] == 1][: args.requests]
    bodies = [{"model": "cascade-routing", "messages": [{"role": "user", "content": test.queries[i]}],
               "routing": {"task": test.tasks[i]}} for i in rows]
    replay = BackgroundServer(create_replay_app(test, latency_ms=args.latency_ms, stream_pieces=args.pieces)).start()
    doc = backends_document(test, replay.url, timeout_s=60, max_retries=0)
    results = {}
    try:
        for strategy in args.strategies.split(","):
            budgets = sorted(art.fitted[strategy])
            budget = budgets[len(budgets) // 2]
            executor = ThreadPoolExecutor(1)
            router = CascadeRouter.from_checkpoint(args.checkpoint, budget=budget, strategy=strategy,
                                                   executor=executor)
            app = create_app(router, BackendPool(parse_backends(doc, "replay")), budget)
            with BackgroundServer(app) as srv:
                url = srv.url + "/v1/chat/completions"
                timed_requests(url, bodies[:2], False)  # warm-up (estimator caches, connections)
                full, text_full, runs = timed_requests(url, bodies, False)
                first, text_stream, _ = timed_requests(url, bodies, True)
            executor.shutdown()
            same = sum(a == b for a, b in zip(text_full, text_stream))
            med_full, med_first = statistics.median(full), statistics.median(first)
            results[strategy] = {"budget": budget, "requests": len(bodies), "same_text": same,
                                 "mean_models_run": sum(runs) / len(runs),
                                 "median_full_s": med_full, "median_first_token_s": med_first,
                                 "ttft_over_full": med_first / med_full}
            print(f"{strategy:<16} budget {budget:.6g}: {len(bodies)} requests ({sum(runs) / len(runs):.2f} models "
                  f"run on average), same text {same}/{len(bodies)}; non-streamed answer median "
                  f"{med_full * 1000:.0f} ms, streamed first token median {med_first * 1000:.0f} ms "
                  f"(ratio {med_first / med_full:.2f})")
    finally:
        replay.stop()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0 if all(r["same_text"] == r["requests"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
