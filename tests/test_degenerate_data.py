"""Degenerate but legal-looking data of a user's own, through the documented path (``data import`` →
``train.py fit`` / ``train-eval`` → ``evaluate`` → the Python API): one model that dominates all others,
models that all cost the same or tie exactly in cost, graded quality, a one-query train split, a task
label per query, models whose test outcome never varies. Each gives a meaningful result or one clear
error naming the problem, never a traceback, NaN or a meaningless AUC. Every test failed on the code
before its fix (the docstrings say how)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from cascade_routing.data.dataset import RoutingDataset
from estimators_helpers import make_synthetic_dataset, make_tiny_encoder, train_tiny


def _with(ds: RoutingDataset, **changes) -> RoutingDataset:
    """``ds`` rebuilt (and so re-sorted by mean cost) with some fields replaced."""
    fields = dict(queries=ds.queries, models=ds.models, quality=ds.quality, cost=ds.cost, responses=ds.responses,
                  features=ds.features, tasks=ds.tasks, query_ids=ds.query_ids, name=ds.name)
    return RoutingDataset(**{**fields, **changes})


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("degenerate") / "encoder")


def _datamodule(ds: RoutingDataset, encoder, tmp_path):
    from cascade_routing.training.datamodule import RoutingDataModule

    return RoutingDataModule.from_dataset(ds, encoder_path=str(encoder), cache_dir=str(tmp_path / "cache"))


def test_a_model_cheapest_and_best_makes_every_strategy_that_model_with_a_ci_around_it():
    """The cheapest model is also the best on every query: the budget grid is its cost alone and every
    strategy's AUC is its quality. The bootstrap CI was [q_lowest, ...] (e.g. [51.3, 100.0] around
    98.0): in about half the resamples the one point's cost fell a hair below the fixed c_min and the
    AUC dropped it, scoring the lowest single-model quality. A point left of c_min now counts."""
    from cascade_routing.evaluation import budget_sweep, sweep_budgets
    from cascade_routing.evaluation.metrics import auc
    from cascade_routing.evaluation.synthetic import synthetic_estimators
    from cascade_routing.policies import CascadeRouting

    assert auc([0.999], [0.9], 1.0, 3.0, 0.5) == pytest.approx(90.0)  # was 50.0: the point was dropped
    ds = make_synthetic_dataset(300, 3)
    quality = ds.quality.copy()
    quality[:, 0] = quality.max(1)
    ds = _with(ds, quality=quality)
    rows = np.random.default_rng(0).permutation(len(ds))
    fit_rows, test_rows = rows[:150], rows[150:]
    budgets = sweep_budgets(ds.cost[test_rows].mean(0), ds.quality[test_rows].mean(0), 5)
    assert budgets == pytest.approx([ds.cost[test_rows, 0].mean()])
    qe, ce = synthetic_estimators(ds, "low", fit_rows)
    res = budget_sweep(CascadeRouting(), qe, ce, ds.quality, ds.cost, fit_rows, test_rows, budgets,
                       texts=ds.queries, num_resamples=200)
    best = 100 * ds.quality[test_rows, 0].mean()
    assert res.auc == pytest.approx(best)
    assert best - 10 < res.ci[0] <= best <= res.ci[1]


def test_models_that_all_cost_the_same_are_refused_before_training(tmp_path, monkeypatch, capsys):
    """Every model at the same mean cost (flat prices, or all 0): ``train.py fit`` trained, then the
    export failed with "every model costs 0.001 USD per query on average on these rows" (no dataset
    named, training wasted). Now one ``error:`` line naming the dataset and the models, before any
    encoding or training."""
    from tests.script_helpers import load_script

    monkeypatch.chdir(tmp_path)
    ds = make_synthetic_dataset(200, 3)
    data = tmp_path / "flat"
    _with(ds, cost=np.full_like(ds.cost, 0.001)).save(data)
    enc = make_tiny_encoder(tmp_path / "encoder")
    cfg = tmp_path / "flat.yaml"
    cfg.write_text(yaml.safe_dump({
        "compose": ["model/frozen", "trainer/cpu"],
        "data": {"dataset": str(data), "encoder_path": str(enc), "cache_dir": str(tmp_path / "cache"), "batch_size": 32},
        "model": {"hidden": 32, "neighbours": 20},
        "trainer": {"max_epochs": 1, "default_root_dir": str(tmp_path / "runs" / "flat"), "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
    }))
    assert load_script("train.py").run(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"error: dataset '{data}': every model (model-2, model-1, model-0) costs 0.001 USD per query" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "flat" / "checkpoints").exists()  # refused before training


def test_models_of_exactly_equal_cost_rank_the_better_first_so_the_worse_is_dominated():
    """Two models at one flat price (0.005 USD), the worse listed first: both were "non-dominated"
    (equal cost: the given order decided), so the cascades ran the worse one first (threshold cascade
    AUC 49 against routing's 66 on this data), the budget grid repeated 0.005 five times and the floor
    policy picked the worse model. Now the better one comes first and the worse one is dominated."""
    from cascade_routing.evaluation import sweep_budgets
    from cascade_routing.policies.pool import nondominated_models, nondominated_pool

    ds = make_synthetic_dataset(300, 3)
    cost = ds.cost.copy()
    cost[:, :2] = 0.005
    tied = _with(ds, cost=cost)
    assert tied.models == ["model-1", "model-0", "model-2"]  # model-1: 0.54 mean quality, model-0: 0.30
    assert nondominated_pool(tied.quality, tied.cost) == (0, 2)
    assert nondominated_models(np.array([1.0, 1.0, 2.0]), np.array([0.3, 0.5, 0.9])).tolist() == [1, 2]
    budgets = sweep_budgets(tied.cost.mean(0), tied.quality.mean(0), 5)
    assert len(np.unique(budgets)) == len(budgets) == 5


def test_graded_quality_gets_aurocs_against_a_threshold_not_zero():
    """Quality in [0, 1] (not 0/1): the evaluation's AUROCs cast it to long (0.9 -> 0), so every label
    was 0 and ``estimator_metrics.json`` reported AUROC 0.0 (own-answer: undefined, printed nan) for
    an estimator that ranks perfectly. Labels are now quality >= 0.5, and the metrics say so."""
    from cascade_routing.interfaces import QualityEstimate
    from cascade_routing.training.heldout import estimate_aurocs

    rng = np.random.default_rng(0)
    quality = rng.uniform(0.0, 0.95, size=(200, 2))

    class Truth:
        models = ["a", "b"]

        def estimate(self, rows, ran):
            return QualityEstimate(torch.as_tensor(quality, dtype=torch.float32)[torch.as_tensor(rows)])

    out = estimate_aurocs(Truth(), quality, torch.as_tensor(rng.random((200, 2)) < 0.6), ["a", "b"])
    assert {k: out[k] for k in ("exante_auroc", "own_answer_auroc", "posthoc_auroc")} == pytest.approx(
        {"exante_auroc": 1.0, "own_answer_auroc": 1.0, "posthoc_auroc": 1.0})
    assert out["auroc_labels"] == "quality >= 0.5"


def test_aurocs_undefined_for_every_model_print_undefined_not_nan():
    """Every model's test outcome constant (e.g. always correct): the evaluation printed "ex-ante AUROC
    (mean over models) nan, ... nan"; a mean over some of the models did not say so."""
    from cascade_routing.training.heldout import auroc_line

    none = auroc_line("learned", {"per_model": {"a": {}, "b": {}}})
    assert "nan" not in none and "undefined: no model's outcome varies on the test split" in none
    some = auroc_line("learned", {"per_model": {"a": {"exante_auroc": 0.7}, "b": {}}, "exante_auroc": 0.7})
    assert "mean over the 1 of 2 models whose test outcome varies) 0.700" in some and "nan" not in some


def test_a_train_split_of_one_query_trains_without_the_neighbour_prior(tmp_path):
    """The smallest split the data module accepts (every part non-empty, calibration >= 4) can leave
    one training query: the neighbour prior's k was capped at N_train − 1 = 0 but the memory was still
    set, "error: this network has no neighbour prior (config.neighbours == 0)". It now trains without
    the prior (k = 0 recorded in the network config)."""
    module, *_ = train_tiny(tmp_path, dataset=make_synthetic_dataset(10, 3), epochs=1,
                            split={"train": 0.1, "val": 0.1, "calibration": 0.5, "test": 0.3})
    assert module.network.config.neighbours == 0 and module.hparams.neighbours == 50


def test_a_task_label_per_query_is_refused_naming_the_dataset(encoder, tmp_path):
    """A task column holding one label per query (an id column mapped as ``task``) trained with an
    N-wide task input whose test labels never occurred in training. Now an error before encoding."""
    ds = make_synthetic_dataset(60, 3)
    own = _with(ds, tasks=[f"t{i}" for i in range(len(ds))], name="own-tasks")
    with pytest.raises(ValueError, match=r"dataset 'own-tasks': every one of its 60 queries has a task label of "
                                         r"its own \('t0', 't1', \.\.\.\)"):
        _datamodule(own, encoder, tmp_path).check_settings()
    _datamodule(_with(ds, tasks=["one"] * len(ds)), encoder, tmp_path).check_settings()  # one task is fine
