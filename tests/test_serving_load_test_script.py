"""``benchmarks/load_test.py``'s command line and start-up: a relative ``--checkpoint`` is the caller's,
and a ``serve`` that fails to start is reported as such (not hidden by a later error)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.script_helpers import load_script


def test_a_relative_checkpoint_is_resolved_against_the_callers_directory(tmp_path, monkeypatch):
    lt = load_script("benchmarks/load_test.py")
    monkeypatch.chdir(tmp_path)
    args = lt.parse_args(["--checkpoint", "arts/model.safetensors", "--json", "out/report.json"])
    assert args.checkpoint == str(tmp_path / "arts" / "model.safetensors")
    assert args.json == str(tmp_path / "out" / "report.json")
    assert lt.parse_args([]).checkpoint is None


class _Proc:
    """A started process that already exited (for the start-up path)."""

    pid = 2**22 + 4321
    returncode = 1

    def __init__(self, *args, **kwargs) -> None:
        self.args = args

    def poll(self):
        return 1

    def wait(self, timeout=None):
        return 1

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass


def test_a_serve_that_fails_to_start_is_the_error_reported(tmp_path, monkeypatch):
    lt = load_script("benchmarks/load_test.py")
    test = SimpleNamespace(num_queries=3, num_models=2, tasks=None)
    monkeypatch.setattr(lt, "prepare", lambda args, work: (str(tmp_path / "ck"), test, [], 0.001, "routing", False))
    monkeypatch.setattr(lt.subprocess, "Popen", _Proc)
    started = []

    def wait_healthy(url, proc, timeout_s, log):
        started.append(url)
        if len(started) == 2:  # the replay backend came up; serve did not
            raise RuntimeError(f"process exited with 1; log:\nserve: error: no such checkpoint {Path('ck')}")

    monkeypatch.setattr(lt, "wait_healthy", wait_healthy)
    with pytest.raises(RuntimeError, match="no such checkpoint"):
        lt.main(["--requests", "2", "--concurrency", "2"])
