"""``--artifact NAME=PATH`` options and summary files of the benchmarks that compare trained artifacts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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
