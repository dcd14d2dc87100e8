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

File type by extension: ``.csv`` (UTF-8, a byte-order mark is fine), ``.jsonl``/``.ndjson`` (one
JSON object per line; lines end only at a line feed (CRLF is fine), so U+2028, U+2029 and U+0085
inside a string are text), ``.parquet`` (one file, not a folder). A CSV whose header is one cell
holding ``;``, a tab or ``|`` (or whose rows do not have the header's cell count while the header
holds ``;`` or a tab) is refused with a hint to save it comma-separated. CSV quoting is strict: a
quote that is never closed (it would swallow every later row into one cell) or text after a closing
quote is an error naming the line. A repeated column (CSV header, Parquet schema) or a repeated key
in a JSONL object is an error, except a repeated unnamed (blank) column, such as the trailing empty
columns of a spreadsheet export: no mapping can name it, so it is ignored like any unmapped column.
A missing column names the nearest column the file has (``' a_ok'`` for ``'a_ok'``). The mapping is
checked before any row is read (:mod:`cascade_routing.data.import_mapping`: unknown keys, templates
without ``{model}``, one column for two models, a feature column that is a quality column, fewer than
two models are errors). Every
problem raises :class:`DatasetError` naming the file, the data row (0-based, header and blank lines
not counted) with its line in a text file, the model and the column; a file that cannot be read, or
an output folder that cannot be written, names the path; an empty or absent cell names its model and
role (quality, cost, feature) too. Quality is a number in [0, 1] or a boolean
(``true``/``false`` in any case); cost and features are numbers. A cost above :data:`MAX_COST_USD`
(1e6 USD: no single query costs a million dollars, so such a value is a unit or export mistake, and
values near the float limit overflow the cost estimates later) is an error. A cost more than
:data:`COST_OUTLIER_FACTOR` (1000) times the median of its model's cost column (when that median
is above 0) is kept but warned about (a :class:`CostOutlierWarning` naming the row, model and column, also
listed in ``metadata["conversion_report"]["notes"]``). Query ids and task labels, when mapped, must
be present in every row (``missing: drop`` does not drop a row for them), and ids unique; the query
text must be non-blank. A NaN number (JSONL ``NaN``, a Parquet float NaN, as pandas writes a missing
value) is an empty cell; the text ``nan`` in a CSV is not a number. With ``missing: drop`` a row whose
query, quality, cost or feature cell is empty (or absent from a JSONL object) is dropped and listed in
``metadata["conversion_report"]``; when that drops every row, the error names the columns empty in
every row.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
import sys
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cascade_routing.data.converters.common import ConversionReport, parse_number
from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.data.errors import DatasetError
from cascade_routing.data.import_mapping import ImportSpec, load_mapping, parse_mapping, read_utf8

__all__ = ["COST_OUTLIER_FACTOR", "MAX_COST_USD", "CostOutlierWarning", "import_table", "load_mapping"]

MAX_COST_USD = 1e6
"""The largest cost (USD per query) accepted; anything above cannot be a per-query price."""
COST_OUTLIER_FACTOR = 1000.0
"""A cost more than this many times its model column's median (when > 0) is warned about, not refused."""


class CostOutlierWarning(UserWarning):
    """A cost far above the rest of its model's column (kept; likely a unit or export mistake)."""


@dataclass(frozen=True)
class SourceRow:
    """One data row of the table: its 0-based index (header and blank lines not counted), the line it
    starts on in a text file, and its cells."""

    index: int
    line: int | None
    cells: Mapping[str, Any]

    def where(self, file: Path) -> str:
        return f"{file.name} data row {self.index}" + (f" (line {self.line})" if self.line else "")


def _separator_hint(header: Sequence[str], *, mismatch: bool = False) -> str:
    """A hint that the CSV is not comma-separated: when the header is one cell holding ``;``, a tab or
    ``|``, or (``mismatch``: a row's cell count differs from the header's) any header cell holds ``;``
    or a tab. Empty otherwise."""
    if len(header) == 1:
        sep = next((s for s in ";\t|" if s in header[0]), None)
        return f" (the header is one column: is the file {sep!r}-separated? save it comma-separated)" if sep else ""
    if mismatch:
        sep = next((s for s in ";\t" if any(s in col for col in header)), None)
        return (f" (the header holds {sep!r}: is the file {sep!r}-separated? save it comma-separated)"
                if sep else "")
    return ""


def _check_unique_columns(path: Path, names: Sequence[str], where: str) -> None:
    """DatasetError naming the first column of ``names`` that occurs twice and both positions (1-based):
    a row dict would keep only one of the two columns. Blank names are skipped: no mapping can name
    such a column (a spreadsheet's trailing empty columns), so which of them a row dict keeps is moot."""
    seen: dict[str, int] = {}
    for i, col in enumerate(names):
        if not col.strip():
            continue
        if col in seen:
            raise DatasetError(f"{path}: the {where} repeats column {col!r} (positions {seen[col] + 1} and "
                               f"{i + 1}); rename one of them")
        seen[col] = i


def _read_csv(path: Path) -> tuple[list[SourceRow], set[str]]:
    """The data rows of a CSV file and its header's column names (every row has all of them)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # strict: a quote left open (which would swallow every later row into one cell) or text after a
    # closing quote is an error, not a guess
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""), strict=True)
    header: list[str] | None = None
    rows: list[SourceRow] = []
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            hint = " (a quote opened on or after this line is never closed)" if "end of data" in str(err) else ""
            raise DatasetError(f"{path}: line {line}: malformed CSV: {err}{hint}") from None
        if not cells:
            continue
        if header is None:
            header = cells
            _check_unique_columns(path, header, "header")
            continue
        if len(cells) != len(header):
            raise DatasetError(f"{path}: data row {len(rows)} (line {line}) has {len(cells)} cells, the header has "
                               f"{len(header)}{_separator_hint(header, mismatch=True)}")
        rows.append(SourceRow(len(rows), line, dict(zip(header, cells))))
    return rows, set(header or ())


class _RepeatedKey(ValueError):
    """A JSON object names the same key twice (``json.loads`` would keep the last value silently)."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads`: the object as a dict; a repeated key raises
    :class:`_RepeatedKey` naming it."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _parse_json_line(path: Path, number: int, line: str) -> Any:
    """The JSON value on line ``number`` (1-based) of ``path``; malformed JSON, a repeated key, a
    number Python will not read (an integer of thousands of digits) or nesting too deep to parse is a
    :class:`DatasetError` naming the file and line."""
    try:
        return json.loads(line, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: line {number} is not valid JSON: {err}") from None
    except _RepeatedKey as err:
        raise DatasetError(f"{path}: line {number}: the object repeats key {err.args[0]!r}; "
                           "which value is meant is ambiguous, keep one") from None
    except ValueError as err:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        raise DatasetError(f"{path}: line {number}: cannot read a value: {err}") from None
    except RecursionError:
        raise DatasetError(f"{path}: line {number}: JSON nested too deeply to read") from None


def _read_jsonl(path: Path) -> list[SourceRow]:
    """One JSON object per line. Lines end at a line feed (a carriage return before it is dropped; the
    last line may lack it) and at nothing else: ``str.splitlines`` would also split at U+2028, U+2029,
    U+0085 and other characters that ``json.dumps(..., ensure_ascii=False)`` leaves unescaped inside strings.
    An object that repeats a key is an error (see :func:`_parse_json_line`)."""
    rows: list[SourceRow] = []
    for i, line in enumerate(read_utf8(path).split("\n")):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        obj = _parse_json_line(path, i + 1, line)
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}: line {i + 1} is not a JSON object")
        rows.append(SourceRow(len(rows), i + 1, obj))
    return rows


def _read_parquet(path: Path) -> tuple[list[SourceRow], set[str]]:
    """The rows and column names of a Parquet file. A repeated column name is an error (a row dict
    would keep one of the two columns silently)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        _check_unique_columns(path, pq.read_schema(path).names, "table")
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{path}: cannot read Parquet: {err}") from None
    return [SourceRow(i, None, r) for i, r in enumerate(table.to_pylist())], set(table.column_names)


def _read_table(path: Path) -> tuple[list[SourceRow], set[str]]:
    """The data rows of ``path`` and every column name that occurs in it. ``path`` must be one file
    (a folder, such as a partitioned Parquet dataset, is an error saying so)."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder, not a table file; give the .csv, .jsonl/.ndjson or .parquet "
                           "file itself (a partitioned Parquet folder must be written as one file)")
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix in (".jsonl", ".ndjson"):
        rows = _read_jsonl(path)  # objects may differ in their keys
        return rows, set().union(*(r.cells.keys() for r in rows))
    hint = (" (a .json file: write one object per line as .jsonl, e.g. pandas "
            "to_json(path, orient='records', lines=True))" if suffix == ".json" else "")
    raise DatasetError(f"{path}: unsupported file type {suffix!r} (use .csv, .jsonl/.ndjson or .parquet){hint}")


def _check_columns(file: Path, spec: ImportSpec, columns: set[str]) -> None:
    """DatasetError naming the first mapped column that ``columns`` lacks, its role, the nearest column
    the file has (a case or whitespace slip: ``' a_ok'`` for ``'a_ok'``) and every column."""
    for col, role in spec.columns().items():
        if col not in columns:
            who = "" if role in ("query", "query_id", "task") else f" ({role})"
            close = difflib.get_close_matches(col, list(columns), n=1, cutoff=0.8)
            near = f" (did you mean {close[0]!r}?)" if close else ""
            hint = _separator_hint(sorted(columns)) if file.suffix.lower() == ".csv" else ""
            raise DatasetError(f"{file}: missing column {col!r}{who}{near}; columns are {sorted(columns)}{hint}")


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _label(row: SourceRow, column: str, what: str, where: str) -> str:
    """A query id or task label: present, non-blank text or a number."""
    if column not in row.cells:
        raise DatasetError(f"{where}: no field {column!r} (the {what})")
    value = row.cells[column]
    if _is_empty(value):
        raise DatasetError(f"{where}: empty {what} in column {column!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetError(f"{where}: the {what} in column {column!r} must be text or a number, got {value!r}")
    return str(value)


def _response(value: Any, where: str) -> str | None:
    if _is_empty(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetError(f"{where}: a response must be text, got {type(value).__name__} {value!r}")
    return str(value)


def _model_cells(row: SourceRow, where: str, spec: ImportSpec
                 ) -> tuple[list, list, list, dict[str, list], list[str]]:
    """One row's per-model quality, cost, response and feature cells (parsed and range-checked), and
    the columns whose cell is empty or absent."""
    features = spec.feature_names
    q_row, c_row, r_row, f_row, missing = [], [], [], {f: [] for f in features}, []
    cells = row.cells
    for m, cols in spec.models.items():
        q = parse_number(cells.get(cols.quality), f"{where}, model {m!r}, column {cols.quality!r}", low=0.0, high=1.0)
        at = f"{where}, model {m!r}, column {cols.cost!r}"
        c = parse_number(cells.get(cols.cost), at, low=0.0, booleans=False)
        if c is not None and c > MAX_COST_USD:
            raise DatasetError(f"{at}: cost {c:.6g} is above {MAX_COST_USD:.0e} USD, the most a single query can "
                               "cost (MAX_COST_USD); is the column in USD per query?")
        missing += [col for col, v in ((cols.quality, q), (cols.cost, c)) if v is None]
        q_row.append(q)
        c_row.append(c)
        r_row.append(_response(cells.get(cols.response), f"{where}, model {m!r}, column {cols.response!r}")
                     if cols.response else None)
        for f in features:
            col = cols.features[f]
            at = f"{where}, model {m!r}, column {col!r}"
            v = parse_number(cells.get(col), at, booleans=False)
            if v is None:
                missing.append(col)
            elif f == "logprob_confidence" and v > 0:
                raise DatasetError(f"{at}: logprob_confidence must be a log-probability (<= 0), got {v:.6g} "
                                   "(give a probability p as log(p))")
            f_row[f].append(v)
    return q_row, c_row, r_row, f_row, missing


def _cost_outliers(file: Path, spec: ImportSpec, cost: np.ndarray, wheres: list[str]) -> list[str]:
    """One message per model cost column holding a cost above ``COST_OUTLIER_FACTOR`` times the
    column's median (skipped when the median is 0), naming the rows (the first five), model and column."""
    out = []
    for j, (m, cols) in enumerate(spec.models.items()):
        median = float(np.median(cost[:, j]))
        if median <= 0:
            continue
        rows = np.flatnonzero(cost[:, j] > COST_OUTLIER_FACTOR * median)
        if rows.size:
            listed = "; ".join(f"{wheres[i]}: {cost[i, j]:.6g}" for i in rows[:5])
            more = f" and {rows.size - 5} more" if rows.size > 5 else ""
            out.append(f"{file.name}: model {m!r}, column {cols.cost!r}: {rows.size} cost(s) over "
                       f"{COST_OUTLIER_FACTOR:g}x the column's median {median:.6g} USD ({listed}{more}); "
                       "kept, but check the unit")
    return out


def _always_empty(spec: ImportSpec, empty_counts: Mapping[str, int], num_rows: int) -> str:
    """``"; empty in every row: column 'x' (model 'm', quality), ..."`` for the columns empty in all
    ``num_rows`` rows (why ``missing: drop`` dropped everything); empty when there is none."""
    roles = spec.columns()
    cols = [c for c, n in empty_counts.items() if n == num_rows]
    if not cols:
        return ""
    return "; empty in every row: " + ", ".join(f"column {c!r} ({roles.get(c, 'mapped')})" for c in cols)


def import_table(
    path: str | os.PathLike[str], mapping: str | os.PathLike[str] | Mapping[str, Any], *, name: str | None = None
) -> RoutingDataset:
    """Read ``path`` with the column ``mapping`` (module docstring) into a validated dataset.

    Raises :class:`DatasetError` on any bad cell (a cost above :data:`MAX_COST_USD` included); warns
    with :class:`CostOutlierWarning` about costs far above their column's median (rows kept)."""
    file = Path(path)
    spec = parse_mapping(load_mapping(mapping))
    rows, columns = _read_table(file)
    if not rows:
        raise DatasetError(f"{file}: empty dataset (no data rows)")
    _check_columns(file, spec, columns)
    report = ConversionReport(source=name or spec.name or file.stem, rows_read=len(rows))
    queries, ids, tasks, qual, cost, resp, wheres = [], [], [], [], [], [], []
    feats: dict[str, list[list[float]]] = {f: [] for f in spec.feature_names}
    first_seen: dict[str, str] = {}
    roles = spec.columns()
    empty_counts: Counter[str] = Counter()  # column -> rows dropped with it empty
    for row in rows:
        where = row.where(file)
        qid = _label(row, spec.query_id, "query id", where) if spec.query_id else str(row.index)
        if qid in first_seen:
            raise DatasetError(f"{where}: duplicate query id {qid!r} in column {spec.query_id!r} "
                               f"(first at {first_seen[qid]})")
        first_seen[qid] = where
        task = _label(row, spec.task, "task label", where) if spec.task else None
        q_row, c_row, r_row, f_row, missing = _model_cells(row, where, spec)
        text = row.cells.get(spec.query)
        if _is_empty(text):
            missing.append(spec.query)
        elif not isinstance(text, str):
            raise DatasetError(f"{where}: the query in column {spec.query!r} must be text, got "
                               f"{type(text).__name__} {text!r}")
        if missing:
            if spec.missing == "error":
                state = "empty" if missing[0] in row.cells else "absent"
                raise DatasetError(f"{where}: {state} cell in column {missing[0]!r} ({roles[missing[0]]}; "
                                   f"{len(missing)} empty or absent in this row); "
                                   "set `missing: drop` in the mapping to drop such rows")
            report.drop(file.name, row.index, qid, "incomplete", "empty cells: " + ", ".join(missing))
            empty_counts.update(missing)
            continue
        queries.append(text)
        wheres.append(where)
        ids.append(qid)
        tasks.append(task)
        qual.append(q_row)
        cost.append(c_row)
        resp.append(r_row)
        for f, values in f_row.items():
            feats[f].append(values)
    report.rows_kept = len(queries)
    report.files[file.name] = {"read": len(rows), "kept": len(queries)}
    report.log()
    if not queries:
        raise DatasetError(f"{file}: empty dataset (every row was dropped: {report.summary()})"
                           + _always_empty(spec, empty_counts, len(rows)))
    cost_array = np.array(cost, dtype=np.float64)
    for message in _cost_outliers(file, spec, cost_array, wheres):
        report.notes.append(message)
        warnings.warn(message, CostOutlierWarning, stacklevel=2)
    return RoutingDataset(
        queries=queries,
        models=list(spec.models),
        quality=np.array(qual, dtype=np.float64),
        cost=cost_array,
        responses=np.array(resp, dtype=object) if any(c.response for c in spec.models.values()) else None,
        features={f: np.array(v, dtype=np.float64) for f, v in feats.items()},
        tasks=tasks if spec.task else None,
        query_ids=ids,
        metadata={"source": str(file), "mapping": spec.raw, "cost_source": "user-supplied cost column (USD per query)",
                  "conversion_report": report.to_dict()},
        name=report.source,
    )
