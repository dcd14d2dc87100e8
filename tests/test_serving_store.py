"""Spend accounts that survive restarts and are shared by replicas: the SQLite store (default) and
the Redis store, with two real ``cascade-routing serve`` processes behind one real redis-server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cascade_routing.serving.accounts import SpendLedger
from cascade_routing.serving.store import MemoryStore, SQLiteStore, StoreError, open_store
from tests.serving_helpers import ServingStack, free_port, stand_in_router, synthetic_dataset, wait_healthy

NAME = "cascade-routing"
REPO = Path(__file__).resolve().parents[1]


def _chat(url, query, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": NAME, "messages": [{"role": "user", "content": query}]})


@pytest.mark.parametrize("make", [MemoryStore, lambda: SQLiteStore(":memory:")])
def test_store_adds_atomically_and_reads_back(make):
    store = make()
    store.add("a", {"cost": 0.5, "requests": 1})
    store.add("a", {"cost": 0.25, "requests": 1, "runs:m": 2})
    store.add("b", {"cost": 1.0})
    assert store.read("a") == {"cost": 0.75, "requests": 2, "runs:m": 2}
    assert store.accounts() == ["a", "b"] and store.read("nobody") == {}
    assert store.read_field("a", "cost") == 0.75 and store.read_field("a", "runs:m") == 2
    assert store.read_field("a", "answers:m") == 0.0 and store.read_field("nobody", "cost") == 0.0


def test_open_store_urls(tmp_path):
    assert isinstance(open_store(None), MemoryStore)
    assert isinstance(open_store(f"sqlite:///{tmp_path}/x.sqlite"), SQLiteStore)
    with pytest.raises(StoreError, match="unknown spend store URL"):
        open_store("mongodb://nowhere")
    with pytest.raises(StoreError, match="cannot reach the Redis spend store"):
        open_store(f"redis://127.0.0.1:{free_port()}/0")


def test_sqlite_spend_survives_a_server_restart(tmp_path):
    ds = synthetic_dataset(12)
    router, _, budget = stand_in_router(ds)
    path = tmp_path / "spend.sqlite"
    spent = 0.0
    with ServingStack(ds, router, budget=budget, store=SQLiteStore(path)) as s:
        for q in ds.queries[:3]:
            spent += _chat(s.url, q).json()["routing"]["total_cost"]
    with ServingStack(ds, router, budget=budget, store=SQLiteStore(path)) as s:  # a fresh process's view
        assert httpx.get(s.url + "/v1/routing/stats", timeout=10).json()["requests"] == 3
        spent += _chat(s.url, ds.queries[3]).json()["routing"]["total_cost"]
        stats = httpx.get(s.url + "/v1/routing/stats", timeout=10).json()
    assert stats["requests"] == 4 and stats["total_cost"] == pytest.approx(spent, rel=1e-12)
    assert SpendLedger(SQLiteStore(path)).snapshot()["total_cost"] == pytest.approx(spent, rel=1e-12)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server; .ci/run does this)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            open_store(url).close()
            break
        except StoreError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


def test_redis_store_adds_atomically_and_reads_back(redis_url):
    store = open_store(redis_url)
    store.add("unit-a", {"cost": 0.5, "requests": 1})
    store.add("unit-a", {"cost": 0.25, "requests": 1, "runs:m": 2})
    other = open_store(redis_url)  # a second client (another replica) sees the same counters
    assert other.read("unit-a") == {"cost": 0.75, "requests": 2, "runs:m": 2}
    assert "unit-a" in other.accounts() and other.read("nobody") == {}
    assert other.read_field("unit-a", "cost") == 0.75 and other.read_field("nobody", "cost") == 0.0


def _start_serve(checkpoint, backends, budget, store, keys, port, log):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cascade_routing", "serve", "--checkpoint", str(checkpoint), "--backends",
         str(backends), "--budget", str(budget), "--store", store, "--api-keys", str(keys), "--port", str(port),
         "--log-level", "warning"], stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("serve did not exit within 30 s of SIGTERM")


def test_two_serve_processes_share_one_account_per_key_in_redis(tmp_path, redis_url):
    from cascade_routing.serving.replay import backends_document, create_replay_app
    from cascade_routing.serving.server import BackgroundServer
    from tests.serving_helpers import make_tiny_artifact

    ds = synthetic_dataset(40, seed=3)
    checkpoint, splits = make_tiny_artifact(ds, tmp_path / "artifact", strategies=("cascade_routing",))
    test = splits["test"]
    from cascade_routing.estimators.artifact import load_artifact

    budget = sorted(load_artifact(checkpoint).fitted["cascade_routing"])[-1]
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "team-a", "key": "sk-team-a-1234"},
                                             {"name": "team-b", "key": "sk-team-b-5678"}]}))
    with BackgroundServer(create_replay_app(test)) as replay:
        backends = tmp_path / "backends.yaml"
        backends.write_text(yaml.safe_dump(backends_document(test, replay.url)))
        ports = [free_port(), free_port()]
        logs = [tmp_path / "serve0.log", tmp_path / "serve1.log"]
        procs = [_start_serve(checkpoint, backends, budget, redis_url, keys, p, log) for p, log in zip(ports, logs)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        try:
            for url, proc, log in zip(urls, procs, logs):
                wait_healthy(url, proc, 180, log)
            spent = {"team-a": 0.0, "team-b": 0.0}
            for k, q in enumerate(test.queries[:6]):
                name, key = ("team-a", "sk-team-a-1234") if k % 3 else ("team-b", "sk-team-b-5678")
                resp = _chat(urls[k % 2], q, key)
                assert resp.status_code == 200, resp.text
                spent[name] += resp.json()["routing"]["total_cost"]

            def stats(url, key):
                return httpx.get(url + "/v1/routing/stats", headers={"Authorization": f"Bearer {key}"},
                                 timeout=10).json()

            for url in urls:  # both replicas see the same account per key
                a, b = stats(url, "sk-team-a-1234"), stats(url, "sk-team-b-5678")
                assert a["requests"] == 4 and a["total_cost"] == pytest.approx(spent["team-a"], rel=1e-12)
                assert b["requests"] == 2 and b["total_cost"] == pytest.approx(spent["team-b"], rel=1e-12)
            _stop(procs[0])  # restart one replica: the totals are still there
            procs[0] = _start_serve(checkpoint, backends, budget, redis_url, keys, ports[0], logs[0])
            wait_healthy(urls[0], procs[0], 180, logs[0])
            spent["team-a"] += _chat(urls[0], test.queries[6], "sk-team-a-1234").json()["routing"]["total_cost"]
            a = stats(urls[0], "sk-team-a-1234")
            assert a["requests"] == 5 and a["total_cost"] == pytest.approx(spent["team-a"], rel=1e-12)
            assert stats(urls[1], "sk-team-a-1234")["requests"] == 5
        finally:
            for proc in procs:
                if proc.poll() is None:
                    _stop(proc)
