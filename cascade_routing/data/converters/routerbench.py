"""RouterBench tables -> :class:`RoutingDataset`.

Accepted layout (CSV, or Parquet with the same columns). This is the column layout of the public
RouterBench 0-shot and 5-shot tables (Hu et al. 2024, HF ``withmartian/routerbench``; export
their pandas frames with ``df.to_csv(...)`` or ``df.to_parquet(...)`` — the original ``.pkl``
files are pickles and are deliberately not read) and of the RouterDC re-split subset:

- ``sample_id`` (unique id, e.g. ``arc-challenge.test.1``), ``prompt`` (a Python list-of-strings
  literal, e.g. ``"['Question ...']"``), ``eval_name`` (the task, e.g. ``arc-challenge``);
- for every model ``<model>``: ``<model>`` (quality, 0/1 or a score in [0, 1]),
  ``<model>|model_response`` (list-of-strings literal) and ``<model>|total_cost`` (USD per query);
- optional, ignored: an unnamed/``Unnamed: 0`` index column, ``oracle_model_to_route_to``.

The models are the columns ``X`` for which ``X|total_cost`` exists. Literal cells are parsed with
``ast.literal_eval`` only (never ``eval``); a malformed cell raises :class:`DatasetError` naming
file, row and column.

Missing data policy (explicit, reported, never filled):
- a row with an empty quality or cost cell for any model is *incomplete*; by default it is dropped;
- a ``sample_id`` seen again after incomplete rows are removed is a *duplicate*: if its outcomes
  equal the first occurrence's the later rows are dropped, otherwise every occurrence is dropped
  (``conflicting-duplicate``);
- every drop is listed in ``metadata["conversion_report"]`` (file, 0-based data row, sample_id,
  reason, which model/column) and summarised in a logged warning;
- ``strict=True`` instead raises at the first such row, naming file, row, model and column.

Model names are shortened by dropping the organisation prefix (``mistralai/mixtral-8x7b-chat`` ->
``mixtral-8x7b-chat``; see :data:`ROUTERBENCH_SHORT_NAMES`); the full names are kept in
``metadata["original_model_names"]`` (short -> full). Query ids are ``"<origin>:<sample_id>"``
where ``origin`` is ``train``/``test`` when the file name ends in ``_train``/``_test`` (else the
file stem), so a query's file of origin is never lost; tasks are the ``eval_name`` values
(``winograde`` file names aside, the RouterBench task is spelled ``winogrande``).
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cascade_routing.data.converters.common import (
    ConversionReport,
    parse_list_literal,
    parse_number,
)
from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.data.errors import DatasetError

#: Full RouterBench model name -> short name used in this library (organisation prefix dropped).
ROUTERBENCH_SHORT_NAMES: dict[str, str] = {
    "WizardLM/WizardLM-13B-V1.2": "WizardLM-13B-V1.2",
    "claude-instant-v1": "claude-instant-v1",
    "claude-v1": "claude-v1",
    "claude-v2": "claude-v2",
    "gpt-3.5-turbo-1106": "gpt-3.5-turbo-1106",
    "gpt-4-1106-preview": "gpt-4-1106-preview",
    "meta/code-llama-instruct-34b-chat": "code-llama-instruct-34b-chat",
    "meta/llama-2-70b-chat": "llama-2-70b-chat",
    "mistralai/mistral-7b-chat": "mistral-7b-chat",
    "mistralai/mixtral-8x7b-chat": "mixtral-8x7b-chat",
    "zero-one-ai/Yi-34B-Chat": "Yi-34B-Chat",
}

RESPONSE_SUFFIX = "|model_response"
COST_SUFFIX = "|total_cost"
REQUIRED_COLUMNS = ("sample_id", "prompt", "eval_name")
IGNORED_COLUMNS = ("", "Unnamed: 0", "oracle_model_to_route_to")


def short_model_name(full: str) -> str:
    """The documented short name: the mapping above, else the part after the last ``/``."""
    return ROUTERBENCH_SHORT_NAMES.get(full, full.rsplit("/", 1)[-1])


def file_origin(path: Path) -> str:
    """``train``/``test`` from a ``*_train``/``*_test`` file name, else the file stem."""
    stem = path.stem
    for origin in ("train", "test", "val", "dev"):
        if stem.endswith("_" + origin):
            return origin
    return stem


def _read_rows(path: Path) -> tuple[list[str], Iterator[dict[str, Any]]]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return list(table.column_names), iter(table.to_pylist())
    if path.suffix.lower() in (".pkl", ".pickle"):
        raise DatasetError(
            f"{path}: RouterBench pickles are not read (unpickling can run code); export the frame "
            "with pandas to CSV or Parquet first: pd.read_pickle(p).to_parquet('routerbench.parquet')"
        )
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    handle = open(path, newline="", encoding="utf-8")
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        handle.close()
        raise DatasetError(f"{path}: empty file (no header row)") from None

    def rows() -> Iterator[dict[str, Any]]:
        with handle:
            for i, cells in enumerate(reader):
                if len(cells) != len(header):
                    raise DatasetError(
                        f"{path}: data row {i} has {len(cells)} cells, header has {len(header)}"
                    )
                yield dict(zip(header, cells))

    return header, rows()


def _models_of(path: Path, header: list[str]) -> list[str]:
    for col in REQUIRED_COLUMNS:
        if col not in header:
            raise DatasetError(f"{path}: missing column {col!r} (RouterBench layout needs {REQUIRED_COLUMNS})")
    models = [c[: -len(COST_SUFFIX)] for c in header if c.endswith(COST_SUFFIX)]
    if not models:
        raise DatasetError(f"{path}: no '<model>{COST_SUFFIX}' columns; not a RouterBench table")
    for m in models:
        for col in (m, m + RESPONSE_SUFFIX):
            if col not in header:
                raise DatasetError(f"{path}: missing column {col!r} for model {m!r}")
    return models


def _resolve_duplicates(
    records: list[dict[str, Any]], report: ConversionReport, strict: bool
) -> list[dict[str, Any]]:
    """Apply the duplicate policy of the module docstring; returns the rows kept, in order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["sample_id"], []).append(r)
    drop: set[int] = set()
    for sample_id, group in groups.items():
        if len(group) == 1:
            continue
        first = group[0]
        if strict:
            raise DatasetError(
                f"{group[1]['file']}: data row {group[1]['row']}: duplicate sample_id {sample_id!r} "
                f"(first at {first['file']} data row {first['row']})"
            )
        same = all(g["quality"] == first["quality"] and g["cost"] == first["cost"] for g in group)
        for g in group if not same else group[1:]:
            drop.add(id(g))
            if same:
                detail = f"same outcomes as {first['file']} data row {first['row']}"
            else:
                detail = "rows with this sample_id disagree on quality/cost: all dropped"
            report.drop(g["file"], g["row"], sample_id, "duplicate" if same else "conflicting-duplicate", detail)
    return [r for r in records if id(r) not in drop]


def _record(path: Path, i: int, row: dict[str, Any], models: list[str], origin: str, keep_responses: bool,
            strict: bool, report: ConversionReport) -> dict[str, Any] | None:
    """Data row ``i`` of ``path`` as a record (query, task, per-model quality / cost / response), or
    None when a cell is empty (dropped as ``incomplete`` in ``report``; an error under ``strict``)."""
    where = f"{path.name} data row {i}"
    sample_id = str(row["sample_id"] or "").strip()
    if not sample_id:
        raise DatasetError(f"{where}: empty 'sample_id'")
    missing: list[tuple[str, str]] = []  # (model or "-", column)
    quality, cost, responses = [], [], []
    for m in models:
        q = parse_number(row[m], f"{where}, model {m!r}, column {m!r}", low=0.0, high=1.0)
        c = parse_number(row[m + COST_SUFFIX], f"{where}, model {m!r}, column {m + COST_SUFFIX!r}", low=0.0)
        for value, col in ((q, m), (c, m + COST_SUFFIX)):
            if value is None:
                missing.append((m, col))
        quality.append(q)
        cost.append(c)
        cell = row[m + RESPONSE_SUFFIX]
        if keep_responses and cell not in (None, ""):
            parts = parse_list_literal(str(cell), f"{where}, model {m!r}, column {m + RESPONSE_SUFFIX!r}")
            responses.append("\n".join(parts))
        else:
            responses.append(None)
    prompt = row["prompt"]
    if prompt in (None, ""):
        missing.append(("-", "prompt"))
        text = ""
    else:
        text = "\n\n".join(parse_list_literal(str(prompt), f"{where}, column 'prompt'"))
    if missing:
        detail = "empty cells: " + ", ".join(col for _, col in missing)
        if strict:
            model, col = missing[0]
            raise DatasetError(
                f"{path}: data row {i} (sample_id {sample_id!r}): empty cell in column {col!r} "
                f"(model {model!r}); {len(missing)} empty cells in this row (strict mode)"
            )
        report.drop(path.name, i, sample_id, "incomplete", detail)
        return None
    return {
        "file": path.name, "row": i, "sample_id": sample_id, "origin": origin,
        "task": str(row["eval_name"]), "query": text,
        "quality": quality, "cost": cost, "responses": responses,
    }


def _dataset(kept: list[dict[str, Any]], full_models: list[str], paths: list[Path], keep_responses: bool,
             name: str, report: ConversionReport) -> RoutingDataset:
    """The dataset of the kept records; model names shortened unless that would merge two models."""
    short = [short_model_name(m) for m in full_models]
    if len(set(short)) != len(short):
        short = list(full_models)  # shortening would merge two models: keep the full names
    return RoutingDataset(
        queries=[r["query"] for r in kept],
        models=short,
        quality=np.array([r["quality"] for r in kept], dtype=np.float64),
        cost=np.array([r["cost"] for r in kept], dtype=np.float64),
        responses=np.array([r["responses"] for r in kept], dtype=object) if keep_responses else None,
        tasks=[r["task"] for r in kept],
        query_ids=[f"{r['origin']}:{r['sample_id']}" for r in kept],
        metadata={
            "source": "routerbench",
            "files": [p.name for p in paths],
            "original_model_names": dict(zip(short, full_models)),
            "quality": "RouterBench per-query score in [0, 1] (0/1 correctness for these tasks)",
            "cost_source": "RouterBench '<model>|total_cost' column (USD per query)",
            "query_id_format": "<origin>:<sample_id>, origin = train/test from the file name",
            "conversion_report": report.to_dict(),
        },
        name=name,
    )


def convert_routerbench(
    files: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    strict: bool = False,
    name: str = "routerbench",
    keep_responses: bool = True,
) -> RoutingDataset:
    """Convert one or more RouterBench-layout tables (see the module docstring) to one dataset."""
    paths = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
    if not paths:
        raise DatasetError("convert_routerbench: no files given")
    report = ConversionReport(source=name)
    full_models: list[str] | None = None
    records: list[dict[str, Any]] = []  # complete rows, in file order
    for path in paths:
        if not path.is_file():
            raise DatasetError(f"{path}: file not found")
        header, rows = _read_rows(path)
        models = _models_of(path, header)
        if full_models is None:
            full_models = models
        elif sorted(models) != sorted(full_models):
            raise DatasetError(
                f"{path}: models {sorted(models)} differ from the first file's {sorted(full_models)}"
            )
        origin = file_origin(path)
        n_read = 0
        for i, row in enumerate(rows):
            n_read += 1
            record = _record(path, i, row, full_models, origin, keep_responses, strict, report)
            if record is not None:
                records.append(record)
        report.files[path.name] = {"read": n_read, "kept": 0}
        report.rows_read += n_read
    kept = _resolve_duplicates(records, report, strict)
    for r in kept:
        report.files[r["file"]]["kept"] += 1
    report.rows_kept = len(kept)
    report.log()
    if not kept:
        raise DatasetError(f"{name}: no complete rows in {[str(p) for p in paths]} ({report.summary()})")
    assert full_models is not None
    return _dataset(kept, full_models, paths, keep_responses, name, report)
