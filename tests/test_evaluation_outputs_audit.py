"""What ``evaluate`` writes and prints on a user's OWN data (a CSV imported with ``data import``, 3 models,
a tiny artifact trained with ``train.py fit``), checked from the written files alone:

- ``evaluation.json`` says what the numbers are (dataset, split sizes, settings, budgets, units) and
  carries the test split's single-model points, so every AUC in ``results.csv`` is recomputed here
  from ``points.csv`` with an implementation of the paper's AUC of this file's own;
- ``table.md`` and the printed table carry the same caption and the same numbers as ``results.csv``;
- on data where the cheapest model is also the best (one non-dominated model) ``points.csv`` has one
  point per strategy, not copies of it, the outputs hold no NaN and a note says why every AUC is equal;
- the plot's bands are ``points.csv``'s (the evaluation's resamples and seed), its legend says which
  number is the AUC, the figure title is the one given, and a one-point curve still shows its band;
- a per-budget comparison refuses sweeps whose budgets differ, however small the budgets are.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from estimators_helpers import WORDS, fit_tiny_artifact, make_tiny_encoder

MODELS = ["cheap", "mid", "big"]
PRICE = [1e-4, 1e-3, 1e-2]  # USD per query (times a per-query factor in [0.5, 1.5])


def _write_runs(path: Path, p_ok: list[float], n: int = 150, seed: int = 0) -> None:
    """A user's table: per query and model correct or not, the USD cost and the answer."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["question", "subject", *[f"{m}_{k}" for m in MODELS for k in ("ok", "usd", "text")]])
        for i in range(n):
            t = i % 3
            row = [f"task{t} " + " ".join(rng.choice(WORDS[:40]) for _ in range(6)) + f" q{i}", f"task{t}"]
            for j in range(len(MODELS)):
                ok = rng.random() < p_ok[j]
                row += [str(ok).lower(), repr(PRICE[j] * rng.uniform(0.5, 1.5)),
                        "answer yes alpha" if ok else "answer no beta"]
            out.writerow(row)


def _import(tmp: Path, name: str, p_ok: list[float]) -> Path:
    from cascade_routing.data.importer import import_table

    _write_runs(tmp / f"{name}.csv", p_ok)
    mapping = {"query": "question", "task": "subject", "models": MODELS, "quality": "{model}_ok",
               "cost": "{model}_usd", "response": "{model}_text"}
    import_table(tmp / f"{name}.csv", mapping).save(tmp / name)
    return tmp / name


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A tiny artifact trained on an imported 3-model table (1 epoch); the evaluation of it (seed 3,
    not the default, so a band drawn with another seed would show), and a second table with the same
    models in which the cheapest model is the best."""
    tmp = tmp_path_factory.mktemp("evalout")
    data = _import(tmp, "my-data", [0.4, 0.6, 0.8])
    dominated = _import(tmp, "cheap-wins", [0.9, 0.5, 0.6])
    # evaluate refits λ per budget and takes the artifact's uncertainty: the export's λ tables and
    # uncertainty selection are not needed here (a faster test)
    artifact = fit_tiny_artifact(tmp, data, make_tiny_encoder(tmp / "encoder"), callbacks=[
        {"class_path": "cascade_routing.training.export.ExportArtifact",
         "init_args": {"path": "artifacts/{name}.safetensors", "fit_lambdas": False, "select_uncertainty": False}}])
    from cascade_routing.training.heldout import evaluate

    result = evaluate(str(artifact), out_dir=str(tmp / "eval"), budgets_per_pair=3, num_resamples=40,
                      cache_dir=str(tmp / "cache"), progress=False, log_wandb=False, seed=3)
    return {"tmp": tmp, "artifact": artifact, "result": result, "out": tmp / "eval", "cheap_wins": dominated}


def _paper_auc(costs, qualities, c_min: float, c_max: float, q_lowest: float) -> float:
    """The paper's AUC (x100) written out independently: the piecewise-linear curve through the points
    sorted by cost, starting at (c_min, q_lowest) when every point costs more than c_min, flat right of
    the last point, integrated exactly (trapezoids between breakpoints) over [c_min, c_max]."""
    pts = sorted(zip(costs, qualities), key=lambda p: p[0])
    if pts[0][0] > c_min:
        pts = [(c_min, q_lowest)] + pts

    def value(x: float) -> float:
        if x <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 <= x <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return pts[-1][1]

    xs = sorted({c_min, c_max, *(x for x, _ in pts if c_min < x < c_max)})
    area = sum((b - a) * (value(a) + value(b)) / 2 for a, b in zip(xs, xs[1:]))
    return 100 * area / (c_max - c_min)


def test_every_auc_is_recomputed_from_the_folder_alone(own):
    out = own["out"]
    desc = json.loads((out / "evaluation.json").read_text())
    points, results = _rows(out / "points.csv"), _rows(out / "results.csv")
    test = own["result"].extra
    # the file describes the split and the settings the numbers come from
    assert desc["split"] == "test" and desc["test_queries"] == test["test_quality"].shape[0]
    assert desc["dataset"].endswith("my-data") and desc["num_resamples"] == 40 and desc["seed"] == 3
    assert {"budget", "mean_cost", "mean_quality", "auc"} <= set(desc["units"]) and "USD" in desc["units"]["budget"]
    assert [m["model"] for m in desc["models"]] == MODELS
    assert np.allclose([m["test_mean_cost"] for m in desc["models"]], test["test_cost"].mean(0))
    ref = desc["auc_reference"]
    assert ref["c_max"] == max(m["test_mean_cost"] for m in desc["models"])
    assert ref["q_lowest"] == min(m["test_mean_quality"] for m in desc["models"])
    assert len(results) == 1 + 2 * 4
    for row in results:
        mine = [p for p in points if (p["estimator"], p["strategy"]) == (row["estimator"], row["strategy"])]
        assert [float(p["budget"]) for p in mine] == pytest.approx(desc["budgets"], rel=1e-12)
        auc = _paper_auc([float(p["mean_cost"]) for p in mine], [float(p["mean_quality"]) for p in mine],
                         ref["c_min"], ref["c_max"], ref["q_lowest"])
        assert abs(auc - float(row["auc"])) <= 5e-4 + 1e-9, (row, auc)  # results.csv keeps 3 decimals
        assert float(row["ci_low"]) <= float(row["auc"]) <= float(row["ci_high"])


def test_table_md_and_the_printed_table_carry_the_caption_and_the_csv_numbers(own, capsys):
    from cascade_routing.training.heldout import print_table

    out, res = own["out"], own["result"]
    desc = json.loads((out / "evaluation.json").read_text())
    table = (out / "table.md").read_text()
    caption = table.splitlines()[0]
    assert caption == desc["caption"]
    assert "test split" in caption and f"({desc['test_queries']} queries" in caption and "AUC ×100" in caption
    for row in _rows(out / "results.csv"):
        cells = f"| {row['estimator']} | {row['strategy']} | {float(row['auc']):.2f} | " \
                f"[{float(row['ci_low']):.2f}, {float(row['ci_high']):.2f}] |"
        assert cells in table, cells
    print_table(res.rows, res.estimator_metrics, res.config["dataset"], caption=desc["caption"])
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps the title
    assert desc["caption"] in printed


def test_a_cheapest_best_model_gives_one_point_per_strategy_and_a_note(own, tmp_path, monkeypatch, capsys):
    from cascade_routing.cli import main

    monkeypatch.setenv("CASCADE_ROUTING_CACHE_DIR", str(own["tmp"] / "cache"))
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(own["artifact"]), "--dataset", str(own["cheap_wins"]),
                 "--out", str(out), "--budgets-per-pair", "3", "--resamples", "30", "--no-wandb"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    points, results = _rows(out / "points.csv"), _rows(out / "results.csv")
    keys = [(p["estimator"], p["strategy"], p["budget"]) for p in points]
    assert len(keys) == len(set(keys)) == len(results)  # one point per curve, not the same point twice
    desc = json.loads((out / "evaluation.json").read_text())
    assert len(desc["budgets"]) == 1 and [m["nondominated"] for m in desc["models"]] == [True, False, False]
    cheap = desc["models"][0]["test_mean_quality"]
    assert {float(r["auc"]) for r in results} == {round(100 * cheap, 3)}
    assert len(desc["notes"]) == 1 and "cheap is the cheapest model" in desc["notes"][0]
    assert "note: cheap is the cheapest model on the test split and also the best on average" in printed
    for name in ("results.csv", "points.csv", "table.md", "evaluation.json", "estimator_metrics.json"):
        assert "nan" not in (out / name).read_text().lower(), name


def _capture_figures(monkeypatch) -> list:
    import cascade_routing.evaluation.plots as plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", lambda fig=None: figures.append(fig))
    return figures


def test_the_plot_draws_points_csv_bands_and_labels_the_auc(own, tmp_path, monkeypatch):
    from matplotlib.collections import PolyCollection

    from cascade_routing.training.heldout import write_outputs

    figures = _capture_figures(monkeypatch)
    write_outputs(own["result"], tmp_path / "again")
    (fig,) = figures
    points = _rows(own["out"] / "points.csv")
    results = {(r["estimator"], r["strategy"]): float(r["auc"]) for r in _rows(own["out"] / "results.csv")}
    assert fig._suptitle is not None and "test split of" in fig._suptitle.get_text()
    for ax in fig.axes:
        estimator = ax.get_title().split()[0]  # "learned estimator"
        assert "USD" in ax.get_xlabel() and "quality" in ax.get_ylabel()
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(labels) == len(bands) == 5
        for label, band in zip(labels, bands):
            strategy = label.split()[0]
            est = "-" if strategy == "linear_interpolation" else estimator
            assert label == f"{strategy} (AUC {results[(est, strategy)]:.2f})"
            mine = [p for p in points if (p["estimator"], p["strategy"]) == (est, strategy)]
            drawn = np.unique(np.round(band.get_paths()[0].vertices[:, 1], 12))
            written = np.unique(np.round([float(p[k]) for p in mine for k in ("quality_ci_low", "quality_ci_high")],
                                         12))
            assert np.allclose(drawn, written), (est, strategy)


def test_a_one_point_curve_shows_its_band_and_the_figure_title_is_the_given_one(tmp_path, monkeypatch):
    from cascade_routing.evaluation.plots import plot_curves

    figures = _capture_figures(monkeypatch)
    rng = np.random.default_rng(0)
    per_query = (rng.random((1, 40)) < 0.7).astype(float)
    one = SimpleNamespace(strategy="routing", costs=np.array([1e-4]), qualities=per_query.mean(1),
                          per_query_quality=per_query, auc=70.0)
    plot_curves({"learned estimator": [one], "baseline estimator": [one]}, tmp_path / "c.png",
                num_resamples=50, title="my title")
    (fig,) = figures
    assert fig._suptitle.get_text() == "my title"  # not the last panel's title
    ax = fig.axes[0]
    segments = [s for c in ax.collections for s in getattr(c, "get_segments", lambda: [])()]
    assert segments and max(abs(s[1][1] - s[0][1]) for s in segments) > 0.05  # a visible error bar
    assert (tmp_path / "c.png").is_file() and (tmp_path / "c.svg").is_file()


def test_compare_per_budget_refuses_different_budgets_of_any_scale():
    from cascade_routing.evaluation.compare import compare_per_budget

    q = np.ones((2, 5))

    def sweep(budgets):
        return SimpleNamespace(strategy="s", budgets=np.asarray(budgets), per_query_quality=q,
                               qualities=q.mean(1), costs=np.asarray(budgets))

    same = compare_per_budget(sweep([2e-9, 4e-9]), sweep([2e-9, 4e-9]), num_resamples=5)
    assert np.array_equal(same.diff, [0.0, 0.0])
    for a, b in (([2e-9, 4e-9], [1e-9, 8e-9]), ([2e-4, 4e-4], [1e-4, 8e-4])):
        with pytest.raises(ValueError, match="do not share budgets"):
            compare_per_budget(sweep(a), sweep(b), num_resamples=5)
    assert not math.isnan(same.ci_low[0])
