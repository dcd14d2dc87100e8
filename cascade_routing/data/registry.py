"""Named datasets: where their files come from, how they are converted, and the converted cache.

``load_dataset(name_or_path)`` accepts a registered name (see :func:`list_datasets`) or the path of
a folder written by :meth:`RoutingDataset.save`. For a name, the raw files are obtained with
:func:`cascade_routing.data.fetch.fetch_files` (the ``CASCADE_ROUTING_DATA_DIR`` mirror when set,
else a verified download), converted once, and the result is cached as a saved dataset under
``<cache>/converted/<name>-v<version>-<fingerprint>`` (``<cache>`` = ``$XDG_CACHE_HOME/cascade-routing``;
the fingerprint hashes the converter's source files and the raw checksums, so an upgraded
converter never reads a stale cache).

Several processes may convert the same dataset at once (two runs on a cold cache): each saves its
conversion into a private temporary folder next to the target, reads it back (validated), and
publishes it with one atomic rename; the first to publish wins and the others keep its equivalent
copy. A cached folder that is not a complete save (half-written, truncated, damaged) is treated as
absent and rebuilt; it is renamed aside before the new one goes in, so nothing is deleted in place
under a reader. A converted cache folder that cannot be created or written is a
:class:`DatasetError` naming it and ``XDG_CACHE_HOME``.
"""

from __future__ import annotations

import errno
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
from cascade_routing.data.fetch import (
    CACHE_ENV,
    DownloadError,
    RemoteFile,
    cache_root,
    ensure_cache_dir,
    fetch_files,
    unique_temp_path,
)
from cascade_routing.data.storage import is_complete_dataset_folder, is_dataset_folder, load_dataset_folder

#: What to change when the converted cache cannot be written (part of the error message).
CONVERTED_CACHE_HINT = (f"set {CACHE_ENV} to a writable folder (the cache is ${CACHE_ENV}/cascade-routing, "
                        "default ~/.cache/cascade-routing)")
#: Attempts to publish a conversion while other processes keep replacing the same folder.
PUBLISH_ATTEMPTS = 5


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
    The raw files are verified on every call; ``refresh`` re-converts even if cached, and a cached
    folder that is not a complete save is converted again. When the raw files cannot be downloaded
    (offline, without the ``CASCADE_ROUTING_DATA_DIR`` mirror that converted them) and a converted
    copy is cached, that copy is used with a warning (it was converted from verified files); a
    checksum mismatch is never passed over. Safe to run in several processes at once.
    """
    return _fetch(name, client=client, progress=progress, refresh=refresh)[0]


def _fetch(name: str, *, client: httpx.Client | None = None, progress: bool = True,
           refresh: bool = False) -> tuple[Path, RoutingDataset | None]:
    """:func:`fetch`, plus the dataset as read back when this call converted it (else ``None``), so a
    cold load does not read the folder it has just validated a second time."""
    spec = get_spec(name)
    target = converted_path(name)
    try:
        root = fetch_files(spec.files, client=client, progress=progress)
    except DownloadError as err:
        if refresh or not is_complete_dataset_folder(target):
            raise
        warnings.warn(f"{name}: the raw files could not be downloaded to verify ({err}); using the converted "
                      f"copy cached at {target}", stacklevel=3)
        return target, None
    if refresh or not is_complete_dataset_folder(target):
        return target, _convert_into_cache(spec, root, target, replace=refresh)
    return target, None


def _convert_into_cache(spec: DatasetSpec, root: Path, target: Path, *, replace: bool) -> RoutingDataset:
    """Convert ``spec`` from the verified raw files under ``root``, save it to a private temporary
    folder next to ``target``, read it back (validated) and publish it as ``target``
    (:func:`_publish`); return the dataset as read back."""
    dataset = spec.convert(root / spec.folder)
    ensure_cache_dir(target.parent, CONVERTED_CACHE_HINT)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}-", dir=target.parent))
    except OSError as err:
        raise DatasetError(f"cannot use the cache folder {target.parent}: {err.strerror or err}; "
                           f"{CONVERTED_CACHE_HINT}") from None
    try:
        dataset.save(tmp)
        loaded = load_dataset_folder(tmp)
        _publish(tmp, target, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    return loaded


def _publish(tmp: Path, target: Path, *, replace: bool) -> None:
    """Rename the complete folder ``tmp`` to ``target`` atomically: a reader sees the old folder, no
    folder, or the new complete one. An existing ``target`` is kept when it is complete and
    ``replace`` is false (another process published an equivalent conversion meanwhile); otherwise it
    is moved aside first (:func:`_move_aside`), never emptied in place."""
    for _ in range(PUBLISH_ATTEMPTS):
        try:
            os.rename(tmp, target)
            return
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise DatasetError(f"cannot publish the converted dataset as {target}: {err.strerror or err}; "
                                   f"{CONVERTED_CACHE_HINT}") from None
        if not replace and is_complete_dataset_folder(target):
            return
        _move_aside(target)
        replace = False  # replaced once: a complete copy published by another process since is as good
    raise DatasetError(f"cannot publish the converted dataset as {target}: other processes kept replacing it")


def _move_aside(target: Path) -> None:
    """Rename ``target`` (a folder or a file in the way) to a unique hidden name and delete it there; a
    ``target`` already gone (another process moved it) is fine."""
    aside = unique_temp_path(target, ".old")
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        return
    except OSError as err:
        raise DatasetError(f"cannot replace {target}: {err.strerror or err}; {CONVERTED_CACHE_HINT}") from None
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


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
        return _load_registered(key, progress=progress)
    if path.exists():
        raise DatasetError(
            f"{path}: not a saved dataset folder (needs metadata.json and data.parquet); "
            "to bring a CSV/JSONL/Parquet table use cascade_routing.data.import_table / "
            "`cascade-routing data import`"
        )
    get_spec(key)  # raises the unknown-name error listing the registered names
    raise AssertionError("unreachable")


def _load_registered(name: str, *, progress: bool) -> RoutingDataset:
    """Dataset ``name`` from its converted cache (:func:`fetch`). If the cached folder does not load (damaged
    beyond what :func:`fetch` checks, or replaced by another process while read), it is converted
    again and the conversion is returned as read back from its private folder, so a concurrent
    process replacing the cache cannot make this call fail."""
    folder, converted = _fetch(name, progress=progress)
    if converted is not None:
        return converted
    try:
        return load_dataset_folder(folder)
    except DatasetError:
        spec = get_spec(name)
        root = fetch_files(spec.files, progress=progress)
        return _convert_into_cache(spec, root, folder, replace=True)
