"""Quality–cost curve plots (matplotlib Agg backend), written as PNG and SVG.

Each curve is drawn through its per-budget points (mean test cost, mean test quality) on a log
cost axis, with a shaded 95% bootstrap band on the mean quality (:func:`points.quality_band`).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from cascade_routing.evaluation.points import quality_band  # noqa: E402


def _minor_label(x: float, _pos: int) -> str:
    """A label for a minor tick of a log axis at 2 or 5 times a power of ten, else none."""
    if x <= 0:
        return ""
    exponent = math.floor(math.log10(x))
    mantissa = round(x / 10.0**exponent)
    return f"${mantissa}\\times10^{{{exponent}}}$" if mantissa in (2, 5) else ""


def _label_minor_ticks(ax) -> None:
    """Label the log cost axis's minor ticks at 2× and 5× only, and only when it spans under two
    decades (matplotlib's default labels every minor tick of a short axis, and they overlap)."""
    low, high = ax.get_xlim()
    wide = low > 0 and high / low >= 100
    ax.xaxis.set_minor_formatter(NullFormatter() if wide else FuncFormatter(_minor_label))


def auc_text(auc: float) -> str:
    """An AUC as the tables print it: the 3-decimal value stored in ``results.csv``, shown to 2 decimals
    (so a legend, a table and the CSV never disagree)."""
    return f"{round(float(auc), 3):.2f}"


def plot_curves(panels: dict[str, list], path: str | Path, ncols: int = 3, num_resamples: int = 200,
                seed: int = 0, title: str | None = None) -> list[Path]:
    """One panel per key (title) with the curves of its SweepResults (label: strategy, AUC), the
    figure titled ``title`` if given. A curve whose points all cost the same (one non-dominated model)
    draws its band as an error bar, which a shaded band of zero width would not show.

    Writes ``path`` with suffix ``.png`` and ``.svg``; returns both paths.
    """
    path = Path(path)
    n = max(1, len(panels))
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (panel, results) in zip(axes.flat, panels.items()):
        for res in results:
            style = "--" if res.strategy == "linear_interpolation" else "-"
            (line,) = ax.plot(res.costs, res.qualities, style, marker=".", ms=3,
                              label=f"{res.strategy} (AUC {auc_text(res.auc)})")
            low, high = quality_band(res.per_query_quality, num_resamples, seed)
            if np.ptp(np.asarray(res.costs, dtype=np.float64)) > 0:
                ax.fill_between(res.costs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
            else:
                q = np.asarray(res.qualities, dtype=np.float64)
                ax.errorbar(res.costs, q, yerr=np.clip([q - low, high - q], 0, None), fmt="none",
                            color=line.get_color(), alpha=0.5, capsize=3)
        ax.set_xscale("log")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("mean cost per query (USD, log scale)", fontsize=8)
        ax.set_ylabel("mean quality (95% bootstrap band)", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        _label_minor_ticks(ax)
        ax.legend(fontsize=6, loc="best")  # where it hides the fewest points (lower right covered some)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.with_suffix(".png"), path.with_suffix(".svg")]
    fig.savefig(out[0], dpi=120)
    fig.savefig(out[1])
    plt.close(fig)
    return out
