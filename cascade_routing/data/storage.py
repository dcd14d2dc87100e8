"""The on-disk format of a :class:`~cascade_routing.data.dataset.RoutingDataset`.

A dataset is a folder with two files:

``data.parquet`` — one row per query, columns:
  - ``query_id`` (string), ``query`` (string), ``task`` (string; only if the dataset has tasks);
  - ``quality::<model>`` and ``cost::<model>`` (float64) for every model;
  - ``response::<model>`` (string, null where missing; only if the dataset has responses);
  - ``feature::<feature>::<model>`` (float64) for every feature and model.

``metadata.json`` — ``{"format": "cascade-routing-dataset", "format_version": 1, "name": ...,
"num_queries": N, "models": [...] (cheapest first), "features": [...], "has_responses": bool,
"has_tasks": bool, "metadata": {...}}``. Columns are looked up by the names listed here, so model
names may contain any character. Both files are plain and readable by pandas/polars/duckdb.

:func:`load_dataset_folder` checks the format tag and version, that every listed column exists
with the expected row count, and then re-runs the dataset's own validation.

Saving writes both files under temporary names unique to the call, removes the old
``metadata.json``, then moves the table and the metadata into place (each an atomic
``os.replace``). A folder is only a dataset once ``metadata.json`` is there, so a reader never pairs
a new table with stale metadata: it sees the old dataset, a folder without metadata (an error, or
"absent" for :func:`is_complete_dataset_folder`), or the new dataset; a read that overlaps a save
is detected (:func:`load_dataset_folder`). Concurrent saves to one folder leave one complete save.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.data.errors import DatasetError
from cascade_routing.data.fetch import unique_temp_path

FORMAT_TAG = "cascade-routing-dataset"
FORMAT_VERSION = 1
TABLE_FILE = "data.parquet"
META_FILE = "metadata.json"


def _col(kind: str, model: str, feature: str | None = None) -> str:
    return f"{kind}::{feature}::{model}" if feature is not None else f"{kind}::{model}"


def save_dataset(ds: RoutingDataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` to folder ``path`` (created if needed; existing files are overwritten). A folder
    the OS will not let us create or write (a parent that is a file, no permission, a folder in the
    way of a file, ...) is a :class:`DatasetError` naming the folder. Safe against concurrent
    readers and writers of the same folder (module docstring); leaves no temporary file behind."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"cannot save dataset {ds.name!r}: {folder} exists and is not a folder")
    try:
        _write_folder(ds, folder)
    except OSError as err:
        culprit = err.filename2 or err.filename  # os.replace(tmp, target): the target is in the way
        raise DatasetError(f"cannot save dataset {ds.name!r} to {folder}: {err.strerror or err}"
                           + (f" ({culprit})" if culprit else "")) from None
    return folder


def _write_folder(ds: RoutingDataset, folder: Path) -> None:
    """Create ``folder`` and write both files of the format into it (OS errors propagate)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        meta_text = json.dumps(
            {
                "format": FORMAT_TAG,
                "format_version": FORMAT_VERSION,
                "name": ds.name,
                "num_queries": ds.num_queries,
                "models": ds.models,
                "features": sorted(ds.features),
                "has_responses": ds.responses is not None,
                "has_tasks": ds.tasks is not None,
                "metadata": ds.metadata,
            },
            indent=2,
            sort_keys=False,
        )
    except TypeError as err:
        raise DatasetError(f"dataset {ds.name!r}: metadata is not JSON-serialisable: {err}") from None
    columns: dict[str, Any] = {
        "query_id": pa.array(ds.query_ids, type=pa.string()),
        "query": pa.array(ds.queries, type=pa.string()),
    }
    if ds.tasks is not None:
        columns["task"] = pa.array(ds.tasks, type=pa.string())
    for j, model in enumerate(ds.models):
        columns[_col("quality", model)] = pa.array(ds.quality[:, j], type=pa.float64())
        columns[_col("cost", model)] = pa.array(ds.cost[:, j], type=pa.float64())
        if ds.responses is not None:
            cells = [None if r is None else str(r) for r in ds.responses[:, j]]
            columns[_col("response", model)] = pa.array(cells, type=pa.string())
        for feat in sorted(ds.features):
            columns[_col("feature", model, feat)] = pa.array(ds.features[feat][:, j], type=pa.float64())
    _publish_files(folder, pa.table(columns), meta_text + "\n")


def _publish_files(folder: Path, table: pa.Table, meta_text: str) -> None:
    """Write ``table`` and ``meta_text`` to temporary files of this call, then replace the folder's
    files: the old metadata goes first, the new metadata last (OS errors propagate)."""
    table_path, meta_path = folder / TABLE_FILE, folder / META_FILE
    table_tmp, meta_tmp = unique_temp_path(table_path), unique_temp_path(meta_path)
    try:
        pq.write_table(table, table_tmp, compression="zstd")
        meta_tmp.write_text(meta_text, encoding="utf-8")
        meta_path.unlink(missing_ok=True)  # no moment where the new table meets the old metadata
        os.replace(table_tmp, table_path)
        os.replace(meta_tmp, meta_path)
    finally:
        table_tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)


def is_dataset_folder(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a folder holding both files of the format."""
    p = Path(path)
    return p.is_dir() and (p / META_FILE).is_file() and (p / TABLE_FILE).is_file()


def is_complete_dataset_folder(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` holds both files, valid metadata and a Parquet table whose footer reads and
    whose row count matches it: a cheap check (no column is read) that tells a finished save from a
    half-written, truncated or foreign folder."""
    folder = Path(path)
    try:
        meta = _read_meta(folder)
        return pq.read_metadata(folder / TABLE_FILE).num_rows == meta["num_queries"]
    except (DatasetError, pa.ArrowInvalid, OSError):
        return False


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    """Identity of the file at ``path`` (inode, size, mtime, ctime), or None if there is none; a
    save replaces ``metadata.json`` by a new file, so the stamp changes with every save."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read_meta(folder: Path) -> dict[str, Any]:
    """The folder's ``metadata.json``, checked: both files exist, JSON, format tag and version, the
    required fields and their types."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a dataset folder (expected a folder with {META_FILE} and {TABLE_FILE})")
    meta_path = folder / META_FILE
    for p in (meta_path, folder / TABLE_FILE):
        if not p.is_file():
            raise DatasetError(f"{folder}: missing {p.name} (not a saved cascade-routing dataset)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{meta_path}: not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_TAG:
        raise DatasetError(f"{meta_path}: 'format' is not {FORMAT_TAG!r}; not a cascade-routing dataset")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{meta_path}: format_version {meta.get('format_version')!r} is not supported "
            f"(this library reads version {FORMAT_VERSION})"
        )
    for key, kind in (("models", list), ("features", list), ("name", str), ("num_queries", int)):
        if not isinstance(meta.get(key), kind):
            raise DatasetError(f"{meta_path}: field {key!r} missing or not a {kind.__name__}")
    return meta


class _Columns:
    """The Parquet table's columns by name, with errors naming the file, the column and the row."""

    def __init__(self, table: pa.Table, path: Path) -> None:
        self.table, self.path, self.names = table, path, set(table.column_names)

    def column(self, name: str) -> list[Any]:
        if name not in self.names:
            raise DatasetError(f"{self.path}: missing column {name!r}")
        return self.table.column(name).to_pylist()

    def numeric(self, name: str) -> np.ndarray:
        """A float64 column with no missing value."""
        values = self.column(name)
        if any(v is None for v in values):
            row = next(i for i, v in enumerate(values) if v is None)
            raise DatasetError(f"{self.path}: column {name!r} has a missing value at row {row}")
        try:
            return np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise DatasetError(f"{self.path}: column {name!r} is not numeric") from None

    def per_model(self, kind: str, models: list[str], feature: str | None = None) -> np.ndarray:
        """[N, M]: the numeric ``kind`` (``quality``, ``cost``, ``feature``) column of every model."""
        if not models:
            return np.zeros((self.table.num_rows, 0))
        return np.stack([self.numeric(_col(kind, m, feature)) for m in models], axis=1)


def load_dataset_folder(path: str | os.PathLike[str]) -> RoutingDataset:
    """Read a folder written by :func:`save_dataset`, validating it. A folder saved again while it
    is read (another process) is a :class:`DatasetError` saying so, never a mix of two saves."""
    folder = Path(path)
    before = _stamp(folder / META_FILE)
    meta = _read_meta(folder)
    table_path = folder / TABLE_FILE
    try:
        table = pq.read_table(table_path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{table_path}: cannot read Parquet table: {err}") from None
    if _stamp(folder / META_FILE) != before:
        raise DatasetError(f"{folder}: the dataset was saved again while it was being read (by another "
                           "process?); load it again")
    n = table.num_rows
    if n != meta["num_queries"]:
        raise DatasetError(f"{table_path}: {n} rows but {META_FILE} says num_queries={meta['num_queries']}")
    cols = _Columns(table, table_path)
    models: list[str] = meta["models"]
    quality, cost = cols.per_model("quality", models), cols.per_model("cost", models)
    responses = None
    if meta.get("has_responses"):
        responses = np.empty((n, len(models)), dtype=object)
        for j, m in enumerate(models):
            responses[:, j] = cols.column(_col("response", m))
    features = {f: cols.per_model("feature", models, f) for f in meta["features"]}
    return RoutingDataset(
        queries=cols.column("query"),
        models=models,
        quality=quality,
        cost=cost,
        responses=responses,
        features=features,
        tasks=cols.column("task") if meta.get("has_tasks") else None,
        query_ids=cols.column("query_id"),
        metadata=meta.get("metadata") or {},
        name=meta["name"],
    )
