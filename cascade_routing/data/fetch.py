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
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from cascade_routing.data.errors import DatasetError

DATA_DIR_ENV = "CASCADE_ROUTING_DATA_DIR"
CHUNK = 1 << 16


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
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cascade-routing"


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
) -> Path:
    """Stream ``url`` to ``dest``, verifying SHA-256; on mismatch delete it and raise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    own = client is None
    client = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0))
    digest = hashlib.sha256()
    try:
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise DownloadError(f"download of {url} failed: HTTP {response.status_code}")
            total = int(response.headers.get("content-length") or 0) or None
            with open(part, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False
            ) as bar:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as err:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"download of {url} failed: {err} (offline? set {DATA_DIR_ENV} to a local folder laid out "
            "like shared/data/raw)"
        ) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        if own:
            client.close()
    actual = digest.hexdigest()
    if actual != expected_sha256:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"checksum mismatch for {dest.name} downloaded from {url}: expected sha256 "
            f"{expected_sha256}, got {actual}; the file was deleted"
        )
    os.replace(part, dest)
    return dest


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
    todo = []
    for f in files:
        path = root / f.folder / f.path
        if path.is_file():
            try:
                verify_file(path, f.sha256)
                continue
            except ChecksumError:
                path.unlink()
        todo.append(f)
    for f in tqdm(todo, desc="downloading", unit="file", disable=not progress or len(todo) < 2):
        download_file(f.url, root / f.folder / f.path, f.sha256, client=client, progress=progress)
    return root
