"""Named datasets: where their files come from, how they are converted, and the converted cache.

``load_dataset(name_or_path)`` accepts a registered name (see :func:`list_datasets`) or the path of
a folder written by :meth:`RoutingDataset.save`. For a name, the raw files are obtained with
:func:`cascade_routing.data.fetch.fetch_files` (the ``CASCADE_ROUTING_DATA_DIR`` mirror when set,
else a verified download), converted once, and the result is cached as a saved dataset under
``<cache>/converted/<name>-v<version>-<fingerprint>`` (``<cache>`` = ``$XDG_CACHE_HOME/cascade-routing``;
the fingerprint hashes the converter's source files and the raw checksums, so an upgraded
converter never reads a stale cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from cascade_routing.data.checksums import SHA256
from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.data.errors import DatasetError
from cascade_routing.data.fetch import DownloadError, RemoteFile, cache_root, fetch_files
from cascade_routing.data.storage import is_dataset_folder, load_dataset_folder


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: upstream repository, pinned commit, the files it needs, its converter."""

    name: str
    description: str
    folder: str  # source folder under the raw root (as in shared/data/raw)
    repo: str
    commit: str
    paths: tuple[str, ...]
    convert: Callable[[Path], RoutingDataset]  # gets <raw root>/<folder>
    converter_modules: tuple[str, ...] = ()  # their source is part of the cache key
    extra_key: Callable[[], bytes] | None = None  # other inputs of the conversion (e.g. prices)
    version: int = 1

    @property
    def files(self) -> list[RemoteFile]:
        table = SHA256[self.folder]
        return [RemoteFile(self.folder, self.repo, self.commit, p, table[p]) for p in self.paths]


def _routerbench_subset(folder: Path) -> RoutingDataset:
    from cascade_routing.data.converters.routerbench import convert_routerbench

    return convert_routerbench(
        [folder / p for p in _ROUTERBENCH_PATHS], name="routerbench-subset"
    )


_ROUTERBENCH_PATHS = tuple(sorted(SHA256["routerbench_subset_routerdc"]))

_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> None:
    """Add a named dataset (used by this module; available to plugins)."""
    _REGISTRY[spec.name] = spec


register(
    DatasetSpec(
        name="routerbench-subset",
        description="RouterBench rows (ARC-Challenge, MBPP, Winogrande) as re-split by RouterDC; "
        "11 models, 0/1 quality, USD cost per query, responses",
        folder="routerbench_subset_routerdc",
        repo="shuhao02/RouterDC",
        commit="0e63989c5bf4363330b8a4616386e3f7f116d9f8",
        paths=_ROUTERBENCH_PATHS,
        convert=_routerbench_subset,
        converter_modules=("cascade_routing.data.converters.routerbench",),
    )
)


def _rational(folder: Path) -> RoutingDataset:
    from cascade_routing.data.converters.rational import convert_rational

    return convert_rational(folder, name="rational-llm-cascades")


_RATIONAL_PATHS = tuple(sorted(p for p in SHA256["rational_llm_cascades"] if "/chain_results/" in p))

register(
    DatasetSpec(
        name="rational-llm-cascades",
        description="Zellinger & Thomson chain results: 9 models joined per query (MMLU, MedMCQA, "
        "TriviaQA, TruthfulQA, GSM8K-train); 0/1 quality, USD cost, tokens, latency, log-prob confidence",
        folder="rational_llm_cascades",
        repo="mzelling/rational-llm-cascades",
        commit="0d9c8610de48960420ec2352855555a8c1e2c52f",
        paths=_RATIONAL_PATHS,
        convert=_rational,
        converter_modules=("cascade_routing.data.converters.rational", "cascade_routing.data.safe_pickle"),
    )
)


def _routellm(kind: str) -> Callable[[Path], RoutingDataset]:
    def convert(folder: Path) -> RoutingDataset:
        from cascade_routing.data.converters import routellm

        fn = {"mmlu": routellm.convert_routellm_mmlu, "gsm8k": routellm.convert_routellm_gsm8k,
              "mt-bench": routellm.convert_routellm_mt_bench}[kind]
        return fn(folder, name=f"routellm-{kind}")

    return convert


def _prices_key() -> bytes:
    from cascade_routing.data.converters.routellm import load_prices

    return json.dumps(load_prices(), sort_keys=True).encode()


_ROUTELLM = SHA256["routellm"]
for _kind, _paths, _desc in (
    ("mmlu", [p for p in _ROUTELLM if p.startswith("routellm/evals/mmlu/")],
     "RouteLLM MMLU: 14,042 questions x {Mixtral-8x7B, GPT-4-1106}, 0/1 quality, cost from prices x estimated tokens"),
    ("gsm8k", ["routellm/evals/gsm8k/gsm8k_responses.csv", "routellm/evals/gsm8k/contaminated_prompts.jsonl"],
     "RouteLLM GSM8K: 1,319 questions x 2 models with responses, 0/1 quality, cost from prices x estimated tokens"),
    ("mt-bench", [p for p in _ROUTELLM if p.startswith("routellm/evals/mt_bench/")],
     "RouteLLM MT-Bench: 80 questions x 2 turns x 2 models, quality = (judge score - 1) / 9"),
):
    register(
        DatasetSpec(
            name=f"routellm-{_kind}",
            description=_desc,
            folder="routellm",
            repo="lm-sys/RouteLLM",
            commit="0b64fdafe049e596a3f5657c219329f24af24198",
            paths=tuple(sorted(_paths)),
            convert=_routellm(_kind),
            converter_modules=("cascade_routing.data.converters.routellm",),
            extra_key=_prices_key,
        )
    )


def get_spec(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DatasetError(
            f"unknown dataset {name!r}: not a registered name ({', '.join(sorted(_REGISTRY))}) "
            "and not a saved dataset folder"
        ) from None


def list_datasets() -> list[DatasetSpec]:
    """The registered datasets, by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


_COMMON_MODULES = (
    "cascade_routing.data.dataset",
    "cascade_routing.data.storage",
    "cascade_routing.data.converters.common",
)


def converter_fingerprint(spec: DatasetSpec) -> str:
    """First 10 hex digits of SHA-256 over the converter's source files (and the raw checksums).

    Part of the converted-cache folder name, so a changed converter never serves a stale cache.
    """
    digest = hashlib.sha256()
    for module in (*_COMMON_MODULES, *spec.converter_modules):
        found = importlib.util.find_spec(module)
        origin = found.origin if found else None
        digest.update(module.encode())
        if origin and Path(origin).is_file():
            digest.update(Path(origin).read_bytes())
    for f in spec.files:
        digest.update(f"{f.path}={f.sha256}".encode())
    if spec.extra_key is not None:
        digest.update(spec.extra_key())
    return digest.hexdigest()[:10]


def converted_path(name: str) -> Path:
    """``<cache>/converted/<name>-v<version>-<converter fingerprint>``."""
    spec = get_spec(name)
    return cache_root() / "converted" / f"{spec.name}-v{spec.version}-{converter_fingerprint(spec)}"


def fetch(
    name: str,
    *,
    client: httpx.Client | None = None,
    progress: bool = True,
    refresh: bool = False,
) -> Path:
    """Obtain (download or local mirror), verify, convert and cache dataset ``name``.

    Returns the folder of the converted dataset (loadable with :meth:`RoutingDataset.load`).
    The raw files are verified on every call; ``refresh`` re-converts even if cached. When they
    cannot be downloaded (offline, without the ``CASCADE_ROUTING_DATA_DIR`` mirror that converted
    them) and a converted copy is cached, that copy is used with a warning (it was converted from
    verified files); a checksum mismatch is never passed over.
    """
    spec = get_spec(name)
    target = converted_path(name)
    try:
        root = fetch_files(spec.files, client=client, progress=progress)
    except DownloadError as err:
        if refresh or not is_dataset_folder(target):
            raise
        warnings.warn(f"{name}: the raw files could not be downloaded to verify ({err}); using the converted "
                      f"copy cached at {target}", stacklevel=2)
        return target
    if is_dataset_folder(target) and not refresh:
        return target
    dataset = spec.convert(root / spec.folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        dataset.save(tmp)
        if is_dataset_folder(target) and not refresh:  # another process converted it meanwhile
            return target
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)  # atomic: readers never see a half-written folder
        except OSError:  # another process won the race; its copy is equivalent
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_dataset(name_or_path: str | os.PathLike[str], *, progress: bool = True) -> RoutingDataset:
    """A :class:`RoutingDataset` from a registered name or a saved dataset folder.

    A bare registered name (no path separator) means the registered dataset even when a folder of
    that name exists in the working directory (with a warning); ``./name`` reads the folder.
    """
    path = Path(name_or_path)
    key = str(name_or_path)
    if is_dataset_folder(path):
        if key not in _REGISTRY:  # registered names have no path separator: "./name" is the folder
            return load_dataset_folder(path)
        warnings.warn(f"the folder {key!r} in the working directory has the name of a registered dataset; loading "
                      f"the registered one (pass './{key}' to read the folder)", stacklevel=2)
    if key in _REGISTRY:
        folder = fetch(key, progress=progress)
        try:
            return load_dataset_folder(folder)
        except DatasetError:  # a damaged cache entry: convert again from the verified raw files
            return load_dataset_folder(fetch(key, progress=progress, refresh=True))
    if path.exists():
        raise DatasetError(
            f"{path}: not a saved dataset folder (needs metadata.json and data.parquet); "
            "to bring a CSV/JSONL/Parquet table use cascade_routing.data.import_table / "
            "`cascade-routing data import`"
        )
    get_spec(key)  # raises the unknown-name error listing the registered names
    raise AssertionError("unreachable")
