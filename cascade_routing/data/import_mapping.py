"""The column mapping of :mod:`cascade_routing.data.importer`: read it and check it before any row is read.

:func:`load_mapping` reads a dict, a YAML/JSON file or an inline YAML/JSON string (a repeated key is
an error). :func:`parse_mapping` checks it against the schema in the importer's docstring and
returns an :class:`ImportSpec`. Every mistake that would otherwise import wrong data with no error
is refused here, naming the key:

- an unknown key (a misspelt ``querry_id`` would silently number the queries 0..N-1);
- a column name that is not a string (a list, a number, null), or a model name that is not one;
  a name YAML reads as a number or boolean (``3.5``, ``yes``) and an unquoted ``{model}``
  template (YAML reads ``{`` as a mapping) get a hint to quote them;
- a template without ``{model}`` in the list form with several models (every model would read
  the same quality column);
- one column used twice among the models' quality, cost and response columns, or a model column
  that is also the query, id or task column;
- a feature column that is a model's quality column (the estimator would be fed the label);
- fewer than two models (there is nothing to route between).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade_routing.data.errors import DatasetError

TOP_LEVEL_KEYS = ("query", "query_id", "task", "name", "missing", "models", "quality", "cost", "response",
                  "features")
MODEL_KEYS = ("quality", "cost", "response", "features")
MISSING_POLICIES = ("error", "drop")
MODEL_PLACEHOLDER = "{model}"


@dataclass(frozen=True)
class ModelColumns:
    """The columns of one model: quality and cost (required), response (optional), features name -> column."""

    quality: str
    cost: str
    response: str | None
    features: dict[str, str]

    def outcomes(self) -> list[tuple[str, str]]:
        """``(role, column)`` for quality, cost and (when mapped) response."""
        return [(role, col) for role, col in (("quality", self.quality), ("cost", self.cost),
                                              ("response", self.response)) if col]


@dataclass(frozen=True)
class ImportSpec:
    """A checked column mapping."""

    query: str
    query_id: str | None
    task: str | None
    name: str | None
    missing: str
    models: dict[str, ModelColumns]
    feature_names: list[str]  # sorted; every model maps the same ones
    raw: dict[str, Any]  # the mapping as given (stored in the dataset's metadata)

    def columns(self) -> dict[str, str]:
        """Every column the mapping names -> what it holds (for the missing-column check)."""
        out = {self.query: "query"}
        for key in ("query_id", "task"):
            if getattr(self, key):
                out.setdefault(getattr(self, key), key)
        for m, cols in self.models.items():
            for role, col in cols.outcomes():
                out.setdefault(col, f"model {m!r}, {role}")
            for f, col in cols.features.items():
                out.setdefault(col, f"model {m!r}, feature {f}")
        return out


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


def read_utf8(path: Path) -> str:
    """The text of ``path`` (a UTF-8 byte-order mark is dropped); not UTF-8, or a file the OS will not
    let us read (permissions, ...), is a :class:`DatasetError` naming the file (and the line)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the file: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DatasetError(f"{path}: line {line} is not valid UTF-8 (byte {err.start}: {err.reason}); "
                           "save the file as UTF-8") from None


def load_mapping(mapping: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A mapping dict from a dict, a YAML/JSON file, or an inline JSON/YAML string.

    A string without a newline that names a ``.yaml``/``.yml``/``.json`` file or has no ``:`` is
    a path: a missing file is an error, never parsed as YAML text. Repeated keys are an error.
    """
    if isinstance(mapping, Mapping):
        return dict(mapping)
    import yaml

    text = str(mapping)
    if not text.strip():
        raise DatasetError("the column mapping is empty: give a YAML/JSON file or an inline mapping")
    path = Path(text)
    where = "mapping"
    if path.is_dir():
        raise DatasetError(f"mapping file {text} is a directory")
    if path.is_file():
        text, where = read_utf8(path), str(path)
    elif "\n" not in text and (path.suffix.lower() in (".yaml", ".yml", ".json") or ":" not in text):
        raise DatasetError(f"mapping file {text} does not exist")
    try:
        value = yaml.load(text, Loader=_unique_key_loader())  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        hint = _UNQUOTED_TEMPLATE_HINT if re.search(r":\s*\{model\}", text) else ""
        raise DatasetError(f"{where}: cannot parse the column mapping: {err}{hint}") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: the column mapping must be a mapping (see cascade_routing.data.importer)")
    return value


def _unknown_keys(given: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DatasetError(f"{where}: unknown key {key!r}{hint}; allowed keys are {list(allowed)}")


_UNQUOTED_TEMPLATE_HINT = (f" (YAML reads an unquoted {MODEL_PLACEHOLDER} as a mapping: quote each template, e.g. "
                           f"quality: \"{MODEL_PLACEHOLDER}_ok\")")


def _quote_hint(value: Any) -> str:
    """A hint for a value YAML parsed as something other than the string the user wrote: an unquoted
    ``{model}`` (read as the mapping ``{'model': None}``) or a name such as ``3.5``, ``2024`` or ``yes``
    (read as a number or boolean). Empty for anything else."""
    if isinstance(value, Mapping) and len(value) == 1 and MODEL_PLACEHOLDER[1:-1] in value:
        return _UNQUOTED_TEMPLATE_HINT
    if isinstance(value, bool):
        return " (YAML read it as a boolean: quote the name as written, e.g. 'yes')"
    if isinstance(value, (int, float)):
        return f" (YAML read it as a {type(value).__name__}: quote the name as written, e.g. '{value}')"
    return ""


def _column(value: Any, where: str, what: str = "a column name") -> str:
    """``value`` when it is a non-blank string; otherwise a :class:`DatasetError` saying that the value
    at ``where`` must be ``what`` (with a hint to quote it when YAML read it as another type)."""
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where} must be {what} (a non-empty string), got {value!r}{_quote_hint(value)}")
    return value


def _features(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DatasetError(f"{where} must map feature names to columns, e.g. {{logprob_confidence: gpt4_lp}}; "
                           f"got {value!r}")
    return {_column(k, f"{where}: a feature name"): _column(v, f"{where} {k!r}") for k, v in value.items()}


def _template_models(spec: Mapping[str, Any], names: list[Any]) -> dict[str, ModelColumns]:
    models = [_column(n, "mapping: each entry of 'models'", "a model name") for n in names]
    if len(set(models)) != len(models):
        raise DatasetError(f"mapping: duplicate model names in {models}")
    templates = {key: _column(spec[key], f"mapping: {key!r}") for key in ("quality", "cost", "response")
                 if spec.get(key) is not None}
    for key in ("quality", "cost"):
        if key not in templates:
            raise DatasetError(f"mapping: the list form of 'models' needs a {key!r} column template such as "
                               f"\"{MODEL_PLACEHOLDER}_{key}\"")
    if len(models) > 1:
        for key, template in templates.items():
            if MODEL_PLACEHOLDER not in template:
                raise DatasetError(f"mapping: {key!r} template {template!r} has no {MODEL_PLACEHOLDER}, so every "
                                   f"model would read the same column; write e.g. \"{MODEL_PLACEHOLDER}_{key}\"")
    features = _features(spec.get("features"), "mapping: 'features'")
    return {m: ModelColumns(quality=templates["quality"].replace(MODEL_PLACEHOLDER, m),
                            cost=templates["cost"].replace(MODEL_PLACEHOLDER, m),
                            response=templates["response"].replace(MODEL_PLACEHOLDER, m)
                            if "response" in templates else None,
                            features={f: col.replace(MODEL_PLACEHOLDER, m) for f, col in features.items()})
            for m in models}


def _explicit_models(models: Mapping[Any, Any], spec: Mapping[str, Any]) -> dict[str, ModelColumns]:
    for key in ("quality", "cost", "response", "features"):
        if key in spec:
            raise DatasetError(f"mapping: top-level {key!r} is a column template for the list form of 'models'; "
                               "with one entry per model, give it inside each model's entry")
    out = {}
    for name, entry in models.items():
        m = _column(name, "mapping: each key of 'models'", "a model name")
        where = f"mapping: model {m!r}"
        if not isinstance(entry, Mapping):
            raise DatasetError(f"{where} must map quality/cost/response/features to columns, e.g. "
                               f"{{quality: {m}_ok, cost: {m}_usd}}; got {entry!r}")
        _unknown_keys(entry, MODEL_KEYS, where)
        for key in ("quality", "cost"):
            if entry.get(key) is None:
                raise DatasetError(f"{where} has no {key!r} column")
        out[m] = ModelColumns(quality=_column(entry["quality"], f"{where}, 'quality'"),
                              cost=_column(entry["cost"], f"{where}, 'cost'"),
                              response=None if entry.get("response") is None
                              else _column(entry["response"], f"{where}, 'response'"),
                              features=_features(entry.get("features"), f"{where}, 'features'"))
    return out


def _check_distinct(spec: ImportSpec) -> None:
    """No column is two models' (or two roles') quality/cost/response, nor also the query/id/task column."""
    owner: dict[str, str] = {}
    for key in ("query", "query_id", "task"):
        col = getattr(spec, key)
        if col:
            owner.setdefault(col, f"the {key} column")
    for m, cols in spec.models.items():
        for role, col in cols.outcomes():
            this = f"model {m!r}'s {role}"
            if col in owner:
                raise DatasetError(f"mapping: column {col!r} is both {owner[col]} and {this}; each model's "
                                   "quality, cost and response need their own column")
            owner[col] = this
    _check_features_are_not_labels(spec)


def _check_features_are_not_labels(spec: ImportSpec) -> None:
    """No feature column is a model's quality column: the estimator would read the outcome it is meant
    to predict (a shared feature such as ``tokens_in`` may serve several models; that is allowed)."""
    quality_of = {cols.quality: m for m, cols in spec.models.items()}
    for m, cols in spec.models.items():
        for f, col in cols.features.items():
            if col in quality_of:
                raise DatasetError(f"mapping: model {m!r}'s feature {f!r} reads column {col!r}, which is model "
                                   f"{quality_of[col]!r}'s quality; a feature must not be the outcome being predicted")


def parse_mapping(mapping: Mapping[str, Any]) -> ImportSpec:
    """Check a column mapping (schema: :mod:`cascade_routing.data.importer`) and return it as an :class:`ImportSpec`."""
    _unknown_keys(mapping, TOP_LEVEL_KEYS, "mapping")
    if "query" not in mapping:
        raise DatasetError("mapping: missing required key 'query' (the query-text column)")
    missing = mapping.get("missing", "error")
    if missing not in MISSING_POLICIES:
        raise DatasetError(f"mapping: 'missing' must be 'error' or 'drop', got {missing!r}")
    name = mapping.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise DatasetError(f"mapping: 'name' must be a non-empty string, got {name!r}")
    models = mapping.get("models")
    if isinstance(models, list) and models:
        columns = _template_models(mapping, models)
    elif isinstance(models, Mapping) and models:
        columns = _explicit_models(models, mapping)
    else:
        raise DatasetError("mapping: 'models' must be a non-empty list of names or a dict name -> columns")
    if len(columns) < 2:
        raise DatasetError(f"mapping: routing needs at least two models, got {len(columns)} ({list(columns)})")
    feature_names = sorted(next(iter(columns.values())).features)
    for m, cols in columns.items():
        if sorted(cols.features) != feature_names:
            raise DatasetError(f"mapping: every model needs the same features; model {m!r} has "
                               f"{sorted(cols.features)}, model {next(iter(columns))!r} has {feature_names}")
    spec = ImportSpec(
        query=_column(mapping["query"], "mapping: 'query'"),
        query_id=None if mapping.get("query_id") is None else _column(mapping["query_id"], "mapping: 'query_id'"),
        task=None if mapping.get("task") is None else _column(mapping["task"], "mapping: 'task'"),
        name=name, missing=missing, models=columns, feature_names=feature_names, raw=dict(mapping))
    _check_distinct(spec)
    return spec
