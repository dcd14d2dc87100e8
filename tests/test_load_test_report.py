"""The load test's per-process measurements (CPU per request, RSS per round) and its report."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from tests.script_helpers import REPO, load_script


def _load_test():
    return load_script("benchmarks/load_test.py")


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_of_a_process_from_proc_matches_its_own_clock():
    lt = _load_test()
    own_before, proc_before = lt.cpu_s(), lt.cpu_s(os.getpid())
    _spin(0.3)
    own, proc = lt.cpu_s() - own_before, lt.cpu_s(os.getpid()) - proc_before
    tick = 1.0 / os.sysconf("SC_CLK_TCK")  # os.times and /proc count whole clock ticks (10 ms)
    assert own >= 0.3 - 2 * tick
    assert abs(proc - own) < 0.05  # /proc ticks are 10 ms
    assert lt.cpu_s(2**22 + 12345) != lt.cpu_s(2**22 + 12345)  # no such process: nan


def test_cpu_per_request_is_the_delta_of_each_process_over_the_requests():
    lt = _load_test()
    out = lt.cpu_per_request_ms((1.0, 2.0, 3.0), (1.5, 4.0, 3.1), 100)
    assert out == pytest.approx({"replay": 5.0, "serve": 20.0, "client": 1.0})


def test_client_pools_must_fit_the_concurrency(capsys):
    lt = _load_test()
    for pools in ("0", "11"):
        with pytest.raises(SystemExit):
            lt.main(["--concurrency", "10", "--client-pools", pools])
        assert "--client-pools must be between 1 and --concurrency (10)" in capsys.readouterr().err


def test_rss_of_this_process():
    lt = _load_test()
    assert lt.rss_mb(os.getpid()) > 1.0
    assert lt.rss_mb(2**22 + 12345) is None


def test_cpu_and_rss_of_a_server_count_its_worker_processes():
    """``serve --workers N`` does its work in children: the tree of the parent's pid holds them."""
    import subprocess

    lt = _load_test()
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(50_000_000); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while lt.rss_mb(child.pid) is None or lt.rss_mb(child.pid) < 40:
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        assert child.pid in lt.process_tree(os.getpid())
        assert lt.rss_mb(os.getpid()) >= lt.rss_mb(child.pid) + 40  # this process + the child's 50 MB
        assert lt.cpu_s(os.getpid()) >= lt.cpu_s(child.pid) > 0
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_load_test_reports_rss_and_cpu_after_each_round(tmp_path):
    import subprocess

    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "load_test.py"), "--requests", "40",
                           "--concurrency", "10", "--client-pools", "2", "--repeat", "2", "--queries", "60", "--json", str(out),
                           "--budget-tolerance", "10"],  # 40 requests of a tiny untrained artifact
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["answered"] == 80
    assert [r["answered"] for r in report["rounds"]] == [40, 40]
    for r in report["rounds"]:
        assert r["server_rss_mb_after"] > 0
        assert r["cpu_ms_per_request"]["serve"] > 0 and r["cpu_ms_per_request"]["client"] > 0
    assert report["backend_calls_per_request_mean"] >= 1.0
    assert report["baseline_cpu_ms_per_request"]["replay"] >= 0
    ratios = [r["throughput_ratio_vs_direct_backend"] for r in report["rounds"]]
    assert all(r["direct_ok"] == 40 and r["direct_backend_rps"] > 0 for r in report["rounds"])
    assert report["throughput_ratio_range"] == [min(ratios), max(ratios)]
    assert min(ratios) <= report["throughput_ratio_vs_direct_backend"] <= max(ratios)


def _counts(**over):
    base = {"answered": 90, "poison_400": 5, "gave_up": 3, "refused_after_sigterm": 1, "cut_after_sigterm": 1}
    return {**base, **over}


def _account(requests=94, answered=90, answered_cost=0.9, other_cost=0.05):
    return {"requests": requests, "answered": answered, "total_cost": answered_cost + other_cost,
            "cost_by_outcome": {"answered": answered_cost, "disconnects": other_cost}}


def test_account_agrees_when_every_accepted_request_is_stored_and_billed():
    lt = _load_test()
    assert lt.account_problems(_account(), _counts(), delivered=0.9, total_requests=101) == []


def test_account_may_hold_answers_abandoned_by_their_clients_but_no_more():
    lt = _load_test()
    # 2 answers the server billed while their clients gave up: allowed (3 gave up + 1 cut)
    assert lt.account_problems(_account(answered=92, answered_cost=0.92), _counts(), 0.9, 101) == []
    # 5 such answers: more than the 4 clients that left
    assert any("abandoned" in p for p in lt.account_problems(_account(answered=95, answered_cost=0.95), _counts(),
                                                                0.9, 101))
    # fewer answers stored than the clients received: never
    assert any("abandoned" in p for p in lt.account_problems(_account(answered=89), _counts(), 0.9, 101))


def test_account_problems_name_a_missing_request_and_a_cost_mismatch():
    lt = _load_test()
    # 94 accepted, 3 of them abandoned by clients that may have left before the server read them
    assert lt.account_problems(_account(requests=91), _counts(), 0.9, 101) == []
    probs = lt.account_problems(_account(requests=90), _counts(), 0.9, 101)
    assert probs == ["account holds 90 requests, 94 were accepted (3 of them abandoned by their clients)"]
    assert lt.account_problems(_account(requests=95), _counts(), 0.9, 101) != []
    probs = lt.account_problems(_account(answered_cost=0.8), _counts(), 0.9, 101)
    assert any("answered cost" in p for p in probs)
