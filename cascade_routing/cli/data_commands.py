"""`cascade-routing data ...`: list, fetch, describe and import datasets.

Each subcommand wraps a public function of :mod:`cascade_routing.data`:
``list`` -> :func:`~cascade_routing.data.list_datasets`, ``fetch`` -> :func:`~cascade_routing.data.fetch`,
``describe`` -> :func:`~cascade_routing.data.describe.summarize` of :func:`~cascade_routing.data.load_dataset`,
``import`` -> :func:`~cascade_routing.data.importer.import_table` + :meth:`RoutingDataset.save`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cascade_routing.cli.arguments import positive_int


def _console():
    from rich.console import Console

    return Console(width=120)


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from cascade_routing.data.registry import converted_path, list_datasets

    table = Table(title="Registered datasets (cascade-routing data fetch NAME)")
    for col in ("name", "description", "origin", "cached"):
        table.add_column(col, overflow="fold")
    for spec in list_datasets():
        cached = "yes" if (converted_path(spec.name) / "metadata.json").is_file() else "no"
        table.add_row(spec.name, spec.description, f"github.com/{spec.repo}@{spec.commit[:10]} ({len(spec.paths)} files)", cached)
    _console().print(table)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from cascade_routing.data import RoutingDataset, fetch

    folder = fetch(args.name, progress=not args.quiet, refresh=args.refresh)
    ds = RoutingDataset.load(folder)
    report = ds.metadata.get("conversion_report", {})
    print(f"{args.name}: {ds.num_queries} queries x {ds.num_models} models -> {folder}")
    if report.get("summary"):
        print(report["summary"])
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from cascade_routing.data import load_dataset
    from cascade_routing.data.describe import render_summary, summarize

    summary = summarize(load_dataset(args.dataset, progress=not args.quiet))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _console().print(render_summary(summary))
    return 0


def print_input_warnings(messages: list[str], where: str) -> None:
    """Each message of :mod:`cascade_routing.data.diagnostics` as a bold warning on stderr."""
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True)
    for msg in messages:
        err.print(f"[bold yellow]WARNING[/] {escape(where)}: {escape(msg)}")


def import_input_warnings(queries: list[str], max_length: int, truncation: str) -> list[str]:
    """Shared-prefix messages, plus input-collapse messages with the default encoder's tokenizer
    at ``max_length``/``truncation`` when that encoder is installed."""
    from cascade_routing.data import diagnostics

    messages = diagnostics.prefix_messages(queries, truncation=truncation)
    try:
        from cascade_routing.estimators import encoding

        tokenizer = encoding.load_tokenizer(encoding.default_encoder_path())
    except (ImportError, OSError):  # no transformers / encoder package: the text check alone
        return messages
    inputs = encoding.tokenize(queries, tokenizer, max_length, truncation)
    return diagnostics.input_warnings(queries, inputs, max_length, truncation, prefixes=False) + messages


def cmd_import(args: argparse.Namespace) -> int:
    """Import ``args.file`` with ``args.mapping`` and save it. Warnings about the data (costs far above
    their column's median, queries the encoder cannot tell apart) are printed after the summary as
    ``WARNING`` lines, not as Python warnings with a source line."""
    import warnings

    from cascade_routing.data.describe import render_summary, summarize
    from cascade_routing.data.importer import CostOutlierWarning, import_table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CostOutlierWarning)  # the same text is in the report's notes
        ds = import_table(args.file, args.mapping, name=args.name)
    messages = list(ds.metadata["conversion_report"]["notes"])
    try:  # before saving: a --max-length the tokenizer cannot use must not leave a folder behind
        messages += import_input_warnings(list(ds.queries), args.max_length, args.truncation)
    except ValueError as err:
        raise ValueError(f"--max-length {args.max_length}: {err}") from None
    out = Path(args.output) if args.output else Path(f"{Path(args.file).stem}-dataset")
    ds.save(out)
    _console().print(render_summary(summarize(ds)))
    from cascade_routing.data.registry import list_datasets

    # a bare registered name means the registered dataset (load_dataset), so the folder needs "./"
    ref = f"./{out}" if str(out) in {spec.name for spec in list_datasets()} else str(out)
    print(f"saved to {out} (load with cascade_routing.data.load_dataset({ref!r}))")
    print_input_warnings(messages, str(out))
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add this stage's subcommands (each sets `func`)."""
    from cascade_routing.data.diagnostics import DEFAULT_QUERY_TRUNCATION, TRUNCATIONS

    data = subparsers.add_parser("data", help="list, fetch, describe and import routing datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    p = sub.add_parser("list", help="the registered datasets and their public origins")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("fetch", help="download (or read CASCADE_ROUTING_DATA_DIR), verify, convert and cache")
    p.add_argument("name", help="a registered dataset name (see `data list`)")
    p.add_argument("--refresh", action="store_true", help="convert again even if a converted copy is cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("describe", help="per-model mean quality and cost, oracle quality, N, tasks")
    p.add_argument("dataset", help="a registered name or a saved dataset folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("import", help="a CSV/JSONL/Parquet table + column mapping -> a saved dataset folder")
    p.add_argument("file", help="the table (.csv, .jsonl/.ndjson or .parquet), one row per query")
    p.add_argument("--mapping", required=True,
                   help="YAML/JSON file or inline YAML/JSON: columns for query, models' quality/cost/... "
                        "(format: see cascade_routing.data.importer)")
    p.add_argument("--output", "-o", help="folder to write (default: <file stem>-dataset)")
    p.add_argument("--name", help="dataset name (default: mapping 'name' or the file stem)")
    p.add_argument("--max-length", type=positive_int, default=128,
                   help="query tokens the encoder will keep (data.max_length), for the distinct-inputs check "
                        "(default: %(default)s)")
    p.add_argument("--truncation", choices=TRUNCATIONS, default=DEFAULT_QUERY_TRUNCATION,
                   help="query truncation the encoder will use (data.truncation), for the distinct-inputs check "
                        "(default: %(default)s)")
    p.set_defaults(func=cmd_import)
