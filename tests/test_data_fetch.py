"""Fetching: verified downloads (mock transport and a loopback server), cache, local mirror. No network."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from cascade_routing.data import ChecksumError, DatasetError, RoutingDataset, fetch, load_dataset
from cascade_routing.data.fetch import cache_root, download_file
from cascade_routing.data.registry import get_spec

NAME = "routellm-mt-bench"


class Mirror:
    """An httpx MockTransport answering raw.githubusercontent URLs from the local data mirror."""

    def __init__(self, raw: Path, corrupt: str | None = None) -> None:
        self.spec = get_spec(NAME)
        self.by_url = {f.url: raw / f.folder / f.path for f in self.spec.files}
        self.corrupt = corrupt
        self.requests: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.requests.append(url)
        path = self.by_url.get(url)
        if path is None:
            return httpx.Response(404)
        body = path.read_bytes()
        if self.corrupt and url.endswith(self.corrupt):
            body = body[:-10] + b"tampered!!"
        return httpx.Response(200, content=body, headers={"content-length": str(len(body))})

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self))


@pytest.fixture()
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw_data_dir: Path) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CASCADE_ROUTING_DATA_DIR", raising=False)
    return raw_data_dir


def test_fetch_downloads_verifies_converts_and_caches(offline_cache: Path) -> None:
    mirror = Mirror(offline_cache)
    with mirror.client() as client:
        folder = fetch(NAME, client=client, progress=False)
    assert sorted(mirror.requests) == sorted(f.url for f in get_spec(NAME).files)
    assert all(u.startswith("https://raw.githubusercontent.com/lm-sys/RouteLLM/0b64fdaf") for u in mirror.requests)
    assert folder.parent == cache_root() / "converted" and folder.name.startswith(f"{NAME}-v1-")
    assert cache_root().parent.name == "xdg"  # $XDG_CACHE_HOME/cascade-routing
    for f in get_spec(NAME).files:
        assert (cache_root() / "raw" / f.folder / f.path).is_file()
    ds = RoutingDataset.load(folder)
    assert ds.num_queries == 160
    with mirror.client() as client:  # second call: everything cached, nothing downloaded
        assert fetch(NAME, client=client, progress=False) == folder
    assert len(mirror.requests) == len(get_spec(NAME).files)


def test_fetch_checksum_mismatch_deletes_file(offline_cache: Path) -> None:
    mirror = Mirror(offline_cache, corrupt="question.jsonl")
    with mirror.client() as client, pytest.raises(ChecksumError) as err:
        fetch(NAME, client=client, progress=False)
    spec_file = next(f for f in get_spec(NAME).files if f.path.endswith("question.jsonl"))
    msg = str(err.value)
    assert "question.jsonl" in msg and spec_file.sha256 in msg and "got " in msg and "deleted" in msg
    target = cache_root() / "raw" / spec_file.folder / spec_file.path
    assert not target.exists() and not target.with_name(target.name + ".part").exists()


def test_corrupted_cache_is_downloaded_again(offline_cache: Path) -> None:
    mirror = Mirror(offline_cache)
    with mirror.client() as client:
        fetch(NAME, client=client, progress=False)
        f = get_spec(NAME).files[0]
        (cache_root() / "raw" / f.folder / f.path).write_bytes(b"bit rot")
        fetch(NAME, client=client, progress=False)
    assert mirror.requests.count(f.url) == 2


def test_offline_with_a_converted_copy_uses_it_with_a_warning(offline_cache: Path) -> None:
    """Converted once (e.g. from the data-dir mirror), then offline without the raw files: the cached
    conversion loads, with a warning; with nothing converted the download error stands."""
    def offline(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("no network", request=request)

    with httpx.Client(transport=httpx.MockTransport(offline)) as client, pytest.raises(DatasetError, match="offline"):
        fetch(NAME, client=client, progress=False)
    with Mirror(offline_cache).client() as client:
        folder = fetch(NAME, client=client, progress=False)
    shutil.rmtree(cache_root() / "raw")
    with httpx.Client(transport=httpx.MockTransport(offline)) as client:
        with pytest.warns(UserWarning, match=r"could not be downloaded to verify .* using the converted copy"):
            assert fetch(NAME, client=client, progress=False) == folder
        with pytest.raises(DatasetError, match="offline"):
            fetch(NAME, client=client, progress=False, refresh=True)


def test_http_error_is_clear(offline_cache: Path) -> None:
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404))) as client:
        with pytest.raises(DatasetError, match="HTTP 404"):
            fetch(NAME, client=client, progress=False)


def test_download_from_loopback_server(tmp_path: Path) -> None:
    served = tmp_path / "srv"
    served.mkdir()
    payload = b"hello routing\n" * 5000
    (served / "file.bin").write_bytes(payload)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/file.bin"
        good = hashlib.sha256(payload).hexdigest()
        dest = download_file(url, tmp_path / "out" / "file.bin", good, progress=False)
        assert dest.read_bytes() == payload
        with pytest.raises(ChecksumError, match=f"expected sha256 {'0' * 64}, got {good}"):
            download_file(url, tmp_path / "out2" / "file.bin", "0" * 64, progress=False)
        assert not (tmp_path / "out2" / "file.bin").exists()
    finally:
        server.shutdown()
        server.server_close()


def test_local_mirror_is_verified_not_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw_data_dir: Path) -> None:
    spec = get_spec(NAME)
    for f in spec.files:
        dst = tmp_path / "raw" / f.folder / f.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw_data_dir / f.folder / f.path, dst)
    bad = tmp_path / "raw" / spec.files[1].folder / spec.files[1].path
    bad.write_bytes(bad.read_bytes() + b"\n")
    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(tmp_path / "raw"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(ChecksumError, match=f"checksum mismatch for {bad}: expected sha256 {spec.files[1].sha256}"):
        load_dataset(NAME, progress=False)
    assert bad.exists()
    bad.unlink()
    with pytest.raises(DatasetError, match="CASCADE_ROUTING_DATA_DIR: missing file"):
        load_dataset(NAME, progress=False)


def test_local_mirror_equals_download(offline_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Mirror(offline_cache).client() as client:
        downloaded = RoutingDataset.load(fetch(NAME, client=client, progress=False))
    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(offline_cache))
    local = get_spec(NAME).convert(offline_cache / "routellm")
    np.testing.assert_array_equal(downloaded.quality, local.quality)
    assert downloaded.query_ids == local.query_ids


def test_damaged_converted_cache_is_rebuilt(offline_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(offline_cache))
    folder = fetch(NAME, progress=False)
    (folder / "data.parquet").write_bytes(b"garbage")
    ds = load_dataset(NAME, progress=False)
    assert ds.num_queries == 160
    assert RoutingDataset.load(folder).num_queries == 160
