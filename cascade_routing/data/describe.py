"""A readable summary of a dataset: per-model mean quality and cost, oracle quality, N, tasks."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.data.diagnostics import shared_prefixes


def summarize(ds: RoutingDataset) -> dict[str, Any]:
    """Summary numbers.

    - ``models``: per model (cheapest first, the dataset's order) ``mean_quality`` = mean_i y[i, m],
      ``mean_cost`` = mean_i c[i, m] (USD per query), ``best_on`` = share of queries where the model
      attains the row maximum of quality;
    - ``oracle_quality`` = mean_i max_m y[i, m] (an oracle router that knows every outcome),
      ``oracle_cost`` = mean cost of that oracle choosing the cheapest model among the best;
    - ``num_queries``, ``num_models``, ``tasks`` (label -> count), ``features``, ``has_responses``;
    - ``shared_prefixes``: groups of queries opening with the same long text (``count``, ``length`` in
      characters; :func:`cascade_routing.data.diagnostics.shared_prefixes`), e.g. a few-shot prompt.
    """
    q, c = ds.quality, ds.cost
    best = q.max(axis=1)
    is_best = q >= best[:, None]
    cheapest_best = np.argmax(is_best, axis=1)  # models are cheapest first
    return {
        "name": ds.name,
        "num_queries": ds.num_queries,
        "num_models": ds.num_models,
        "models": [
            {"model": m, "mean_quality": float(q[:, j].mean()), "mean_cost": float(c[:, j].mean()),
             "best_on": float(is_best[:, j].mean())}
            for j, m in enumerate(ds.models)
        ],
        "oracle_quality": float(best.mean()),
        "oracle_cost": float(c[np.arange(ds.num_queries), cheapest_best].mean()),
        "tasks": dict(sorted(Counter(ds.tasks).items())) if ds.tasks is not None else {},
        "features": sorted(ds.features),
        "has_responses": ds.responses is not None,
        "cost_source": ds.metadata.get("cost_source"),
        "shared_prefixes": [{"count": g.count, "length": g.length} for g in shared_prefixes(list(ds.queries))],
    }


def render_summary(summary: dict[str, Any]) -> Any:
    """A ``rich`` renderable (table and a caption) for :func:`summarize`'s output."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{summary['name']}: {summary['num_queries']} queries x {summary['num_models']} models "
                        "(cheapest first)")
    table.add_column("#", justify="right")
    table.add_column("model")
    table.add_column("mean quality", justify="right")
    table.add_column("mean cost (USD)", justify="right")
    table.add_column("best on", justify="right")
    for j, row in enumerate(summary["models"]):
        table.add_row(str(j), row["model"], f"{row['mean_quality']:.4f}", f"{row['mean_cost']:.3e}",
                      f"{100 * row['best_on']:.1f}%")
    table.add_section()
    table.add_row("", "oracle (best model per query)", f"{summary['oracle_quality']:.4f}",
                  f"{summary['oracle_cost']:.3e}", "")
    tasks = summary["tasks"]
    lines = [f"N = {summary['num_queries']}"]
    if tasks:
        shown = ", ".join(f"{k} ({v})" for k, v in list(tasks.items())[:12])
        more = f", ... {len(tasks) - 12} more" if len(tasks) > 12 else ""
        lines.append(f"tasks ({len(tasks)}): {shown}{more}")
    lines.append(f"features: {', '.join(summary['features']) or 'none'}; responses: "
                 f"{'yes' if summary['has_responses'] else 'no'}")
    if summary.get("shared_prefixes"):
        groups = "; ".join(f"{g['count']:,} start with the same {g['length']:,} characters"
                           for g in summary["shared_prefixes"])
        lines.append(f"shared query prefixes: {groups} (see data.truncation)")
    if summary.get("cost_source"):
        lines.append(f"cost source: {summary['cost_source']}")
    return Group(table, Text("\n".join(lines)))
