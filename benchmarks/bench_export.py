"""Time of the artifact export (calibration tables, uncertainty selection, λ tables) of a checkpoint.

Runs ``cascade-routing export --ckpt CKPT`` in a child process and reads ``export_seconds`` (the
export itself, without loading the checkpoint and data) and, where the artifact records them, the
seconds of its steps (uncertainty tables, uncertainty selection, λ tables) from the written artifact, next to the
command's wall and CPU time and the load average. ``--baseline-src DIR`` (a checkout of another
revision, e.g. ``git archive main | tar -x -C DIR``) first exports the same checkpoint with DIR's
code (``PYTHONPATH=DIR``) in the same session, then prints the ratios and whether both artifacts
carry the same export results (:mod:`compare_artifacts`; the covariance table on the ran-sets both hold,
and how many each holds). ``--json PATH`` writes the figures.
Usage: ``python benchmarks/bench_export.py --ckpt runs/routerbench/checkpoints/best.ckpt [--baseline-src DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reproduce import run  # noqa: E402
from compare_artifacts import differences, held_ran_sets  # noqa: E402

from cascade_routing.estimators.artifact import load_artifact  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--baseline-src", default=None, help="checkout of the revision to compare against")
    ap.add_argument("--out", default=None, help="folder for the artifacts (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_export_"))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = str(Path(args.ckpt).resolve())
    figures: dict = {"command": f"cascade-routing export --ckpt {args.ckpt}", "cpus": os.cpu_count()}
    runs = ([("baseline", args.baseline_src)] if args.baseline_src else []) + [("this", None)]
    arts = {}
    for name, src in runs:
        path = out / f"{name}.safetensors"
        res = run([sys.executable, "-m", "cascade_routing", "export", "--ckpt", ckpt, "--out", str(path)], src)
        res.pop("stdout")
        arts[name] = load_artifact(path)
        res["export_s"] = arts[name].metrics.get("export_seconds")
        res["selection_s"] = arts[name].uncertainty_selection.get("seconds")
        res["uncertainty_tables_s"] = arts[name].metrics.get("uncertainty_tables_seconds")  # None where not recorded
        res["lambda_tables_s"] = arts[name].metrics.get("lambda_tables_seconds")
        if arts[name].covariances is not None:
            res["covariance_sets"] = int(held_ran_sets(arts[name]).sum())
        figures[name] = res
        print(f"{name}: export {res['export_s']} s (uncertainty tables {res['uncertainty_tables_s']} s, selection "
              f"{res['selection_s']} s, λ tables {res['lambda_tables_s']} s) of a "
              f"{res['wall_s']} s command, CPU {res['cpu_s']} s; load before/after "
              f"{res['load_before']}/{res['load_after']}; uncertainty {arts[name].uncertainty}; covariances for "
              f"{res.get('covariance_sets')} ran-sets")
    if args.baseline_src:
        diff = differences(arts["baseline"], arts["this"])
        figures.update({"export_ratio": round(figures["baseline"]["export_s"] / figures["this"]["export_s"], 2),
                        "cpu_ratio": round(figures["baseline"]["cpu_s"] / figures["this"]["cpu_s"], 2),
                        "same_results": not diff, "differences": diff})
        print(f"baseline / this: export {figures['export_ratio']}x, command CPU {figures['cpu_ratio']}x; "
              + ("identical export results" if not diff else f"results differ in: {', '.join(diff)}"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
