"""Quality–cost curve plots (matplotlib Agg backend), written as PNG and SVG.

Each curve is drawn through its per-budget points (mean test cost, mean test quality) on a log
cost axis, with a shaded 95% bootstrap band on the mean quality (:func:`points.quality_band`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cascade_routing.evaluation.points import quality_band  # noqa: E402


def plot_curves(panels: dict[str, list], path: str | Path, ncols: int = 3, num_resamples: int = 200,
                seed: int = 0) -> list[Path]:
    """One panel per key (title) with the curves of its SweepResults (label: strategy, AUC).

    Writes ``path`` with suffix ``.png`` and ``.svg``; returns both paths.
    """
    path = Path(path)
    n = max(1, len(panels))
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (title, results) in zip(axes.flat, panels.items()):
        for res in results:
            style = "--" if res.strategy == "linear_interpolation" else "-"
            (line,) = ax.plot(res.costs, res.qualities, style, marker=".", ms=3,
                              label=f"{res.strategy} ({res.auc:.2f})")
            low, high = quality_band(res.per_query_quality, num_resamples, seed)
            ax.fill_between(res.costs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("mean cost per query (USD, log scale)", fontsize=8)
        ax.set_ylabel("mean quality (95% bootstrap band)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.with_suffix(".png"), path.with_suffix(".svg")]
    fig.savefig(out[0], dpi=120)
    fig.savefig(out[1])
    plt.close(fig)
    return out
