"""Wall time and peak memory of ``cascade-routing reproduce routerbench`` (targets: <= 5 min, < 4 GB).

Runs the command in a child process and reads its peak RSS from ``getrusage(RUSAGE_CHILDREN)``.
Usage: ``python benchmarks/bench_reproduce.py [--quick] [--out DIR]``
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="/tmp/bench_reproduce_routerbench")
    ap.add_argument("--threads", type=int, default=1, help="passed to the command (0: torch's default)")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "cascade_routing", "reproduce", "routerbench", "--out", args.out, "--no-progress",
           "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # kB on Linux
    print(proc.stdout[-4000:])
    print(f"reproduce routerbench{' --quick' if args.quick else ''} --threads {args.threads}: wall {wall:.1f} s (target <= 300 s), "
          f"peak RSS {peak_gb:.2f} GB (target < 4 GB)")


if __name__ == "__main__":
    main()
