"""The on-disk caches (raw downloads, converted datasets, saved datasets, embeddings) shared by
processes started together on a cold cache, and damaged or unusable cache locations. No network: a
loopback HTTP server or an httpx mock transport serves the files.

Processes are started with :func:`run_together`: each worker imports what it needs, says it is
ready, and waits for a common "go" file, so the work itself overlaps (not the interpreter start-up).
Every cache is under ``tmp_path`` (``XDG_CACHE_HOME`` is set per test); the real ``~/.cache`` is
never touched.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest

from cascade_routing.cli import main
from cascade_routing.data import DatasetError, RoutingDataset, fetch, load_dataset
from cascade_routing.data.fetch import download_file
from cascade_routing.data.registry import converted_path, get_spec
from cascade_routing.data.storage import META_FILE, TABLE_FILE, is_complete_dataset_folder, save_dataset
from cascade_routing.estimators import encoding
from cascade_routing.estimators.encoding import EmbeddingCache

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "routellm-mt-bench"  # the smallest registered dataset: 3 files, 160 queries
ROWS = 160
WORKER_TIMEOUT_S = 60.0  # a hung worker fails the test instead of hanging it

# ------------------------------------------------------------------------------------------ workers
#: Run by each worker process: ``python -c WORKER <mode> <json args> <sync folder> <index>``. It
#: prints one JSON line: ``{"ok": true, ...}`` or ``{"ok": false, "error": "<type>: <message>"}``.
WORKER = r'''
import json, sys, time
from pathlib import Path

mode, args, sync, index = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]


def slow_client(raw):
    """An httpx client answering raw.githubusercontent URLs from the mirror ``raw``, slowly (so two
    processes download the same file at the same time)."""
    import httpx
    from cascade_routing.data.registry import get_spec

    by_url = {f.url: Path(raw) / f.folder / f.path for f in get_spec(args["name"]).files}

    def handler(request):
        body = by_url[str(request.url)].read_bytes()

        def chunks():
            for i in range(0, len(body), 1 << 16):
                time.sleep(0.01)
                yield body[i:i + (1 << 16)]

        return httpx.Response(200, content=chunks(), headers={"content-length": str(len(body))})

    return httpx.Client(transport=httpx.MockTransport(handler))


def prepare():
    if mode == "download":
        from cascade_routing.data.fetch import download_file
        return lambda: {"sha": __import__("hashlib").sha256(
            download_file(args["url"], Path(args["dest"]), args["sha"], progress=False).read_bytes()).hexdigest()}
    if mode == "fetch":
        from cascade_routing.data import RoutingDataset, fetch
        client = slow_client(args["raw"])
        return lambda: {"rows": RoutingDataset.load(fetch(args["name"], client=client, progress=False)).num_queries}
    if mode == "load":
        from cascade_routing.data import load_dataset
        return lambda: {"rows": load_dataset(args["name"], progress=False).num_queries}
    if mode == "save":
        import numpy as np
        from cascade_routing.data import RoutingDataset
        n, rng = args["rows"], np.random.default_rng(0)
        ds = RoutingDataset(queries=[f"query {i} " * 8 for i in range(n)], models=["a", "b", "c"],
                            quality=rng.random((n, 3)), cost=np.tile([0.1, 0.2, 0.3], (n, 1)))
        def save_repeatedly():
            for _ in range(args["times"]):
                ds.save(args["folder"])
            return {}
        return save_repeatedly
    if mode == "embed":
        import numpy as np
        from cascade_routing.estimators.encoding import EmbeddingCache
        cache = EmbeddingCache(args["cache"])
        def compute(texts):
            time.sleep(0.3)  # both processes miss the cache and write it at about the same time
            return np.arange(len(texts) * 4, dtype=np.float32).reshape(len(texts), 4)
        return lambda: {"sum": float(cache.get_or_compute(args["texts"], args["encoder"], "token_bag", 16,
                                                          compute).sum())}
    raise SystemExit(f"unknown mode {mode}")


action = prepare()
(sync / f"ready-{index}").touch()
deadline = time.monotonic() + 30
while not (sync / "go").exists():
    if time.monotonic() > deadline:
        raise SystemExit("never got the go")
    time.sleep(0.002)
try:
    print(json.dumps({"ok": True, **action()}))
except BaseException as err:
    print(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}))
'''


def run_together(mode: str, args: dict, sync: Path, env: dict[str, str], n: int = 2) -> list[dict]:
    """Start ``n`` workers of ``mode`` with ``args``, release them together, return their results."""
    sync.mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, mode, json.dumps(args), str(sync), str(i)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    try:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while not all((sync / f"ready-{i}").exists() for i in range(n)):
            dead = [p for p in procs if p.poll() is not None]
            assert not dead and time.monotonic() < deadline, f"a worker did not start: {dead[0].stderr.read() if dead else 'timeout'}"
            time.sleep(0.01)
        (sync / "go").touch()
        outputs = [p.communicate(timeout=WORKER_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and out.strip(), f"worker exited {p.returncode}: {err[-2000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def worker_env(xdg: Path, data_dir: Path | None = None) -> dict[str, str]:
    """The test process's environment with the cache in ``xdg`` and the mirror ``data_dir`` (or none)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CASCADE_ROUTING_DATA_DIR", "CASCADE_ROUTING_CACHE_DIR")}
    env.update(XDG_CACHE_HOME=str(xdg), PYTHONPATH=str(REPO_ROOT))
    if data_dir is not None:
        env["CASCADE_ROUTING_DATA_DIR"] = str(data_dir)
    return env


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (hidden names, ``.part``/``.tmp``) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.startswith(".") or p.suffix in (".part", ".tmp"))


class SlowFile(http.server.BaseHTTPRequestHandler):
    """Serves ``PAYLOAD`` in 64 KiB chunks 10 ms apart (so concurrent downloads overlap)."""

    PAYLOAD = bytes(range(256)) * 4096  # 1 MiB

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", str(len(self.PAYLOAD)))
        self.end_headers()
        for i in range(0, len(self.PAYLOAD), 1 << 16):
            self.wfile.write(self.PAYLOAD[i:i + (1 << 16)])
            self.wfile.flush()
            time.sleep(0.01)


@pytest.fixture()
def slow_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowFile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/file.bin"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache root for this test, used through ``XDG_CACHE_HOME``; no local mirror."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CASCADE_ROUTING_DATA_DIR", raising=False)
    return tmp_path / "xdg"


def mirror_client(raw: Path) -> httpx.Client:
    """An httpx client answering the registered URLs of ``NAME`` from the local mirror ``raw``."""
    by_url = {f.url: raw / f.folder / f.path for f in get_spec(NAME).files}
    return httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, content=by_url[str(r.url)].read_bytes())))


# --------------------------------------------------------------------- two processes, cold cache
def test_two_processes_download_the_same_file_at_once(tmp_path: Path, slow_server: str) -> None:
    """Both end with the verified file and no error; no temporary file is left (the shared ``.part``
    name made one of them fail with FileNotFoundError)."""
    dest = tmp_path / "cache" / "file.bin"
    good = hashlib.sha256(SlowFile.PAYLOAD).hexdigest()
    results = run_together("download", {"url": slow_server, "dest": str(dest), "sha": good}, tmp_path / "sync",
                           worker_env(tmp_path / "xdg"))
    assert results == [{"ok": True, "sha": good}] * 2
    assert dest.read_bytes() == SlowFile.PAYLOAD
    assert leftovers(dest.parent) == []


def test_two_processes_fetch_a_dataset_on_a_cold_download_cache(tmp_path: Path, raw_data_dir: Path) -> None:
    """Two ``fetch`` calls download, verify, convert and cache the same dataset at once: both load it."""
    xdg = tmp_path / "xdg"
    results = run_together("fetch", {"name": NAME, "raw": str(raw_data_dir)}, tmp_path / "sync", worker_env(xdg))
    assert results == [{"ok": True, "rows": ROWS}] * 2
    assert leftovers(xdg) == []
    folders = list((xdg / "cascade-routing" / "converted").iterdir())
    assert len(folders) == 1 and RoutingDataset.load(folders[0]).num_queries == ROWS


def test_two_processes_convert_a_dataset_from_the_mirror_at_once(tmp_path: Path, raw_data_dir: Path) -> None:
    """Two ``load_dataset`` calls on a cold converted cache: both load it, one complete folder remains."""
    xdg = tmp_path / "xdg"
    results = run_together("load", {"name": NAME}, tmp_path / "sync", worker_env(xdg, raw_data_dir))
    assert results == [{"ok": True, "rows": ROWS}] * 2
    assert leftovers(xdg) == []
    (folder,) = (xdg / "cascade-routing" / "converted").iterdir()
    assert is_complete_dataset_folder(folder)


def test_two_processes_save_the_same_folder(tmp_path: Path) -> None:
    """Repeated concurrent saves to one folder all succeed (a shared ``data.parquet.tmp`` made one fail)
    and leave exactly the two files of one complete save."""
    folder = tmp_path / "saved"
    results = run_together("save", {"folder": str(folder), "rows": 20000, "times": 6}, tmp_path / "sync",
                           worker_env(tmp_path / "xdg"))
    assert results == [{"ok": True}] * 2
    assert sorted(p.name for p in folder.iterdir()) == [TABLE_FILE, META_FILE]
    assert RoutingDataset.load(folder).num_queries == 20000


def test_two_processes_fill_the_embedding_cache_at_once(tmp_path: Path) -> None:
    """Both get the embeddings; the cache holds one readable file and no temporary one."""
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    args = {"cache": str(tmp_path / "emb"), "encoder": str(encoder), "texts": ["a", "b", "c"]}
    results = run_together("embed", args, tmp_path / "sync", worker_env(tmp_path / "xdg"))
    assert results == [{"ok": True, "sum": float(np.arange(12).sum())}] * 2
    (file,) = (tmp_path / "emb").iterdir()
    np.testing.assert_array_equal(np.load(file), np.arange(12, dtype=np.float32).reshape(3, 4))


def test_two_threads_storing_the_same_embeddings_do_not_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced interleaving: both threads have written their temporary file before either moves it into
    place (a pid-only temporary name is shared by threads: the second move failed)."""
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    real_replace, both_written = os.replace, threading.Barrier(2, timeout=10)

    def replace_when_both_wrote(src, dst):
        both_written.wait()
        return real_replace(src, dst)

    monkeypatch.setattr(encoding.os, "replace", replace_when_both_wrote)
    cache, results, errors = EmbeddingCache(tmp_path / "emb"), [], []

    def work() -> None:
        try:
            results.append(cache.get_or_compute(["x", "y"], str(encoder), "token_bag", 16, lambda t: np.ones((2, 3))))
        except BaseException as err:  # reported below, with the thread's error
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == [] and len(results) == 2
    assert [p.suffix for p in (tmp_path / "emb").iterdir()] == [".npy"]


# ------------------------------------------------------------------------ damaged cache entries
def test_fetch_rebuilds_a_truncated_converted_folder(xdg: Path, raw_data_dir: Path, monkeypatch) -> None:
    """A cached folder with a cut-off table (a crash, a full disk) is treated as absent: ``fetch``
    returns a folder that loads."""
    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(raw_data_dir))
    folder = fetch(NAME, progress=False)
    table = folder / TABLE_FILE
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    assert fetch(NAME, progress=False) == folder
    assert RoutingDataset.load(folder).num_queries == ROWS
    assert leftovers(xdg) == []


def test_fetch_rebuilds_a_folder_without_valid_metadata(xdg: Path, raw_data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(raw_data_dir))
    folder = fetch(NAME, progress=False)
    (folder / META_FILE).write_text('{"format": "cascade-routing-dat')  # cut short
    assert RoutingDataset.load(fetch(NAME, progress=False)).num_queries == ROWS


def test_a_file_in_the_way_of_the_converted_folder_is_replaced(xdg: Path, raw_data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(raw_data_dir))
    target = converted_path(NAME)
    target.parent.mkdir(parents=True)
    target.write_text("not a folder")
    assert load_dataset(NAME, progress=False).num_queries == ROWS
    assert is_complete_dataset_folder(target)


def test_a_read_overlapping_a_save_is_an_error_not_a_mix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced interleaving: another save lands between reading ``metadata.json`` and the table. The read
    must not return the first save's metadata with the second save's values."""
    import pyarrow.parquet as pq

    def dataset(name: str, value: float) -> RoutingDataset:
        return RoutingDataset(queries=["q1", "q2"], models=["a", "b"], quality=np.full((2, 2), value),
                              cost=np.ones((2, 2)), name=name)

    folder = save_dataset(dataset("first", 0.25), tmp_path / "d")
    real_read, saved = pq.read_table, []

    def read_after_another_save(path, *args, **kwargs):
        if not saved:
            saved.append(save_dataset(dataset("second", 0.75), folder))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", read_after_another_save)
    try:
        mixed = RoutingDataset.load(folder)
    except DatasetError as err:
        assert "saved again while it was being read" in str(err)
    else:
        pytest.fail(f"read {mixed.name!r} with quality {mixed.quality[0, 0]} (a mix of two saves)")
    again = RoutingDataset.load(folder)
    assert again.name == "second" and again.quality[0, 0] == 0.75


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"", lambda b: b"\x93NUMPY garbage"])
def test_a_damaged_embedding_file_is_computed_again(tmp_path: Path, damage) -> None:
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    cache, calls = EmbeddingCache(tmp_path / "emb"), []

    def compute(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return np.full((len(texts), 4), 2.0)

    first = cache.get_or_compute(["a", "b"], str(encoder), "token_bag", 16, compute)
    (file,) = (tmp_path / "emb").iterdir()
    file.write_bytes(damage(file.read_bytes()))
    with pytest.warns(UserWarning, match=re.escape(f"embedding cache file {file} cannot be read")):
        again = cache.get_or_compute(["a", "b"], str(encoder), "token_bag", 16, compute)
    np.testing.assert_array_equal(again, first)
    assert len(calls) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: read back without a warning or a third compute
        np.testing.assert_array_equal(cache.get_or_compute(["a", "b"], str(encoder), "token_bag", 16, compute), first)
    assert len(calls) == 2


# ------------------------------------------------------------------------ unusable cache locations
def test_a_cache_root_that_is_a_file_is_one_clear_cli_error(tmp_path: Path, raw_data_dir: Path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "xdg-is-a-file"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(raw_data_dir))
    assert main(["data", "fetch", NAME, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot use the cache folder {blocker}/cascade-routing/converted: Not a directory" in err
    assert "set XDG_CACHE_HOME to a writable folder" in err and "Traceback" not in err


def test_a_download_cache_under_a_file_names_both_settings(xdg: Path, raw_data_dir: Path) -> None:
    xdg.parent.mkdir(exist_ok=True)
    xdg.write_text("x")
    with mirror_client(raw_data_dir) as client, pytest.raises(DatasetError) as err:
        fetch(NAME, client=client, progress=False)
    msg = str(err.value)
    assert f"cannot use the cache folder {xdg}/cascade-routing/raw/" in msg
    assert "XDG_CACHE_HOME" in msg and "CASCADE_ROUTING_DATA_DIR" in msg


def _deny_writes_under(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``root`` behave like a cache on a disk we may read but not write (as root, chmod would not
    stop us): creating a folder there is EACCES and ``os.access(.., W_OK)`` is false."""
    real_mkdir, real_access = Path.mkdir, os.access

    def mkdir(self: Path, *args, **kwargs) -> None:
        if self.is_relative_to(root) and not self.is_dir():
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    def access(path, mode, *args, **kwargs) -> bool:
        if Path(path).is_relative_to(root) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "access", access)


def test_an_unwritable_cache_is_a_clear_error_and_a_warm_one_still_reads(xdg: Path, raw_data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(raw_data_dir))
    _deny_writes_under(xdg, monkeypatch)
    with pytest.raises(DatasetError, match=re.escape(f"cannot use the cache folder {xdg}/cascade-routing/converted: "
                                                     "Permission denied; set XDG_CACHE_HOME to a writable folder")):
        load_dataset(NAME, progress=False)
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(raw_data_dir))
    load_dataset(NAME, progress=False)  # warm the cache, then make it read-only
    _deny_writes_under(xdg, monkeypatch)
    assert load_dataset(NAME, progress=False).num_queries == ROWS  # nothing to write: it reads
    with pytest.raises(DatasetError, match=re.escape(f"{xdg}/cascade-routing/converted: not writable; set XDG_CACHE_HOME")):
        fetch(NAME, progress=False, refresh=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through chmod")
def test_a_read_only_cache_folder_is_a_clear_error(xdg: Path, raw_data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(raw_data_dir))
    xdg.mkdir()
    xdg.chmod(0o555)
    try:
        with pytest.raises(DatasetError, match=re.escape(f"cannot use the cache folder {xdg}/cascade-routing/converted")):
            load_dataset(NAME, progress=False)
    finally:
        xdg.chmod(0o755)


def test_an_embedding_cache_under_a_file_names_the_settings(tmp_path: Path) -> None:
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(DatasetError, match=re.escape(f"cannot use the cache folder {blocker}/emb: Not a directory")
                       + ".*CASCADE_ROUTING_CACHE_DIR"):
        EmbeddingCache(blocker / "emb").get_or_compute(["a"], str(encoder), "token_bag", 16, lambda t: np.ones((1, 2)))


def test_download_file_leaves_no_temporary_file_on_a_checksum_mismatch(tmp_path: Path, slow_server: str) -> None:
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(DatasetError, match="checksum mismatch"):
        download_file(slow_server, dest, "0" * 64, progress=False)
    assert list(dest.parent.iterdir()) == []


def test_a_cold_load_reads_the_converted_folder_once(xdg: Path, raw_data_dir: Path, monkeypatch) -> None:
    """The conversion is validated by reading its private copy back; that copy is what a cold
    ``load_dataset`` returns, instead of reading the published folder a second time."""
    import cascade_routing.data.registry as registry

    monkeypatch.setenv("CASCADE_ROUTING_DATA_DIR", str(raw_data_dir))
    reads: list[Path] = []
    real = registry.load_dataset_folder
    monkeypatch.setattr(registry, "load_dataset_folder", lambda path, *a, **k: reads.append(Path(path)) or real(path, *a, **k))
    assert load_dataset(NAME, progress=False).num_queries == ROWS
    assert len(reads) == 1 and reads[0] != converted_path(NAME)  # the private copy, before publishing
    assert load_dataset(NAME, progress=False).num_queries == ROWS  # warm: the published folder, once
    assert reads[1:] == [converted_path(NAME)]


def test_download_file_into_a_folder_under_a_file_names_the_folder(tmp_path: Path, slow_server: str) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(DatasetError, match=re.escape(f"cannot use the cache folder {blocker}/out: Not a directory; "
                                                     "choose a writable destination")):
        download_file(slow_server, blocker / "out" / "file.bin", "0" * 64, progress=False)
