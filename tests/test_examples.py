"""The examples run as the README shows them."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def run_example(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args], env=env, capture_output=True, text=True, timeout=timeout
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


def test_scheduled_snapshots_example(tmp_path):
    result = run_example("scheduled_snapshots.py", str(tmp_path / "state.json"))
    assert result.returncode == 0, result.stderr
    for tick in (1, 2, 3):
        assert f"tick {tick}: saved at " in result.stdout and f"with tick={tick}" in result.stdout
    assert "error: None" in result.stdout


def test_quix_storage_example(tmp_path):
    result = run_example("quix_storage.py", str(tmp_path / "state"))
    assert result.returncode == 0, result.stderr
    assert "KEY1 = 12.51 (float)" in result.stdout
    assert "KEY4 = b'\\x00\\x01' (bytes)" in result.stdout
    assert "KEY5 = bytearray(b'ba') (bytearray)" in result.stdout
    assert "after remove: ['KEY2', 'KEY3', 'KEY4', 'KEY5']" in result.stdout
    assert "after clear: set()" in result.stdout


def test_pode_state_example(tmp_path):
    """The timer appends, GET returns the hashtable, DELETE resets it, a restart restores the file."""
    import json
    import socket
    import time
    import urllib.request

    from conftest import reap

    path = tmp_path / "state.json"

    def start(port):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
        env["PYTHONPATH"] = str(ROOT)
        argv = [sys.executable, str(ROOT / "examples" / "pode_state.py"), "--port", str(port),
                "--path", str(path), "--interval", "0.2", "--seconds", "30"]  # fmt: skip
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        restored = proc.stdout.readline()
        assert proc.stdout.readline().startswith("listening on"), restored
        return proc, restored

    def call(port, method="GET"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, restored = start(port)
    try:
        assert restored.startswith("restored 0 names")
        deadline = time.monotonic() + 20
        while len(call(port)["values"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        values = call(port)["values"]
        assert len(values) >= 3 and all(0 <= v <= 9 for v in values)
        assert call(port, "DELETE") == {"values": []}
        assert len(call(port)["values"]) <= 1
        deadline = time.monotonic() + 20
        while len(json.loads(path.read_text())["names"]["hash"]["values"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.terminate()
        reap(proc)
        proc.stdout.close()
    saved = json.loads(path.read_text())
    assert saved["scopes"] == {"hash": ["Scope0", "Scope1"]}
    proc, restored = start(port)
    try:
        assert restored.startswith("restored 1 names; hash = {'values': [")
    finally:
        proc.terminate()
        reap(proc)
        proc.stdout.close()
