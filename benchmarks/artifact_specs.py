"""``--artifact NAME=PATH`` and ``--seeds`` options, calibration-half folds and summary files of the
benchmarks that compare trained artifacts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def add_artifact_option(parser: argparse.ArgumentParser) -> None:
    """A repeatable ``--artifact NAME=PATH`` (required)."""
    parser.add_argument("--artifact", action="append", required=True, metavar="NAME=PATH",
                        help="a trained artifact and the name it is reported under (repeatable)")


def artifact_specs(parser: argparse.ArgumentParser, specs: list[str]) -> list[tuple[str, str]]:
    """[(name, path)] from ``--artifact`` values; a parser error names a value that is not NAME=PATH."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--artifact must be NAME=PATH, got {spec!r}")
        out.append((name, path))
    return out


def add_seeds_option(parser: argparse.ArgumentParser, default: int) -> None:
    """``--seeds N`` (N >= 1): random halvings of the calibration split."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        return value

    parser.add_argument("--seeds", type=count, default=default, help="random halvings of the calibration split")


def calibration_folds(data, cost_estimator, seeds: int, per_pair: int = 3):
    """``(fit, score, budgets)`` for both folds of ``seeds`` random halvings of the calibration rows
    (``calibration_halves`` of the export): λ is fitted on ``fit`` and scored on ``score`` at
    ``per_pair`` budgets per pair of non-dominated models of the scored half, above what the policies
    can reach on the split and at least the fit half's cheapest model's mean cost."""
    from cascade_routing.calibration.lambda_tables import min_reachable_budget
    from cascade_routing.calibration.selection import calibration_halves, score_budgets

    floor = min_reachable_budget(cost_estimator, data.cost) * (1 + 1e-6)
    for seed in range(seeds):
        for fit, score in calibration_halves(data.quality.shape[0], seed):
            yield fit, score, np.maximum(score_budgets(data, score, per_pair, 0, floor), data.cost[fit].mean(0).min())


def with_earlier_results(out: str | Path, results: dict) -> dict:
    """``results`` after the entries of ``<out>/summary.json`` that were not rerun (an artifact name
    rerun replaces its earlier entry in place; new names come last), so one artifact can be
    re-measured without rerunning the others."""
    path = Path(out) / "summary.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    merged = {name: results.get(name, entry) for name, entry in earlier.items()}
    merged.update({name: entry for name, entry in results.items() if name not in merged})
    return merged


def write_summary(out: str | Path, results: dict, table: str) -> None:
    """``<out>/summary.json`` (``results``) and ``<out>/summary.md`` (``table``), and print the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(table)
    print(table)
