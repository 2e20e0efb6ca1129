"""The examples run as the README shows them."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def run_example(name: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_pool_counter_example():
    result = run_example("pool_counter.py")
    assert result.returncode == 0, result.stderr
    assert "hits = 2000 (8 tasks x 250), from " in result.stdout
    assert "tasks done = [0, 1, 2, 3, 4, 5, 6, 7]" in result.stdout


def test_quick_start_demo():
    result = run_example("demo.py")
    assert result.returncode == 0, result.stderr
    assert "run 1: server pid" in result.stdout and "hits = 2000" in result.stdout
    assert "restored hits = 2000" in result.stdout and "hits = 4000 after the restart (was 2000)" in result.stdout
