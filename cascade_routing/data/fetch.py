"""Getting the raw upstream files of a named dataset: local mirror or verified download.

Where files come from:
- If the environment variable ``CASCADE_ROUTING_DATA_DIR`` is set, it names a local folder laid
  out like ``shared/data/raw`` (``<source folder>/<upstream path>``); files are read from there,
  never downloaded, and still checksum-verified (a local file is never deleted).
- Otherwise each file is downloaded from its public origin
  ``https://raw.githubusercontent.com/<owner>/<repo>/<commit>/<path>`` (pinned commit) with httpx
  streaming and a tqdm progress bar, SHA-256-verified while it is written, and cached under
  ``$XDG_CACHE_HOME/cascade-routing/raw`` (default ``~/.cache/cascade-routing/raw``). On a
  mismatch the partial file is deleted and :class:`ChecksumError` names the file, URL, expected
  and actual hash. A cached file whose hash no longer matches is downloaded again.

Several processes may share a cold cache: each downloads into its own temporary file
(``.<name>.<pid>-<random>.part`` next to the target), verifies it, and publishes it with one atomic
``os.replace``; a reader sees no file or a complete verified one, never a partial one, and no process
deletes a file another one published. A cache folder that cannot be created or written (a file in
the way, no permission, a read-only disk) is a :class:`DatasetError` naming the folder and the
setting that moves the cache (:func:`ensure_cache_dir`).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from cascade_routing.data.errors import DatasetError

DATA_DIR_ENV = "CASCADE_ROUTING_DATA_DIR"
CACHE_ENV = "XDG_CACHE_HOME"
CHUNK = 1 << 16
#: What to change when the download cache cannot be written (part of the error message).
RAW_CACHE_HINT = (f"set {CACHE_ENV} to a writable folder (the cache is ${CACHE_ENV}/cascade-routing, default "
                  f"~/.cache/cascade-routing), or {DATA_DIR_ENV} to a local copy of the raw files")


class ChecksumError(DatasetError):
    """A file's SHA-256 differs from the pinned one."""


class DownloadError(DatasetError):
    """A file could not be downloaded (no network, an HTTP error)."""


@dataclass(frozen=True)
class RemoteFile:
    """One upstream file: ``<folder>/<path>`` locally, ``raw.githubusercontent`` remotely."""

    folder: str  # local source folder, e.g. "routellm"
    repo: str  # "owner/name"
    commit: str
    path: str  # path inside the upstream repository
    sha256: str

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.path}"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/cascade-routing`` or ``~/.cache/cascade-routing``."""
    base = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache")
    return Path(base) / "cascade-routing"


def ensure_cache_dir(path: Path, hint: str) -> Path:
    """Create the cache folder ``path`` (and its parents) if needed and check that it is writable.

    Called only right before something is written, so a read-only cache that already holds
    everything still works. Raises :class:`DatasetError` naming ``path``, the reason (a file in the
    way, no permission, a read-only disk, ...) and ``hint`` (the setting that moves the cache).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or str(err)
        if err.filename and Path(err.filename) != path:
            reason += f" ({err.filename})"
        raise DatasetError(f"cannot use the cache folder {path}: {reason}; {hint}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DatasetError(f"cannot use the cache folder {path}: not writable; {hint}")
    return path


def unique_temp_path(target: Path, suffix: str = ".tmp") -> Path:
    """A hidden name next to ``target`` that no other process or thread uses:
    ``.<target name>.<pid>-<random>`` + ``suffix`` (same folder, so ``os.replace`` onto ``target`` is
    atomic)."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def local_data_dir() -> Path | None:
    """The local mirror named by ``CASCADE_ROUTING_DATA_DIR``, or ``None`` when unset/empty."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{DATA_DIR_ENV}={value!r} is not a folder")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, expected: str) -> None:
    """Raise :class:`ChecksumError` (file, expected, actual) if ``path``'s hash differs."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}"
        )


def download_file(
    url: str,
    dest: Path,
    expected_sha256: str,
    *,
    client: httpx.Client | None = None,
    progress: bool = True,
    folder_hint: str = "choose a writable destination",
) -> Path:
    """Stream ``url`` to ``dest``, verifying SHA-256; on mismatch delete the download and raise.

    The bytes go to a temporary file of this call alone (:func:`unique_temp_path`), which replaces
    ``dest`` atomically once verified, so concurrent calls for the same ``dest`` (two processes on
    a cold cache) each end with a complete verified ``dest``. Errors: :class:`DownloadError` (HTTP,
    network), :class:`ChecksumError`, :class:`DatasetError` (``dest``'s folder cannot be created or
    written: :func:`ensure_cache_dir`'s message, ending with ``folder_hint``).
    """
    ensure_cache_dir(dest.parent, folder_hint)
    part = unique_temp_path(dest, ".part")
    try:
        actual = _stream_to(url, part, dest.name, client=client, progress=progress)
        if actual != expected_sha256:
            raise ChecksumError(
                f"checksum mismatch for {dest.name} downloaded from {url}: expected sha256 "
                f"{expected_sha256}, got {actual}; the file was deleted"
            )
        os.replace(part, dest)
    except OSError as err:
        raise DatasetError(f"cannot write {dest}: {err.strerror or err}") from None
    finally:
        part.unlink(missing_ok=True)
    return dest


def _stream_to(url: str, part: Path, label: str, *, client: httpx.Client | None, progress: bool) -> str:
    """Download ``url`` into the file ``part``; return the SHA-256 of the bytes received.

    HTTP and network errors are :class:`DownloadError`; OS errors (writing ``part``) propagate.
    """
    own = client is None
    client = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0))
    digest = hashlib.sha256()
    try:
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise DownloadError(f"download of {url} failed: HTTP {response.status_code}")
            total = int(response.headers.get("content-length") or 0) or None
            with open(part, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, desc=label, disable=not progress, leave=False
            ) as bar:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as err:
        raise DownloadError(
            f"download of {url} failed: {err} (offline? set {DATA_DIR_ENV} to a local folder laid out "
            "like shared/data/raw)"
        ) from None
    finally:
        if own:
            client.close()
    return digest.hexdigest()


def fetch_files(
    files: Iterable[RemoteFile],
    *,
    client: httpx.Client | None = None,
    progress: bool = True,
) -> Path:
    """Make every file available locally, verified; return the root laid out like ``raw/``.

    Uses the ``CASCADE_ROUTING_DATA_DIR`` mirror when set, else the download cache.
    """
    files = list(files)
    mirror = local_data_dir()
    if mirror is not None:
        for f in files:
            path = mirror / f.folder / f.path
            if not path.is_file():
                raise DatasetError(
                    f"{DATA_DIR_ENV}: missing file {path} (expected a copy of {f.url})"
                )
            verify_file(path, f.sha256)
        return mirror
    root = cache_root() / "raw"
    todo = [f for f in files if not _cached_and_valid(root / f.folder / f.path, f.sha256)]
    for f in tqdm(todo, desc="downloading", unit="file", disable=not progress or len(todo) < 2):
        download_file(f.url, root / f.folder / f.path, f.sha256, client=client, progress=progress,
                      folder_hint=RAW_CACHE_HINT)
    return root


def _cached_and_valid(path: Path, sha256: str) -> bool:
    """True if the cached ``path`` exists and has the pinned hash. A damaged copy is left in place
    (the download replaces it atomically): deleting it could delete the good copy another process
    has just published under the same name."""
    if not path.is_file():
        return False
    try:
        verify_file(path, sha256)
    except (ChecksumError, OSError):  # damaged, vanished or unreadable: download it again
        return False
    return True
