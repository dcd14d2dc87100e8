"""The canonical routing dataset: for N queries and M models, each model's answer quality and cost.

Everything downstream (policies, estimators, serving) consumes a :class:`RoutingDataset`.
Arrays are numpy on purpose (this layer does I/O); the engine converts to torch tensors.

Invariants enforced at construction (violations raise :class:`DatasetError` naming the field,
row and model):
- ``models`` are unique, non-empty strings, and are stored ordered by mean cost (cheapest first;
  models of exactly equal mean cost, e.g. two flat per-query prices, best mean quality first, so the
  worse one is the dominated one and a cheapest-model tie goes to the better model); every
  per-model array is permuted with them. ``subset`` (and so ``split``) keeps the parent's
  order instead of re-sorting by the rows' own mean costs: two models whose mean costs nearly tie
  would otherwise swap columns between splits, and an estimator trained on one split would read
  another split's columns under the wrong names.
- ``quality`` is float [N, M], finite, in [0, 1]; ``cost`` is float [N, M], finite, >= 0 (USD).
- ``responses`` (optional) is an object array [N, M] of ``str`` (or ``None`` when missing).
- ``features`` (optional) maps a name to a finite float array [N, M] (e.g. ``logprob_confidence``,
  ``tokens_in``, ``tokens_out``, ``latency_ms``); ``logprob_confidence`` is a log-probability, <= 0
  (a probability in [0, 1] must be given as its log).
- ``tasks`` (optional) is one label per query; ``query_ids`` are unique.
- N >= 1 and M >= 1.

Operations: ``subset`` (rows), ``select_models``, ``split`` (seeded, stratified by task; see
:mod:`cascade_routing.data.splits`), ``save``/``load`` (a folder with ``data.parquet`` and
``metadata.json``; see :mod:`cascade_routing.data.storage`).
"""

from __future__ import annotations

import os
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cascade_routing.data.errors import DatasetError


def _first_bad_cell(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows[0]), int(cols[0])


@dataclass
class RoutingDataset:
    """Per-query outcomes of M models on N queries. See the module docstring for the contract."""

    queries: list[str]
    models: list[str]
    quality: np.ndarray
    cost: np.ndarray
    responses: np.ndarray | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    tasks: list[str] | None = None
    query_ids: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    name: str = "dataset"
    sort_models: InitVar[bool] = True  # False: keep ``models`` in the order given (subsets of a sorted dataset)

    def __post_init__(self, sort_models: bool) -> None:
        self.queries = [str(q) for q in self.queries]
        self.models = list(self.models)
        self.quality = np.asarray(self.quality, dtype=np.float64)
        self.cost = np.asarray(self.cost, dtype=np.float64)
        where = f"dataset {self.name!r}"
        if not self.queries:
            raise DatasetError(f"{where}: empty dataset (no queries)")
        self._check_models(where)
        self._check_outcomes(where)
        self._check_answers(where)
        self._check_labels(where)
        if sort_models:
            self._sort_models_by_mean_cost()

    def _check_models(self, where: str) -> None:
        """At least one model; names non-empty strings, unique."""
        if not self.models:
            raise DatasetError(f"{where}: no models")
        for i, model in enumerate(self.models):
            if not isinstance(model, str) or not model:
                raise DatasetError(f"{where}: model name #{i} is not a non-empty string: {model!r}")
        seen: set[str] = set()
        for model in self.models:
            if model in seen:
                raise DatasetError(f"{where}: duplicate model name {model!r}")
            seen.add(model)

    def _check_outcomes(self, where: str) -> None:
        """``quality`` and ``cost`` are finite [N, M], quality in [0, 1], cost >= 0."""
        n, m = len(self.queries), len(self.models)
        for fname, arr in (("quality", self.quality), ("cost", self.cost)):
            if arr.shape != (n, m):
                raise DatasetError(
                    f"{where}: field {fname!r} has shape {arr.shape}, expected (N={n}, M={m})"
                )
            bad = ~np.isfinite(arr)
            if bad.any():
                r, c = _first_bad_cell(bad)
                raise DatasetError(
                    f"{where}: field {fname!r} has a non-finite value {float(arr[r, c])!r} at row {r}, "
                    f"model {self.models[c]!r} ({int(bad.sum())} such cells)"
                )
        bad = (self.quality < 0) | (self.quality > 1)
        if bad.any():
            r, c = _first_bad_cell(bad)
            raise DatasetError(
                f"{where}: field 'quality' must lie in [0, 1]; row {r}, model {self.models[c]!r} "
                f"has {float(self.quality[r, c])!r}"
            )
        bad = self.cost < 0
        if bad.any():
            r, c = _first_bad_cell(bad)
            raise DatasetError(
                f"{where}: field 'cost' must be >= 0; row {r}, model {self.models[c]!r} "
                f"has {float(self.cost[r, c])!r}"
            )

    def _check_answers(self, where: str) -> None:
        """``responses`` (object) and every feature (finite float64) are [N, M]; converts them."""
        n, m = len(self.queries), len(self.models)
        if self.responses is not None:
            self.responses = np.asarray(self.responses, dtype=object)
            if self.responses.shape != (n, m):
                raise DatasetError(
                    f"{where}: field 'responses' has shape {self.responses.shape}, expected ({n}, {m})"
                )
        features = {}
        for key, arr in self.features.items():
            arr = np.asarray(arr, dtype=np.float64)
            if arr.shape != (n, m):
                raise DatasetError(
                    f"{where}: feature {key!r} has shape {arr.shape}, expected ({n}, {m})"
                )
            bad = ~np.isfinite(arr)
            if bad.any():
                r, c = _first_bad_cell(bad)
                raise DatasetError(
                    f"{where}: feature {key!r} has a non-finite value at row {r}, "
                    f"model {self.models[c]!r}"
                )
            if key == "logprob_confidence" and (arr > 0).any():
                r, c = _first_bad_cell(arr > 0)
                raise DatasetError(
                    f"{where}: feature 'logprob_confidence' must be a log-probability (<= 0), got {arr[r, c]:.6g} "
                    f"at row {r}, model {self.models[c]!r} (give a probability p as log(p))"
                )
            features[key] = arr
        self.features = features

    def _check_labels(self, where: str) -> None:
        """One task label per query (if any) and unique query ids (default ``0..N-1``)."""
        n = len(self.queries)
        if self.tasks is not None:
            self.tasks = [str(t) for t in self.tasks]
            if len(self.tasks) != n:
                raise DatasetError(f"{where}: {len(self.tasks)} task labels for {n} queries")
        if self.query_ids is None:
            self.query_ids = [str(i) for i in range(n)]
        else:
            self.query_ids = [str(q) for q in self.query_ids]
            if len(self.query_ids) != n:
                raise DatasetError(f"{where}: {len(self.query_ids)} query ids for {n} queries")
            if len(set(self.query_ids)) != n:
                dup = next(q for q in self.query_ids if self.query_ids.count(q) > 1)
                raise DatasetError(f"{where}: duplicate query id {dup!r}")

    def _sort_models_by_mean_cost(self) -> None:
        order = np.lexsort((-self.quality.mean(axis=0), self.cost.mean(axis=0)))  # last key is the primary one
        if (order == np.arange(len(order))).all():
            return
        self.models = [self.models[i] for i in order]
        self.quality = self.quality[:, order]
        self.cost = self.cost[:, order]
        if self.responses is not None:
            self.responses = self.responses[:, order]
        self.features = {k: v[:, order] for k, v in self.features.items()}

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    @property
    def num_models(self) -> int:
        return len(self.models)

    def __len__(self) -> int:
        return self.num_queries

    def model_index(self, name: str) -> int:
        """Column of model ``name``; raises :class:`DatasetError` listing the known models."""
        try:
            return self.models.index(name)
        except ValueError:
            raise DatasetError(
                f"dataset {self.name!r}: unknown model {name!r}; known models: {self.models}"
            ) from None

    def subset(self, rows: np.ndarray | list[int], name: str | None = None) -> "RoutingDataset":
        """Rows ``rows`` (indices into this dataset), in that order, with this dataset's model order."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            raise DatasetError(f"dataset {self.name!r}: subset selects no rows")
        return RoutingDataset(
            queries=[self.queries[i] for i in rows],
            models=list(self.models),
            quality=self.quality[rows],
            cost=self.cost[rows],
            responses=None if self.responses is None else self.responses[rows],
            features={k: v[rows] for k, v in self.features.items()},
            tasks=None if self.tasks is None else [self.tasks[i] for i in rows],
            query_ids=[self.query_ids[i] for i in rows],  # type: ignore[index]
            metadata=dict(self.metadata),
            name=name or self.name,
            sort_models=False,
        )

    def select_models(self, names: list[str]) -> "RoutingDataset":
        """Keep only the models ``names`` (re-sorted by mean cost)."""
        if not names:
            raise DatasetError(f"dataset {self.name!r}: select_models needs at least one model")
        cols = [self.model_index(n) for n in names]
        if len(set(cols)) != len(cols):
            raise DatasetError(f"dataset {self.name!r}: duplicate model in selection {names}")
        return RoutingDataset(
            queries=list(self.queries),
            models=[self.models[c] for c in cols],
            quality=self.quality[:, cols],
            cost=self.cost[:, cols],
            responses=None if self.responses is None else self.responses[:, cols],
            features={k: v[:, cols] for k, v in self.features.items()},
            tasks=None if self.tasks is None else list(self.tasks),
            query_ids=list(self.query_ids),  # type: ignore[arg-type]
            metadata=dict(self.metadata),
            name=self.name,
        )

    # ------------------------------------------------------------------ splits
    def split(
        self, fractions: dict[str, float], seed: int = 0, stratify: bool = True
    ) -> dict[str, "RoutingDataset"]:
        """Seeded random partition of the queries into named parts.

        ``fractions`` maps a split name to its share of the queries; shares must be positive and
        sum to 1 (within 1e-6). With ``stratify`` and task labels present, each task is split
        separately with the same fractions (largest-remainder rounding, so every task keeps its
        proportions up to one query), then the parts are concatenated. Every split gets at least
        one query (an error says so if that is impossible). The parts are disjoint and together
        cover every query; the same ``seed`` gives the same partition. Each part is named
        ``"<name>/<split>"`` and keeps the metadata, with ``metadata["split"]`` set.
        """
        from cascade_routing.data.splits import partition_indices

        parts = partition_indices(
            num_rows=self.num_queries,
            fractions=fractions,
            groups=self.tasks if (stratify and self.tasks is not None) else None,
            seed=seed,
            where=f"dataset {self.name!r}",
        )
        out: dict[str, RoutingDataset] = {}
        for split_name, rows in parts.items():
            part = self.subset(rows, name=f"{self.name}/{split_name}")
            part.metadata = dict(self.metadata, split=split_name, split_seed=seed)
            out[split_name] = part
        return out

    # -------------------------------------------------------------- save / load
    def save(self, path: "str | os.PathLike[str]") -> "Path":
        """Write the dataset to folder ``path`` (see :mod:`cascade_routing.data.storage`)."""
        from cascade_routing.data.storage import save_dataset

        return save_dataset(self, path)

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "RoutingDataset":
        """Read a folder written by :meth:`save`; malformed folders raise :class:`DatasetError`."""
        from cascade_routing.data.storage import load_dataset_folder

        return load_dataset_folder(path)
