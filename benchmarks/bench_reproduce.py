"""Wall time, CPU time and peak memory of ``cascade-routing reproduce routerbench`` (the full Table 1 protocol).

Runs the command in a child process and reads its CPU time (user + sys) and peak RSS from
``getrusage(RUSAGE_CHILDREN)``; CPU time is the figure to compare on a shared machine (wall time
grows with the load average, which is printed next to it).
``--baseline-src DIR`` (a checkout of another revision, e.g. ``git archive main | tar -x -C DIR``)
first runs the same command from DIR's code (``PYTHONPATH=DIR``, same interpreter and data) in
the same session, then this checkout's, prints both, the ratios baseline / this and whether the two
``table.md`` files are identical. ``--json PATH`` writes the figures.
Usage: ``python benchmarks/bench_reproduce.py [--quick] [--out DIR] [--baseline-src DIR] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str], src: str | None) -> dict:
    """Run ``cmd`` (with ``PYTHONPATH=src`` and cwd ``src`` when given); its wall/CPU time, peak RSS, load."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = str(Path(src).resolve())
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=src or None)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}) in {src or '.'}: {proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_gb": round(after.ru_maxrss / 1024**2, 2),
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2), "stdout": proc.stdout}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="/tmp/bench_reproduce_routerbench")
    ap.add_argument("--threads", type=int, default=1, help="passed to the command (0: torch's default)")
    ap.add_argument("--baseline-src", default=None, help="checkout of the revision to compare against")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    def cmd(out: str) -> list[str]:
        c = [sys.executable, "-m", "cascade_routing", "reproduce", "routerbench", "--out", out, "--no-progress",
             "--threads", str(args.threads)]
        return c + (["--quick"] if args.quick else [])

    label = f"reproduce routerbench{' --quick' if args.quick else ''} --threads {args.threads}"
    figures: dict = {"command": label, "cpus": os.cpu_count()}
    runs = []
    if args.baseline_src:
        runs.append(("baseline", args.baseline_src, str(Path(args.out).resolve()) + "_baseline"))
    runs.append(("this", None, str(Path(args.out).resolve())))
    for name, src, out in runs:
        res = run(cmd(out), src)
        print(res.pop("stdout")[-4000:])
        figures[name] = res
        print(f"{name}: {label}: wall {res['wall_s']} s, CPU {res['cpu_s']} s (user+sys), peak RSS (largest child "
              f"so far) {res['peak_rss_gb']} GB; load average before/after {res['load_before']}/{res['load_after']}")
    if args.baseline_src:
        base, this = figures["baseline"], figures["this"]
        same = (Path(runs[0][2]) / "table.md").read_text() == (Path(runs[1][2]) / "table.md").read_text()
        figures.update({"wall_ratio": round(base["wall_s"] / this["wall_s"], 2),
                        "cpu_ratio": round(base["cpu_s"] / this["cpu_s"], 2), "same_table": same})
        print(f"baseline / this: wall {figures['wall_ratio']}x, CPU {figures['cpu_ratio']}x; "
              f"table.md {'identical' if same else 'DIFFERS'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
