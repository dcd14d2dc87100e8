"""Quality–cost curve plots (PNG, matplotlib Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(panels: dict[str, list], path: str | Path, ncols: int = 3) -> Path:
    """One panel per key (title) with the curves of its SweepResults (label: strategy, AUC)."""
    path = Path(path)
    n = max(1, len(panels))
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (title, results) in zip(axes.flat, panels.items()):
        for res in results:
            style = "--" if res.strategy == "linear_interpolation" else "-"
            ax.plot(res.costs * 1e3, res.qualities, style, marker=".", ms=3,
                    label=f"{res.strategy} ({res.auc:.2f})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("mean cost per query (USD × 1e-3)", fontsize=8)
        ax.set_ylabel("mean quality", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
