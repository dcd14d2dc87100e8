"""``serve --workers N``: several real server processes on one port, one spend account, one SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cascade_routing.serving.workers import run_workers
from tests.serving_helpers import free_port, synthetic_dataset, wait_healthy

NAME = "cascade-routing"
REPO = Path(__file__).resolve().parents[1]


def _first_exits(code: int) -> None:
    """Worker 0 exits at once with ``code``; the others wait (a SIGTERM ends them)."""
    import multiprocessing

    if multiprocessing.current_process().name.endswith("-0"):
        raise SystemExit(code)
    time.sleep(60)


def test_a_worker_that_exits_on_its_own_stops_the_others_and_fails():
    started = time.monotonic()
    assert run_workers(2, _first_exits, {"code": 3}) == 1
    assert time.monotonic() - started < 50  # the waiting sibling was stopped, not waited for
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_workers(0, _first_exits, {"code": 0})


def _write_pid_and_wait(folder: str) -> None:
    import multiprocessing

    Path(folder, multiprocessing.current_process().name).write_text(str(os.getpid()))
    time.sleep(60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    """SIGKILL to the parent (it cannot forward anything) still ends every worker."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from cascade_routing.serving.workers import run_workers; "
            "from tests.test_serving_workers import _write_pid_and_wait; "
            "run_workers(2, _write_pid_and_wait, {'folder': sys.argv[2]})")
    parent = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(tmp_path)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.iterdir())) < 2:
            assert time.monotonic() < deadline and parent.poll() is None, "the workers did not start"
            time.sleep(0.05)
        time.sleep(0.2)  # both pid files complete
        pids = [int(f.read_text()) for f in tmp_path.iterdir()]
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} outlived their killed parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in status


def test_several_workers_need_a_shared_store():
    from cascade_routing.serving.server import serve

    with pytest.raises(ValueError, match="shared spend store"):
        serve("missing.safetensors", "missing.yaml", 0.001, workers=2, store="memory://")
    with pytest.raises(ValueError, match="fixed --port"):
        serve("missing.safetensors", "missing.yaml", 0.001, workers=2, port=0)


def test_two_workers_share_the_port_and_the_account_and_stop_on_one_sigterm(tmp_path):
    from cascade_routing.estimators.artifact import load_artifact
    from cascade_routing.serving.replay import backends_document, create_replay_app
    from cascade_routing.serving.server import BackgroundServer
    from tests.serving_helpers import make_tiny_artifact

    ds = synthetic_dataset(40, seed=3)
    checkpoint, splits = make_tiny_artifact(ds, tmp_path / "artifact", strategies=("cascade_routing",))
    test = splits["test"]
    budget = sorted(load_artifact(checkpoint).fitted["cascade_routing"])[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with BackgroundServer(create_replay_app(test)) as replay:
        backends = tmp_path / "backends.yaml"
        backends.write_text(yaml.safe_dump(backends_document(test, replay.url)))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "cascade_routing", "serve", "--checkpoint", str(checkpoint), "--backends",
             str(backends), "--budget", str(budget), "--store", f"sqlite:///{tmp_path / 'spend.sqlite'}",
             "--port", str(port), "--workers", "2", "--log-level", "warning", "--shutdown-timeout-s", "5"],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            wait_healthy(url, proc, 180, log)
            deadline = time.monotonic() + 120
            processes: set[int] = set()
            while len(processes) < 2:  # new connections reach both workers once both listen
                assert time.monotonic() < deadline, f"one worker answered: {processes}; log:\n{log.read_text()[-3000:]}"
                processes.add(httpx.get(url + "/v1/routing/stats", timeout=10).json()["process"])
            assert proc.pid not in processes
            spent = 0.0
            for q in test.queries[:8]:
                resp = httpx.post(url + "/v1/chat/completions", timeout=60,
                                  json={"model": NAME, "messages": [{"role": "user", "content": q}]})
                assert resp.status_code == 200, resp.text
                spent += resp.json()["routing"]["total_cost"]
            for _ in range(4):  # whichever worker answers, the account is the one in the store
                stats = httpx.get(url + "/v1/routing/stats", timeout=10).json()
                assert stats["requests"] == 8 and stats["total_cost"] == pytest.approx(spent, rel=1e-12)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"serve --workers 2 did not exit within 60 s of SIGTERM; log:\n{log.read_text()[-3000:]}")
    assert code == 0, log.read_text()[-3000:]
    for pid in processes:  # no worker outlives the parent
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
