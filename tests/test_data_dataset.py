"""RoutingDataset: splits, save/load round trip, and one test per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascade_routing.data import DatasetError, RoutingDataset, load_dataset
from data_helpers import tiny_dataset


def _assert_same(a: RoutingDataset, b: RoutingDataset) -> None:
    assert a.models == b.models and a.queries == b.queries and a.query_ids == b.query_ids
    assert a.tasks == b.tasks and a.name == b.name and a.metadata == b.metadata
    np.testing.assert_array_equal(a.quality, b.quality)
    np.testing.assert_array_equal(a.cost, b.cost)
    assert (a.responses is None) == (b.responses is None)
    if a.responses is not None:
        assert a.responses.tolist() == b.responses.tolist()
    assert set(a.features) == set(b.features)
    for k in a.features:
        np.testing.assert_array_equal(a.features[k], b.features[k])


# ------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path: Path) -> None:
    ds = tiny_dataset()
    folder = ds.save(tmp_path / "tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["data.parquet", "metadata.json"]
    back = RoutingDataset.load(folder)
    _assert_same(ds, back)
    assert any(r is None for r in back.responses.ravel())
    _assert_same(ds, load_dataset(folder))


def test_save_load_without_optional_fields(tmp_path: Path) -> None:
    ds = RoutingDataset(queries=["a", "b"], models=["x"], quality=[[1.0], [0.0]], cost=[[0.1], [0.2]])
    back = RoutingDataset.load(ds.save(tmp_path / "d"))
    _assert_same(ds, back)
    assert back.responses is None and back.tasks is None and back.features == {}


def test_load_rejects_foreign_and_broken_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="missing metadata.json"):
        (tmp_path / "empty").mkdir()
        RoutingDataset.load(tmp_path / "empty")
    folder = tiny_dataset().save(tmp_path / "d")
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DatasetError, match="format_version 99 is not supported"):
        RoutingDataset.load(folder)
    (folder / "metadata.json").write_text(json.dumps({**meta, "models": ["model-0", "nope"]}))
    with pytest.raises(DatasetError, match="missing column 'quality::nope'"):
        RoutingDataset.load(folder)
    (folder / "metadata.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        RoutingDataset.load(folder)


def test_load_dataset_unknown_name() -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'no-such-set'.*routerbench-subset"):
        load_dataset("no-such-set")


# ------------------------------------------------------------------------ splits
def test_split_seeded_stratified_disjoint_covering() -> None:
    ds = tiny_dataset(n=101)
    fr = {"train": 0.6, "calibration": 0.2, "test": 0.2}
    parts = ds.split(fr, seed=3)
    again = ds.split(fr, seed=3)
    other = ds.split(fr, seed=4)
    ids = {k: v.query_ids for k, v in parts.items()}
    assert ids == {k: v.query_ids for k, v in again.items()}
    assert ids != {k: v.query_ids for k, v in other.items()}
    flat = [q for v in ids.values() for q in v]
    assert len(flat) == len(set(flat)) == ds.num_queries  # disjoint and covering
    for name, part in parts.items():
        assert part.models == ds.models and part.metadata["split"] == name
        assert abs(part.num_queries - fr[name] * ds.num_queries) <= 1
        for task in "abc":
            n_task = ds.tasks.count(task)
            assert abs(part.tasks.count(task) - fr[name] * n_task) <= 1
        row = ds.query_ids.index(part.query_ids[0])
        np.testing.assert_array_equal(part.quality[0], ds.quality[row])


def test_split_every_part_non_empty_and_validated() -> None:
    ds = tiny_dataset(n=5)
    parts = ds.split({"a": 0.9, "b": 0.05, "c": 0.05})
    assert all(p.num_queries >= 1 for p in parts.values())
    assert sum(p.num_queries for p in parts.values()) == 5
    with pytest.raises(DatasetError, match="must sum to 1"):
        ds.split({"a": 0.5, "b": 0.4})
    with pytest.raises(DatasetError, match="must be > 0"):
        ds.split({"a": 1.0, "b": 0.0})
    with pytest.raises(DatasetError, match="cannot make 6 non-empty splits"):
        ds.split({str(i): 1 / 6 for i in range(6)})


def test_split_without_tasks() -> None:
    ds = tiny_dataset(n=40, tasks=False)
    parts = ds.split({"train": 0.5, "test": 0.5}, stratify=True)
    assert [p.num_queries for p in parts.values()] == [20, 20]


def test_subsets_and_splits_keep_the_parent_model_order() -> None:
    """Two models whose mean costs nearly tie: each half of the rows alone would sort them the other
    way round. Subsets and split parts keep the parent's order and each name keeps its own column."""
    n = 40
    cost_x = np.where(np.arange(n) < n // 2, 0.10, 0.20)  # x is cheaper in the first half
    cost_y = np.where(np.arange(n) < n // 2, 0.11, 0.18)  # y in the second half and on average
    quality = np.stack([np.arange(n) % 2, 1 - np.arange(n) % 2], axis=1).astype(float)
    ds = RoutingDataset(queries=[f"q{i}" for i in range(n)], models=["x", "y"], quality=quality,
                        cost=np.stack([cost_x, cost_y], axis=1), tasks=["t"] * n)
    assert ds.models == ["y", "x"]  # the full dataset: y (0.145) before x (0.150)
    first = ds.subset(np.arange(n // 2))
    assert first.models == ds.models  # sorted on these rows alone, x (0.10) would come first
    np.testing.assert_array_equal(first.cost[:, first.model_index("x")], cost_x[: n // 2])
    np.testing.assert_array_equal(first.quality[:, first.model_index("y")], quality[: n // 2, 1])
    for part in ds.split({"a": 0.5, "b": 0.5}, seed=3).values():
        assert part.models == ds.models
        rows = [ds.query_ids.index(q) for q in part.query_ids]
        np.testing.assert_array_equal(part.cost, ds.cost[rows])
        np.testing.assert_array_equal(part.quality, ds.quality[rows])


# -------------------------------------------------------------------- bad inputs
def _kwargs(**over):
    base = dict(queries=["a", "b"], models=["x", "y"], quality=[[1.0, 0.0], [0.0, 1.0]],
                cost=[[0.1, 0.2], [0.1, 0.2]])
    base.update(over)
    return base


def test_nan_quality() -> None:
    with pytest.raises(DatasetError, match=r"field 'quality' has a non-finite value nan at row 1, model 'y'"):
        RoutingDataset(**_kwargs(quality=[[1.0, 0.0], [0.0, float("nan")]]))


def test_inf_cost() -> None:
    with pytest.raises(DatasetError, match=r"field 'cost' has a non-finite value inf at row 0, model 'x'"):
        RoutingDataset(**_kwargs(cost=[[float("inf"), 0.2], [0.1, 0.2]]))


def test_negative_cost() -> None:
    with pytest.raises(DatasetError, match=r"'cost' must be >= 0; row 1, model 'y'"):
        RoutingDataset(**_kwargs(cost=[[0.1, 0.2], [0.1, -0.2]]))


def test_quality_outside_unit_interval() -> None:
    with pytest.raises(DatasetError, match=r"'quality' must lie in \[0, 1\]; row 0, model 'x' has 2.0"):
        RoutingDataset(**_kwargs(quality=[[2.0, 0.0], [0.0, 1.0]]))


def test_logprob_confidence_must_be_a_log_probability() -> None:
    RoutingDataset(**_kwargs(features={"logprob_confidence": [[0.0, -0.5], [-30.0, -1e-9]]}))
    with pytest.raises(DatasetError, match=r"'logprob_confidence' must be a log-probability \(<= 0\), got 0.7 at row 1, "
                                           r"model 'y' \(give a probability p as log\(p\)\)"):
        RoutingDataset(**_kwargs(features={"logprob_confidence": [[0.0, -0.5], [-0.2, 0.7]]}))


def test_shape_mismatch() -> None:
    with pytest.raises(DatasetError, match=r"field 'cost' has shape \(2, 3\), expected \(N=2, M=2\)"):
        RoutingDataset(**_kwargs(cost=[[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]))


def test_duplicate_model_names() -> None:
    with pytest.raises(DatasetError, match="duplicate model name 'x'"):
        RoutingDataset(**_kwargs(models=["x", "x"]))


def test_unknown_model_name() -> None:
    ds = RoutingDataset(**_kwargs())
    with pytest.raises(DatasetError, match=r"unknown model 'z'; known models: \['x', 'y'\]"):
        ds.select_models(["x", "z"])


def test_empty_dataset() -> None:
    with pytest.raises(DatasetError, match="empty dataset"):
        RoutingDataset(queries=[], models=["x"], quality=np.zeros((0, 1)), cost=np.zeros((0, 1)))


def test_split_invariants_random_instances() -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(3, 200))
        k = int(rng.integers(2, 4))
        raw = rng.uniform(0.05, 1.0, size=k)
        fr = {f"s{i}": float(x) for i, x in enumerate(raw / raw.sum())}
        fr[f"s{k - 1}"] = 1.0 - sum(v for key, v in fr.items() if key != f"s{k - 1}")
        tasks = [f"t{int(t)}" for t in rng.integers(0, int(rng.integers(1, 8)), size=n)]
        ds = RoutingDataset(queries=[f"q{i}" for i in range(n)], models=["m"], quality=np.zeros((n, 1)),
                            cost=np.zeros((n, 1)), tasks=tasks)
        parts = ds.split(fr, seed=trial)
        ids = [q for p in parts.values() for q in p.query_ids]
        assert sorted(ids, key=int) == [str(i) for i in range(n)], "disjoint and covering"
        for name, part in parts.items():
            assert part.num_queries >= 1
            assert abs(part.num_queries - fr[name] * n) <= 1 + (1 if n * min(fr.values()) < 1 else 0)


def test_load_rejects_non_numeric_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tiny_dataset().save(tmp_path / "d")
    table = pq.read_table(folder / "data.parquet")
    idx = table.column_names.index("cost::model-1")
    table = table.set_column(idx, "cost::model-1", pa.array(["x"] * table.num_rows))
    pq.write_table(table, folder / "data.parquet")
    with pytest.raises(DatasetError, match="column 'cost::model-1' is not numeric"):
        RoutingDataset.load(folder)


def test_concatenating_splits_keeps_their_order_and_refuses_two_orders() -> None:
    """``concat_splits`` (λ fitted on one split, scored on the other) keeps the splits' shared model
    order, even where the joined rows' mean costs would sort it the other way, and refuses splits
    that number the models differently."""
    import torch

    from cascade_routing.training.datamodule import EncodedSplit
    from cascade_routing.training.heldout import concat_splits

    def encoded(ds: RoutingDataset) -> EncodedSplit:
        n, m = ds.quality.shape
        return EncodedSplit(ds, torch.zeros(n, 4), torch.zeros(n, m, 4), torch.zeros(n, 1), torch.zeros(n, m, 3),
                            torch.zeros(n, m, m), torch.as_tensor(ds.quality, dtype=torch.float32),
                            torch.zeros(n, m, dtype=torch.bool))

    kwargs = dict(queries=["a", "b"], models=["x", "y"], quality=[[1.0, 0.0], [0.0, 1.0]])
    a = RoutingDataset(cost=[[0.10, 0.11], [0.10, 0.11]], query_ids=["a", "b"], **kwargs)  # x, y
    b = RoutingDataset(cost=[[0.30, 0.01], [0.30, 0.01]], query_ids=["c", "d"], **kwargs)  # y, x
    b_kept = RoutingDataset(cost=[[0.30, 0.01], [0.30, 0.01]], query_ids=["c", "d"], sort_models=False, **kwargs)
    joined = concat_splits(encoded(a), encoded(b_kept))
    assert joined.dataset.models == ["x", "y"]  # the joined mean costs (0.2 vs 0.06) would put y first
    np.testing.assert_array_equal(joined.dataset.cost[2:], b_kept.cost)
    with pytest.raises(ValueError, match="model order"):
        concat_splits(encoded(a), encoded(b))
