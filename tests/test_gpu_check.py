"""benchmarks/gpu_check.sh, exercised on CPU: the dry run writes the summary and the engine figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path: Path, *args: str, sizes: str = "48", timeout: float = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SIZES=sizes)
    return subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--dry-run", "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_dry_run_engine_step_writes_figures(tmp_path):
    proc = _run(tmp_path, "--only", "engine")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "engine.jsonl").read_text().splitlines()]
    assert [r["queries"] for r in rows] == [48]
    assert rows[0]["device"] == "cpu" and rows[0]["identical_decisions"] and rows[0]["query_steps"] >= 48
    summary = (out / "summary.md").read_text()
    assert "| bench_engine 48 queries | ok |" in summary and "| 48 |" in summary


def test_unknown_argument_is_named(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--frobnicate" in proc.stderr


def test_pytest_step_runs_the_device_tests_and_not_this_scripts_own(tmp_path):
    """The step's ``-k "gpu or cuda"`` also matches this file, whose full dry run starts the script
    again: the step must leave it out, or the check recurses until its timeout."""
    proc = _run(tmp_path, "--only", "pytest")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (tmp_path / "out" / "pytest.txt").read_text()
    outcomes = [line for line in log.splitlines() if line.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
    assert any("test_engine_simulation" in line for line in outcomes)  # -rA names every selected test
    assert not any("test_gpu_check" in line for line in outcomes)


@pytest.mark.slow
def test_full_dry_run(tmp_path):
    proc = _run(tmp_path, sizes="64 128")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "table1" / "table.md").exists()
    summary = (out / "summary.md").read_text()
    for name in ("pytest", "bench_engine 64", "bench_engine 128", "Table 1 protocol", "fine-tuning smoke run"):
        assert f"| {name}" in summary
    assert "failed" not in summary
