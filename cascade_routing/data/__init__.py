"""Data layer: the canonical RoutingDataset, converters for public outcome data, fetching.

Entry points: :func:`load_dataset` (a registered name such as ``"routerbench-subset"`` or a saved
dataset folder), :func:`fetch`, :func:`list_datasets`, :class:`RoutingDataset` (``split``,
``save``/``load``, ``subset``, ``select_models``), :func:`import_table` (your own CSV/JSONL/Parquet
with a column mapping), :func:`summarize` (what ``cascade-routing data describe`` prints).
"""

from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.data.errors import DatasetError
from cascade_routing.data.describe import summarize
from cascade_routing.data.fetch import ChecksumError
from cascade_routing.data.importer import import_table
from cascade_routing.data.registry import fetch, list_datasets, load_dataset

__all__ = [
    "ChecksumError",
    "DatasetError",
    "RoutingDataset",
    "fetch",
    "import_table",
    "list_datasets",
    "load_dataset",
    "summarize",
]
