"""Simulation, λ fitting, synthetic/oracle estimators, metrics and the reproduce command."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.evaluation.synthetic import (
    OracleCostEstimator,
    OracleQualityEstimator,
    SyntheticCostEstimator,
    SyntheticQualityEstimator,
)
from cascade_routing.evaluation import simulate
from cascade_routing.evaluation.metrics import auc, nondominated_models, sweep_budgets
from engine_helpers import make_data, synthetic_pair

from cascade_routing.policies import (
    CascadeRouting,
    OptimalCascade,
    PolicyError,
    Routing,
    ThresholdCascade,
    fit_lambda,
    query_uniforms,
)


@pytest.fixture(scope="module")
def data():
    quality, cost = make_data()
    return (quality, cost, *synthetic_pair(quality, cost, "low", fit_rows=100))


POLICIES = [Routing(), ThresholdCascade(), OptimalCascade(), CascadeRouting(), CascadeRouting(max_depth=2, greedy=True)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p))
def test_batched_equals_per_query(data, policy):
    quality, cost, qe, ce = data
    lam = 400.0
    batch = simulate(policy, qe, ce, quality[:40], cost[:40], lam)
    u = torch.rand(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in range(40):
        one = simulate(policy, qe, ce, quality[i:i + 1], cost[i:i + 1], lam, u[i:i + 1], rows=torch.tensor([i]))
        assert torch.equal(one.ran[0], batch.ran[i])
        assert int(one.answer[0]) == int(batch.answer[i])
        assert float(one.cost[0]) == pytest.approx(float(batch.cost[i]))
    # run order respects the ran mask and realised numbers are consistent
    assert torch.equal(batch.ran.sum(1), (batch.order >= 0).sum(1))
    assert np.allclose(batch.cost.numpy(), (cost[:40] * batch.ran.numpy()).sum(1))


@pytest.mark.parametrize("policy", POLICIES[1:4], ids=lambda p: repr(p))
def test_fitted_budget_is_met_on_calibration(data, policy):
    quality, cost, qe, ce = data
    calib = np.arange(100, 300)
    budget = float(cost[calib].mean(0)[1] * 1.5)
    texts = [f"query {i}" for i in calib]
    f = fit_lambda(policy, qe, ce, quality[calib], cost[calib], budget, texts, rows=torch.as_tensor(calib))
    assert float(f.lam_low[0]) <= float(f.lam_high[0])
    res = simulate(policy, qe, ce, quality[calib], cost[calib], f, query_uniforms(texts), torch.as_tensor(calib))
    assert res.mean_cost <= budget * (1 + 1e-9)
    # tight: within the largest single-query cost difference / N of the budget
    assert res.mean_cost >= budget - cost[calib].max() / len(calib)
    assert res.mean_cost == pytest.approx(f.calibration_cost)


def test_fit_lambda_errors(data):
    quality, cost, qe, ce = data
    with pytest.raises(PolicyError, match="budget must be"):
        fit_lambda(Routing(), qe, ce, quality, cost, -1.0)
    with pytest.raises(PolicyError, match="below the mean cost of the cheapest model"):
        fit_lambda(Routing(), qe, ce, quality, cost, float(cost.mean(0).min()) / 2)
    bad = quality.copy()
    bad[3, 1] = np.nan
    with pytest.raises(PolicyError, match="NaN"):
        fit_lambda(Routing(), qe, ce, bad, cost, 0.01)
    with pytest.raises(PolicyError, match="gamma"):
        from cascade_routing.policies import FittedLambda

        FittedLambda(torch.tensor([1.0]), torch.tensor([2.0]), gamma=1.5)


def test_oracle_cascade_routing_never_below_routing_or_cascades():
    quality, cost = make_data(400, 4, seed=3)
    models = [f"m{i}" for i in range(4)]
    qe, ce = OracleQualityEstimator(quality, models), OracleCostEstimator(cost, models)
    means = cost.mean(0)
    for budget in np.linspace(means[0] * 1.05, means[-1], 5):
        res = {}
        for name, pol in {"cr": CascadeRouting(), "routing": Routing(), "opt": OptimalCascade(),
                          "thr": ThresholdCascade()}.items():
            f = fit_lambda(pol, qe, ce, quality, cost, float(budget), seed=1)
            res[name] = simulate(pol, qe, ce, quality, cost, f, seed=1)
            assert res[name].mean_cost <= budget * (1 + 1e-9)
        for other in ("routing", "opt", "thr"):
            assert res["cr"].mean_quality >= res[other].mean_quality - 1e-12, (budget, other)


def test_same_seed_same_result(data):
    quality, cost, _, _ = data
    runs = []
    for seed in (5, 5, 6):
        qe, ce = synthetic_pair(quality, cost, "medium", fit_rows=100, seed=seed)
        runs.append(simulate(CascadeRouting(seed=seed), qe, ce, quality, cost, 300.0, seed=seed))
    assert torch.equal(runs[0].ran, runs[1].ran) and torch.equal(runs[0].answer, runs[1].answer)
    assert not torch.equal(runs[0].ran, runs[2].ran)


def test_synthetic_estimator_contract(data):
    quality, cost, qe, ce = data
    rows = torch.arange(10)
    ran = torch.zeros(10, 4, dtype=torch.bool)
    ran[:, 1] = True
    est = qe.estimate(rows, ran)
    assert (est.std[:, 1] == 0).all() and (est.std[:, 0] > 0).all()
    assert torch.allclose(ce.estimate(rows, ran)[:, 1], torch.as_tensor(cost[:10, 1], dtype=torch.float32))
    assert (ce.estimate(rows, ran) >= 0).all()
    # noise presets are ordered: more noise, worse ex-ante estimates (after recalibration)
    mse = [float(((SyntheticQualityEstimator(quality, list("abcd"), lvl, np.arange(100)).before.double()
                   - torch.as_tensor(quality)) ** 2).mean()) for lvl in ("low", "medium", "high")]
    assert mse[0] < mse[1] < mse[2]
    with pytest.raises(ValueError, match="unknown noise preset"):
        SyntheticQualityEstimator(quality, list("abcd"), "huge")


def test_query_uniforms_stable():
    u = query_uniforms(["hello", "world", "hello"])
    assert u[0] == u[2] and 0 <= float(u.min()) and float(u.max()) < 1
    assert float(u[0]) == int.from_bytes(hashlib.sha256(b"hello").digest()[:8], "big") / 2**64


def test_auc_definition():
    # a straight line from the cheapest (lowest quality) to the most expensive model
    assert auc(np.array([1.0, 3.0]), np.array([0.5, 0.9]), 1.0, 3.0, 0.5) == pytest.approx(70.0)
    # flat extension to the right of the last point, lowest quality at the left
    assert auc(np.array([2.0]), np.array([0.9]), 1.0, 3.0, 0.5) == pytest.approx(100 * (0.7 * 1 + 0.9 * 1) / 2)
    assert nondominated_models(np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.4, 0.8])).tolist() == [0, 2]
    b = sweep_budgets(np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.6, 0.8]), 10)
    assert len(b) == 19 and b[0] == 1.0 and b[-1] == 3.0


def test_protocol_budgets_reach_the_top_model_on_the_fit_rows_too():
    from cascade_routing.evaluation.metrics import protocol_budgets

    test_cost, test_quality = np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.6, 0.8])
    grid = sweep_budgets(test_cost, test_quality, 3)
    # the top model (index 2) costs more on the fit rows than on test: one more budget, at that cost
    dearer = protocol_budgets(test_cost, test_quality, np.array([1.1, 1.9, 3.4]), 3)
    assert np.array_equal(dearer[:-1], grid) and dearer[-1] == 3.4
    # cheaper or equal there (and a dominated model dearer there: not the top one): the plain grid
    assert np.array_equal(protocol_budgets(test_cost, test_quality, np.array([1.0, 9.0, 2.8]), 3), grid)
    assert np.array_equal(protocol_budgets(test_cost, test_quality, test_cost, 3), grid)


def test_reproduce_on_any_dataset_uses_its_non_dominated_models(tmp_path, capsys):
    import csv

    from cascade_routing.cli import main
    from cascade_routing.evaluation.metrics import nondominated_models
    from cascade_routing.evaluation.reproduce import default_pools

    quality, cost = make_data(240, 4, seed=9)
    ds = RoutingDataset([f"q{i}" for i in range(240)], ["a", "b", "c", "d"], quality, cost,
                        tasks=["t1", "t2"] * 120, name="toy")
    ds.save(tmp_path / "toy")
    nd = [ds.models[i] for i in sorted(nondominated_models(ds.cost.mean(0), ds.quality.mean(0)))]
    pools = default_pools(ds)
    assert list(pools.values())[-1] == [] and list(pools)[-1] == "all (4)"
    if len(nd) < 4:
        assert list(pools.values())[0] == nd
    rc = main(["reproduce", "routerbench", "--dataset", str(tmp_path / "toy"), "--out", str(tmp_path / "bad"),
               "--pool", "mine=a,zzz", "--quick", "--no-progress"])
    assert rc == 2 and "'zzz' matches nothing" in capsys.readouterr().err
    rc = main(["reproduce", "routerbench", "--dataset", str(tmp_path / "toy"), "--out", str(tmp_path / "out"),
               "--pool", "mine=a,d", "--quick", "--no-progress", "--resamples", "20"])
    assert rc == 0
    assert "toy, synthetic estimators" in capsys.readouterr().out  # the title names the dataset
    for name in ("curves.png", "curves.svg"):
        assert (tmp_path / "out" / name).stat().st_size > 5000, name
    with open(tmp_path / "out" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    aucs = {r["strategy"]: float(r["auc"]) for r in rows}
    assert set(aucs) == {"linear_interpolation", "routing", "threshold_cascade", "optimal_cascade",
                         "cascade_routing"}
    assert {(r["pool"], r["models"], r["noise"]) for r in rows} == {("mine", "2", "low")}
    # low noise: the estimators are nearly the oracle, so choosing per query beats mixing two models
    assert aucs["cascade_routing"] > aucs["linear_interpolation"] + 1, aucs
    assert aucs["routing"] > aucs["linear_interpolation"] + 1, aucs


def test_reproduce_refuses_two_pools_of_one_name(tmp_path, capsys):
    """An unnamed pool is named by its size, so two unnamed pools of 2 models (or two NAME= pools of one
    name) would keep only the last; refused before any work instead."""
    from cascade_routing.cli import main
    from cascade_routing.evaluation.reproduce import parse_pools

    assert parse_pools(["a,b", "x=a,c", "a,b,c"]) == {"2 models": ["a", "b"], "x": ["a", "c"],
                                                     "3 models": ["a", "b", "c"]}
    for pools in (["mistral-7b-chat,gpt-4-1106", "mixtral-8x7b,gpt-4-1106"], ["p=mistral-7b-chat,gpt-4-1106",
                                                                          "p=mixtral-8x7b,gpt-4-1106"]):
        args = [arg for p in pools for arg in ("--pool", p)]
        rc = main(["reproduce", "routerbench", "--out", str(tmp_path / "out"), "--quick", "--no-progress", *args])
        err = capsys.readouterr().err
        assert rc == 2 and "two pools are named" in err and "NAME=model,model" in err, err
    assert not (tmp_path / "out").exists()


def test_reproduce_refuses_a_pool_of_one_model_by_name(tmp_path, capsys):
    """``--pool a=<one model>`` ended in "every model costs ... nothing to trade off" deep in the sweep;
    it is refused before any work, naming the pool, and so is a pool whose names resolve to one model
    or a one-model pool given to the Python API."""
    from cascade_routing.cli import main
    from cascade_routing.evaluation.reproduce import parse_pool, reproduce_routerbench

    for text in ("a=gpt-4-1106", "a=gpt-4-1106,gpt-4-1106"):
        with pytest.raises(ValueError, match="pool 'a' has 1 model .*at least two models"):
            parse_pool(text)
    rc = main(["reproduce", "routerbench", "--out", str(tmp_path / "out"), "--quick", "--no-progress",
               "--pool", "a=gpt-4-1106"])
    err = capsys.readouterr().err
    assert rc == 2 and "pool 'a' has 1 model (gpt-4-1106)" in err and "at least two models" in err, err
    assert not (tmp_path / "out").exists()
    quality, cost = make_data(60, 3, seed=2)
    ds = RoutingDataset([f"q{i}" for i in range(60)], ["a", "b", "c"], quality, cost, name="toy")
    with pytest.raises(ValueError, match="pool 'mine' has 1 model"):
        reproduce_routerbench(out_dir=None, dataset=ds, pools={"mine": ["a", "a"]}, progress=False)


def test_reproduce_on_a_small_dataset_says_the_fit_split_is_a_fraction_of_it():
    """On fewer than ~40 rows the 5% fit split can have one row; the error names the dataset's rows, the
    fit fraction and the rows needed, not only "needs at least 2 fit rows, got 1"."""
    from cascade_routing.evaluation.reproduce import reproduce_routerbench

    quality, cost = make_data(20, 3, seed=2)
    ds = RoutingDataset([f"q{i}" for i in range(20)], ["a", "b", "c"], quality, cost, name="tiny")
    with pytest.raises(ValueError, match=r"dataset 'tiny' has 20 rows and the fit split is 5% of them \(1 row\).*"
                                         r"needs at least 2 fit rows: use a dataset of at least 40 rows"):
        reproduce_routerbench(out_dir=None, dataset=ds, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_equals_gpu(data):
    quality, cost, _, _ = data
    models = [f"m{i}" for i in range(quality.shape[1])]
    runs = []
    for dev in ("cpu", "cuda"):
        qe = SyntheticQualityEstimator(quality, models, "medium", np.arange(100), 0, dtype=torch.float64).to(dev)
        ce = SyntheticCostEstimator(cost, models, "medium", np.arange(100), 0, dtype=torch.float64).to(dev)
        runs.append(simulate(CascadeRouting(max_depth=3), qe, ce, quality, cost, 300.0))
    assert torch.equal(runs[0].ran, runs[1].ran) and torch.equal(runs[0].answer, runs[1].answer)


def test_reproduce_cli_quick_on_routerbench(raw_data_dir, tmp_path):
    from cascade_routing.cli import main

    rc = main(["reproduce", "routerbench", "--out", str(tmp_path), "--quick", "--no-progress", "--resamples", "50"])
    assert rc == 0
    import csv

    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5  # 5 strategies (3-model pool, low noise)
    aucs = {r["strategy"]: float(r["auc"]) for r in rows}
    # the paper's ordering in this cell (full protocol: 91.62 / 89.51 / 81.02, README Table 1)
    assert aucs["cascade_routing"] > aucs["linear_interpolation"] + 5, aucs
    assert aucs["cascade_routing"] >= aucs["routing"] - 0.5, aucs
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_reproduce_refuses_a_device_or_thread_count_it_cannot_use(tmp_path, capsys):
    """A device this torch cannot use is one ``error:`` line before any work (no assertion traceback
    from deep in the estimators); a negative thread count is an argparse error naming the option."""
    from cascade_routing.cli import main
    from cascade_routing.evaluation.reproduce import checked_device

    unusable = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main(["reproduce", "routerbench", "--out", str(tmp_path), "--quick", "--device", unusable]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: device {unusable!r}") and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="'tpu' is not a torch device name"):
        checked_device("tpu")
    assert checked_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit):
        main(["reproduce", "routerbench", "--threads", "-3"])
    assert "--threads: must be at least 0, got -3" in capsys.readouterr().err


def test_the_python_api_refuses_protocol_settings_the_cli_refuses(tmp_path):
    """``budgets_per_pair`` / ``num_resamples`` of 0 ended in an IndexError deep in the sweep, a
    strategy given as one string was read letter by letter, an unknown estimator was a KeyError:
    each is a ValueError naming the setting before anything loads (no artifact needed to see it)."""
    from cascade_routing.evaluation.reproduce import reproduce_routerbench
    from cascade_routing.training.heldout import evaluate

    missing = str(tmp_path / "no-such.safetensors")
    for kwargs, words in (({"budgets_per_pair": 0}, "budgets_per_pair must be an integer >= 1, got 0"),
                          ({"num_resamples": 0}, "num_resamples must be an integer >= 1, got 0"),
                          ({"strategies": "routing"}, "got the single string 'routing'"),
                          ({"strategies": ("routing", "magic")}, r"unknown strategies \['magic'\]"),
                          ({"estimators": ("learned", "oracle")}, r"unknown estimators \['oracle'\]")):
        with pytest.raises(ValueError, match=words):
            evaluate(missing, out_dir=None, **kwargs)
    with pytest.raises(ValueError, match="num_resamples must be an integer >= 1, got 0"):
        reproduce_routerbench(out_dir=None, num_resamples=0)


def test_reproduce_takes_a_dataset_by_name(raw_data_dir):
    from cascade_routing.evaluation.reproduce import reproduce_routerbench

    result = reproduce_routerbench(out_dir=None, dataset="routellm-gsm8k", quick=True, progress=False,
                                   num_resamples=20)
    assert {r["strategy"] for r in result.rows} >= {"routing", "cascade_routing"}


@pytest.mark.slow
def test_reproduce_full_protocol_orders_strategies(raw_data_dir, tmp_path):
    """The whole Table-1 protocol (about a minute on 2 cores): cascade routing beats routing and the
    linear interpolation baseline in every (pool, noise) cell."""
    from cascade_routing.evaluation.reproduce import reproduce_routerbench

    res = reproduce_routerbench(tmp_path, progress=False, num_resamples=50)
    cells = {}
    for r in res.rows:
        cells.setdefault((r["pool"], r["noise"]), {})[r["strategy"]] = r["auc"]
    assert len(cells) == 9
    for key, aucs in cells.items():
        assert aucs["cascade_routing"] >= aucs["routing"], key
        assert aucs["cascade_routing"] > aucs["linear_interpolation"], key


def test_fitted_lambda_dict_round_trip_keeps_float64_precision():
    from cascade_routing.policies import FittedLambda

    lam = torch.tensor([655.1300000000001, 1e-7 + 1.0], dtype=torch.float64)
    fitted = FittedLambda(lam, lam * 1.0000001, 0.3, 0.001, 0.00099, 0.8)
    back = FittedLambda.from_dict(fitted.to_dict())
    assert back.lam_low.dtype == torch.float64
    assert torch.equal(back.lam_low, fitted.lam_low) and torch.equal(back.lam_high, fitted.lam_high)
    assert (back.gamma, back.budget) == (0.3, 0.001)
