"""Wall time, CPU time and peak memory of ``cascade-routing reproduce routerbench`` (the full Table 1 protocol).

Runs the command in a child process and reads its CPU time (user + sys) and peak RSS from
``getrusage(RUSAGE_CHILDREN)``; CPU time is the figure to compare on a shared machine (wall time
grows with the load average, which is printed next to it).
Usage: ``python benchmarks/bench_reproduce.py [--quick] [--out DIR]``
"""

from __future__ import annotations

import argparse
import os
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
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {proc.stderr[-2000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_gb = usage.ru_maxrss / 1024**2  # kB on Linux
    cpu = usage.ru_utime + usage.ru_stime
    print(proc.stdout[-4000:])
    print(f"reproduce routerbench{' --quick' if args.quick else ''} --threads {args.threads}: wall {wall:.1f} s, "
          f"CPU {cpu:.1f} s (user+sys), peak RSS {peak_gb:.2f} GB; load average before/after "
          f"{load0:.2f}/{os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
