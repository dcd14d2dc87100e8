"""Bring your own data: a CSV, JSONL or Parquet table plus a column mapping -> :class:`RoutingDataset`.

One row per query. The mapping (a dict, or a YAML/JSON file) says which column holds what::

    query: question            # required: the query text
    query_id: id               # optional (default: the 0-based row number)
    task: subject              # optional task label (used to stratify splits)
    name: my-data              # optional dataset name (default: the file stem)
    missing: error             # "error" (default) or "drop": rows with an empty quality/cost cell
    models:                    # required; either one entry per model ...
      gpt-4o:
        quality: gpt4o_correct     # required: a number in [0, 1] or true/false
        cost: gpt4o_cost           # required: USD per query, >= 0
        response: gpt4o_answer     # optional: the answer text
        features:                  # optional numeric per-(query, model) columns
          logprob_confidence: gpt4o_logprob
          tokens_out: gpt4o_tokens

or, when the columns follow a pattern, a list of model names and column templates in which
``{model}`` is replaced by each name::

    query: question
    models: [gpt-4o, llama-3-8b]
    quality: "{model}_correct"
    cost: "{model}_cost"
    response: "{model}_answer"            # optional
    features: {latency_ms: "{model}_ms"}  # optional

File type by extension: ``.csv``, ``.jsonl``/``.ndjson`` (one JSON object per line), ``.parquet``.
Every problem raises :class:`DatasetError` naming the file, row, model and column; with
``missing: drop`` incomplete rows are dropped and listed in ``metadata["conversion_report"]``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cascade_routing.data.converters.common import ConversionReport, parse_number
from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.data.errors import DatasetError


def _read_utf8(path: Path) -> str:
    """The text of ``path``; a file that is not UTF-8 is an error naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DatasetError(f"{path}: line {line} is not valid UTF-8 (byte {err.start}: {err.reason}); "
                           "save the file as UTF-8") from None


def _unique_key_loader():
    """A YAML SafeLoader that refuses a mapping with a repeated key (PyYAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # type: ignore[override]
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (line {line}; first on line {seen[key]})",
                        key_node.start_mark)
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return Loader


def load_mapping(mapping: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A mapping dict from a dict, a YAML/JSON file, or an inline JSON/YAML string.

    A string without a newline that names a ``.yaml``/``.yml``/``.json`` file or has no ``:`` is
    a path: a missing file is an error, never parsed as YAML text. Repeated keys are an error.
    """
    if isinstance(mapping, Mapping):
        return dict(mapping)
    import yaml

    text = str(mapping)
    path = Path(text)
    where = "mapping"
    if path.is_file():
        text, where = _read_utf8(path), str(path)
    elif "\n" not in text and (path.suffix.lower() in (".yaml", ".yml", ".json") or ":" not in text):
        raise DatasetError(f"mapping file {text} does not exist")
    try:
        value = yaml.load(text, Loader=_unique_key_loader())  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise DatasetError(f"{where}: cannot parse the column mapping: {err}") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: the column mapping must be a mapping (see cascade_routing.data.importer)")
    return value


def _model_columns(mapping: dict[str, Any]) -> dict[str, dict[str, Any]]:
    models = mapping.get("models")
    if isinstance(models, list):
        if not models:
            raise DatasetError("mapping: 'models' is an empty list")
        out = {}
        for m in models:
            name = str(m)
            entry: dict[str, Any] = {}
            for key in ("quality", "cost", "response"):
                if key in mapping:
                    entry[key] = str(mapping[key]).replace("{model}", name)
            entry["features"] = {k: str(v).replace("{model}", name) for k, v in (mapping.get("features") or {}).items()}
            out[name] = entry
        if len(out) != len(models):
            raise DatasetError(f"mapping: duplicate model names in {models}")
        return out
    if isinstance(models, dict) and models:
        return {str(k): dict(v or {}) for k, v in models.items()}
    raise DatasetError("mapping: 'models' must be a non-empty list of names or a dict name -> columns")


def _read_table(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as err:
            raise DatasetError(f"{path}: cannot read Parquet: {err}") from None
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(_read_utf8(path).splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}: line {i + 1} is not valid JSON: {err}") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}: line {i + 1} is not a JSON object")
            rows.append(obj)
        return rows
    if suffix == ".csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        rows = list(csv.DictReader(io.StringIO(_read_utf8(path), newline="")))
        for i, row in enumerate(rows):
            if None in row or any(v is None for v in row.values()):
                raise DatasetError(f"{path}: data row {i} has a different number of cells than the header")
        return rows
    raise DatasetError(f"{path}: unsupported file type {suffix!r} (use .csv, .jsonl or .parquet)")


def _check_columns(file: Path, spec: Mapping[str, Any], models: dict[str, dict[str, Any]], columns: set[str]
                   ) -> list[str]:
    """Raise unless every column the mapping names is in the table's ``columns`` and every model maps
    the same features; return the feature names, sorted."""
    needed = {("-", "query"): spec["query"]}
    for key in ("query_id", "task"):
        if spec.get(key):
            needed[("-", key)] = spec[key]
    for m, entry in models.items():
        for key in ("quality", "cost"):
            if not entry.get(key):
                raise DatasetError(f"mapping: model {m!r} has no {key!r} column")
            needed[(m, key)] = entry[key]
        if entry.get("response"):
            needed[(m, "response")] = entry["response"]
        for f, col in (entry.get("features") or {}).items():
            needed[(m, f"feature {f}")] = col
    for (m, role), col in needed.items():
        if col not in columns:
            who = "" if m == "-" else f" (model {m!r}, {role})"
            raise DatasetError(f"{file}: missing column {col!r}{who}; columns are {sorted(columns)}")
    feature_names = sorted({f for e in models.values() for f in (e.get("features") or {})})
    for m, e in models.items():
        if sorted(e.get("features") or {}) != feature_names:
            raise DatasetError(f"mapping: model {m!r} lacks features {sorted(set(feature_names) - set(e.get('features') or {}))}")
    return feature_names


def _model_cells(row: Mapping[str, Any], where: str, models: dict[str, dict[str, Any]], feature_names: list[str]
                 ) -> tuple[list, list, list, dict[str, list], list[str]]:
    """One row's per-model quality, cost, response and feature cells (parsed and range-checked), and
    the columns whose cell is empty."""
    q_row, c_row, r_row, f_row, missing = [], [], [], {f: [] for f in feature_names}, []
    for m, e in models.items():
        q = parse_number(row.get(e["quality"]), f"{where}, model {m!r}, column {e['quality']!r}", low=0.0, high=1.0)
        c = parse_number(row.get(e["cost"]), f"{where}, model {m!r}, column {e['cost']!r}", low=0.0)
        missing += [col for col, v in ((e["quality"], q), (e["cost"], c)) if v is None]
        q_row.append(q)
        c_row.append(c)
        r = row.get(e["response"]) if e.get("response") else None
        r_row.append(None if r is None or r == "" else str(r))
        for f in feature_names:
            col = e["features"][f]
            v = parse_number(row.get(col), f"{where}, model {m!r}, column {col!r}")
            if v is None:
                missing.append(col)
            f_row[f].append(v)
    return q_row, c_row, r_row, f_row, missing


def import_table(
    path: str | os.PathLike[str], mapping: str | os.PathLike[str] | Mapping[str, Any], *, name: str | None = None
) -> RoutingDataset:
    """Read ``path`` with the column ``mapping`` (module docstring) into a validated dataset."""
    file = Path(path)
    spec = load_mapping(mapping)
    if "query" not in spec:
        raise DatasetError("mapping: missing required key 'query' (the query-text column)")
    policy = str(spec.get("missing", "error"))
    if policy not in ("error", "drop"):
        raise DatasetError(f"mapping: 'missing' must be 'error' or 'drop', got {policy!r}")
    models = _model_columns(spec)
    rows = _read_table(file)
    if not rows:
        raise DatasetError(f"{file}: empty dataset (no data rows)")
    feature_names = _check_columns(file, spec, models, set().union(*(r.keys() for r in rows[:1])))
    report = ConversionReport(source=name or spec.get("name") or file.stem, rows_read=len(rows))
    queries, ids, tasks, qual, cost, resp = [], [], [], [], [], []
    feats: dict[str, list[list[float]]] = {f: [] for f in feature_names}
    any_response = any(e.get("response") for e in models.values())
    for i, row in enumerate(rows):
        where = f"{file.name} row {i}"
        q_row, c_row, r_row, f_row, missing = _model_cells(row, where, models, feature_names)
        text = row.get(spec["query"])
        if text is None or text == "":
            missing.append(spec["query"])
        qid = str(row.get(spec["query_id"])) if spec.get("query_id") else str(i)
        if missing:
            if policy == "error":
                raise DatasetError(f"{where}: empty cell in column {missing[0]!r} ({len(missing)} empty in this row); "
                                   "set `missing: drop` in the mapping to drop such rows")
            report.drop(file.name, i, qid, "incomplete", "empty cells: " + ", ".join(missing))
            continue
        queries.append(str(text))
        ids.append(qid)
        if spec.get("task"):
            tasks.append(str(row.get(spec["task"])))
        qual.append(q_row)
        cost.append(c_row)
        resp.append(r_row)
        for f in feature_names:
            feats[f].append(f_row[f])
    report.rows_kept = len(queries)
    report.files[file.name] = {"read": len(rows), "kept": len(queries)}
    report.log()
    if not queries:
        raise DatasetError(f"{file}: empty dataset (every row was dropped: {report.summary()})")
    return RoutingDataset(
        queries=queries,
        models=list(models),
        quality=np.array(qual, dtype=np.float64),
        cost=np.array(cost, dtype=np.float64),
        responses=np.array(resp, dtype=object) if any_response else None,
        features={f: np.array(v, dtype=np.float64) for f, v in feats.items()},
        tasks=tasks if spec.get("task") else None,
        query_ids=ids,
        metadata={"source": str(file), "mapping": spec, "cost_source": "user-supplied cost column (USD per query)",
                  "conversion_report": report.to_dict()},
        name=report.source,
    )
