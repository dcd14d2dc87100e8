"""The paper's RouterBench experiment (Table 1, synthetic estimators), on RouterBench or any dataset.

Pools (:func:`default_pools`): the user's, else on RouterBench the paper's ({mixtral-8x7b,
gpt-3.5-turbo-1106, gpt-4-1106}, {WizardLM-13B, mixtral-8x7b, gpt-3.5-turbo-1106, claude-v2,
gpt-4-1106}, all 11 models), else the dataset's non-dominated models (by mean cost and quality over
all its queries) and all its models.
Protocol: for each pool and noise level (low / medium / high),
split the queries 5% fit / 95% test (seeded, stratified by task), build the synthetic estimators
(noise recalibrated on the fit rows), and for each strategy (linear interpolation, routing, threshold
cascade, optimal cascade, cascade routing with max_depth 5, force_order off, one constant λ and no
routing guard: the paper's method) sweep the budgets, refitting λ per budget on the fit rows; report AUC (×100) with a bootstrap 95% CI.
Writes ``results.csv``, ``table.md`` and ``curves.png``/``.svg`` into the output folder; the table's
title names the dataset.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cascade_routing.evaluation.protocol import PAPER_BUDGETS_PER_PAIR, PAPER_NUM_RESAMPLES
from cascade_routing.evaluation.synthetic import synthetic_estimators
from cascade_routing.evaluation.metrics import nondominated_models, sweep_budgets
from cascade_routing.evaluation.plots import plot_curves
from cascade_routing.evaluation.sweep import SweepResult, budget_sweep, linear_interpolation_sweep
from cascade_routing.policies.registry import make_policy

PAPER_POOLS: dict[str, list[str]] = {
    "3 models": ["mixtral-8x7b", "gpt-3.5-turbo-1106", "gpt-4-1106"],
    "5 models": ["WizardLM-13B", "mixtral-8x7b", "gpt-3.5-turbo-1106", "claude-v2", "gpt-4-1106"],
    "11 models": [],  # all models of the dataset
}
NOISE_LEVELS = ("low", "medium", "high")
STRATEGIES = ("linear_interpolation", "routing", "threshold_cascade", "optimal_cascade", "cascade_routing")
MIN_FIT_ROWS = 2  # the synthetic estimators' linear recalibration fits a slope and an intercept


def resolve_models(available: list[str], wanted: list[str]) -> list[str]:
    """Map short names to dataset names: an exact match, else the unique name starting with it."""
    out = []
    for w in wanted:
        if w in available:
            out.append(w)
            continue
        hits = [a for a in available if a.startswith(w)]
        if len(hits) != 1:
            raise ValueError(f"model {w!r} matches {hits or 'nothing'} among the dataset's models {available}")
        out.append(hits[0])
    return out


def default_pools(dataset) -> dict[str, list[str]]:
    """The paper's pools when every one of their models is in ``dataset`` (RouterBench), else
    ``{"non-dominated (k)": those models, "all (M)": []}`` (one pool when all models are non-dominated,
    or when only one is: a pool needs two models, :func:`check_pool`)."""
    try:
        for wanted in PAPER_POOLS.values():
            resolve_models(list(dataset.models), wanted)
        return dict(PAPER_POOLS)
    except ValueError:
        pass
    nd = nondominated_models(dataset.cost.mean(0), dataset.quality.mean(0))
    pools = {}
    if 2 <= len(nd) < len(dataset.models):
        pools[f"non-dominated ({len(nd)})"] = [dataset.models[i] for i in sorted(nd)]
    pools[f"all ({len(dataset.models)})"] = []
    return pools


def parse_pool(text: str) -> tuple[str, list[str]]:
    """``NAME=model,model,...`` (names or unique prefixes) -> (NAME, models); ``model,...`` names itself.
    A pool of fewer than two different models is a ``ValueError`` naming it (:func:`check_pool`)."""
    name, _, models = text.rpartition("=")
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise ValueError(f"pool {text!r} lists no models (expected NAME=model,model,...)")
    name = name.strip() or f"{len(names)} models"
    check_pool(name, names)
    return name, names


def check_pool(name: str, models: list[str]) -> None:
    """``ValueError`` naming pool ``name`` unless ``models`` holds at least two different models: with
    one there is no cost to trade off (no budget between models, no AUC)."""
    distinct = list(dict.fromkeys(models))
    if len(distinct) < 2:
        raise ValueError(f"pool {name!r} has {len(distinct)} model{'' if len(distinct) == 1 else 's'} "
                         f"({','.join(distinct) or 'none'}); a pool needs at least two models: routing, "
                         "cascades and their AUC trade cost between models (NAME=model,model,...)")


def parse_pools(texts: list[str]) -> dict[str, list[str]]:
    """Each ``--pool`` text by :func:`parse_pool`, as name -> models; a name given twice (an unnamed
    pool is named by its size, so two unnamed pools of one size share one) is a ``ValueError``."""
    pools: dict[str, list[str]] = {}
    for text in texts:
        name, models = parse_pool(text)
        if name in pools:
            raise ValueError(f"two pools are named {name!r} ({','.join(pools[name])} and {','.join(models)}); "
                             "give each its own name: NAME=model,model,...")
        pools[name] = models
    return pools


def checked_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, or ``ValueError`` naming the device when it is not a device name or
    this torch build cannot use it (a CUDA device on a CPU-only build or a machine without a GPU,
    an index past the GPUs there are, MPS where it is unavailable)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device name ({err})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'none'}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available; use cpu")
    return dev


@dataclass
class ReproduceResult:
    rows: list[dict]
    curves: dict[str, list[SweepResult]]
    seconds: float
    out_dir: Path | None


def reproduce_routerbench(
    out_dir: str | Path | None = "reproduce_routerbench",
    dataset=None,
    pools: dict[str, list[str]] | None = None,
    noise_levels: tuple[str, ...] = NOISE_LEVELS,
    strategies: tuple[str, ...] = STRATEGIES,
    fit_fraction: float = 0.05,
    budgets_per_pair: int = PAPER_BUDGETS_PER_PAIR,
    num_resamples: int = PAPER_NUM_RESAMPLES,
    num_samples: int = 128,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    console=None,
    device: str = "cpu",
) -> ReproduceResult:
    """Run the protocol (module docstring); ``quick``: first pool and low noise only, 4 budgets per
    pair, 100 bootstrap resamples (at most ``num_resamples``). ``dataset``: a RoutingDataset, or a
    name or folder for :func:`~cascade_routing.data.load_dataset` (default: ``routerbench-subset``);
    ``pools``: name -> models (an empty list: all models), default :func:`default_pools`.
    ``device``: where the synthetic estimators' tables live; the engine follows them (``ValueError``
    if this torch cannot use it: :func:`checked_device`). ``budgets_per_pair`` and ``num_resamples``
    below 1 are a ValueError before any work, and so are a pool of fewer than two different models
    (:func:`check_pool`, naming the pool) and a dataset too small for a fit split of
    :data:`MIN_FIT_ROWS` rows at ``fit_fraction`` (naming its rows, the fraction and the rows that make
    one)."""
    from cascade_routing.data.splits import partition_indices
    from cascade_routing.evaluation.protocol import check_settings

    check_settings(budgets_per_pair, num_resamples)
    device = str(checked_device(device))
    t0 = time.perf_counter()
    if dataset is None or isinstance(dataset, (str, Path)):
        from cascade_routing.data import load_dataset

        dataset = load_dataset(str(dataset or "routerbench-subset"))
    pools = dict(default_pools(dataset) if pools is None else pools)
    if quick:
        pools = dict(list(pools.items())[:1])
        noise_levels = noise_levels[:1]
        budgets_per_pair = min(budgets_per_pair, 4)
        num_resamples = min(num_resamples, 100)
    resolved: dict[str, list[str]] = {}
    for pool_name, wanted in pools.items():
        resolved[pool_name] = resolve_models(dataset.models, wanted) if wanted else list(dataset.models)
        check_pool(pool_name, resolved[pool_name])
    split = partition_indices(dataset.num_queries, {"fit": fit_fraction, "test": 1 - fit_fraction},
                              groups=dataset.tasks, seed=seed)
    fit_rows, test_rows = split["fit"], split["test"]
    if fit_rows.size < MIN_FIT_ROWS:
        raise ValueError(
            f"dataset {dataset.name!r} has {dataset.num_queries} rows and the fit split is {fit_fraction * 100:g}% "
            f"of them ({fit_rows.size} row{'' if fit_rows.size == 1 else 's'}), but the synthetic estimators' linear "
            f"recalibration needs at least {MIN_FIT_ROWS} fit rows: use a dataset of at least "
            f"{math.ceil(MIN_FIT_ROWS / fit_fraction)} rows ({MIN_FIT_ROWS} fit rows at {fit_fraction * 100:g}%) "
            "or a larger fit_fraction")
    jobs = [(p, n, s) for p in pools for n in noise_levels for s in strategies]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"reproduce on {dataset.name}", unit="sweep")
    rows: list[dict] = []
    curves: dict[str, list[SweepResult]] = {}
    for pool_name, names in resolved.items():
        _sweep_pool(pool_name, dataset.select_models(names), noise_levels, strategies, fit_rows, test_rows,
                    budgets_per_pair, num_resamples, num_samples, seed, device, rows, curves, bar)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    out = None if out_dir is None else _write_outputs(Path(out_dir), rows, curves, num_resamples, seed)
    print_table(rows, console, dataset.name)
    return ReproduceResult(rows, curves, seconds, out)


def _sweep_pool(pool_name: str, data, noise_levels: tuple[str, ...], strategies: tuple[str, ...], fit_rows,
                test_rows, budgets_per_pair: int, num_resamples: int, num_samples: int, seed: int, device: str,
                rows: list[dict], curves: dict[str, list[SweepResult]], bar=None) -> None:
    """Every (noise level, strategy) sweep of one model pool (``data``: the dataset restricted to
    it), at budgets spread over its test split's non-dominated models; appends one table row each to
    ``rows`` and the sweeps to ``curves["<pool>, <noise> noise"]``."""
    test_q, test_c = data.quality[test_rows], data.cost[test_rows]
    budgets = sweep_budgets(test_c.mean(0), test_q.mean(0), budgets_per_pair)
    for noise in noise_levels:
        qe, ce = synthetic_estimators(data, noise, fit_rows, seed)
        qe.to(device), ce.to(device)
        panel = curves.setdefault(f"{pool_name}, {noise} noise", [])
        for strategy in strategies:
            t1 = time.perf_counter()
            res = _sweep(strategy, qe, ce, data, fit_rows, test_rows, budgets, num_resamples, num_samples, seed)
            panel.append(res)
            rows.append({"pool": pool_name, "models": data.num_models, "noise": noise, "strategy": strategy,
                         "auc": round(res.auc, 3), "ci_low": round(res.ci[0], 3), "ci_high": round(res.ci[1], 3),
                         "budgets": len(budgets), "raised_budgets": res.raised_budgets,
                         "seconds": round(time.perf_counter() - t1, 2)})
            if bar is not None:
                bar.update(1)


def _sweep(strategy: str, qe, ce, data, fit_rows, test_rows, budgets: np.ndarray, num_resamples: int,
           num_samples: int, seed: int) -> SweepResult:
    """One cell of the table: the linear interpolation of the test split's models, or ``strategy``
    (one constant λ, no routing guard, the budget met on the fit rows: the paper's policies) with λ
    fitted per budget on ``fit_rows`` and simulated on ``test_rows``."""
    if strategy == "linear_interpolation":
        return linear_interpolation_sweep(data.quality[test_rows], data.cost[test_rows], budgets, num_resamples, seed)
    policy = make_policy(strategy, num_samples, seed, step_ratios=None, routing_guard=False)
    return budget_sweep(policy, qe, ce, data.quality, data.cost, fit_rows, test_rows, budgets,
                        texts=data.queries, strategy=strategy, num_resamples=num_resamples, seed=seed,
                        overshoot_correction=False)


def _write_outputs(out: Path, rows: list[dict], curves: dict[str, list[SweepResult]], num_resamples: int,
                   seed: int) -> Path:
    """``results.csv``, ``table.md`` and ``curves.png`` (+ ``.svg``) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "table.md").write_text(format_table_markdown(rows))
    plot_curves(curves, out / "curves.png", num_resamples=num_resamples, seed=seed)
    return out


def _table_cells(rows: list[dict]):
    cols = []
    for r in rows:
        key = (r["pool"], r["noise"])
        if key not in cols:
            cols.append(key)
    strategies = []
    for r in rows:
        if r["strategy"] not in strategies:
            strategies.append(r["strategy"])
    cell = {(r["strategy"], r["pool"], r["noise"]): r for r in rows}
    return cols, strategies, cell


def format_table_markdown(rows: list[dict]) -> str:
    """Table 1 layout: one row per strategy, one column per (pool, noise); AUC [95% CI]."""
    cols, strategies, cell = _table_cells(rows)
    head = "| strategy | " + " | ".join(f"{p}, {n}" for p, n in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    lines = [head, sep]
    for s in strategies:
        vals = []
        for p, n in cols:
            r = cell.get((s, p, n))
            vals.append("" if r is None else f"{r['auc']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]")
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], console=None, dataset: str = "routerbench-subset") -> None:
    from rich.console import Console
    from rich.table import Table

    cols, strategies, cell = _table_cells(rows)
    table = Table(title=f"{dataset}, synthetic estimators: AUC ×100 (95% bootstrap CI)")
    table.add_column("strategy")
    for p, n in cols:
        table.add_column(f"{p}\n{n}", justify="right")
    for s in strategies:
        vals = []
        for p, n in cols:
            r = cell.get((s, p, n))
            best = r is not None and r["auc"] == max(cell[(t, p, n)]["auc"] for t in strategies if (t, p, n) in cell)
            txt = "" if r is None else f"{r['auc']:.2f}\n[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            vals.append(f"[bold]{txt}[/bold]" if best else txt)
        table.add_row(s, *vals)
    (console or Console(width=max(120, 24 + 18 * len(cols)))).print(table)
