"""``sharedstate top``: redrawn in a terminal (a real pseudo-terminal), one line per interval when piped,
quiet on Ctrl-C and SIGTERM, one line on stderr when the server goes away."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, kill, reap, start_serve

import sharedstate

CLEAR = "\x1b[H\x1b[2J"


def _busy(address: str, stop) -> None:
    """Move the server's counters until told to stop: each round an ``incr`` and a new name (the names
    are a figure only this worker changes)."""
    state = sharedstate.connect(address)
    number = 0
    while not stop.is_set():
        state.incr("hits")
        state.set(f"n{number}", number)
        number += 1
        time.sleep(0.002)


def _env(address: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    env["SHAREDSTATE_ADDRESS"] = address
    return env


def _top(address: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sharedstate", "top", *args], env=_env(address), text=True, **kwargs)


def _serve(tmp_path) -> tuple[subprocess.Popen, str]:
    address = str(tmp_path / "s.sock")
    proc = start_serve(tmp_path / "state.json", address, "--durability", "journal", text=True)
    first = proc.stdout.readline()
    assert first.startswith(f"sharedstate: serving at {address}"), first + proc.stderr.read()
    return proc, address


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    """``sharedstate serve`` with a journal, and a process that keeps calling ``incr`` on it."""
    proc, address = _serve(tmp_path_factory.mktemp("top"))
    stop = multiprocessing.get_context("spawn").Event()
    worker = multiprocessing.get_context("spawn").Process(target=_busy, args=(address, stop))
    worker.start()
    try:
        yield address
    finally:
        stop.set()
        reap(worker)
        kill(proc.pid, signal.SIGTERM)
        reap(proc)
        proc.stdout.close()
        proc.stderr.close()


def test_piped_it_prints_a_header_then_one_line_per_interval(busy_server):
    started = time.monotonic()
    done = _top(busy_server, "--interval", "0.2", "--count", "3", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = done.communicate(timeout=60)
    took = time.monotonic() - started  # longer than any one interval top measured
    assert done.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 4, out
    assert lines[0].split() == [
        "time",
        "ops/s",
        "clients",
        "names",
        "rss",
        "locks",
        "waiters",
        "last-save",
        "journal",
    ]
    rows = [line.split() for line in lines[1:]]
    assert all(len(row) == 9 for row in rows), out
    names = [int(row[3]) for row in rows]
    assert names[-1] > names[0], out  # the worker ran while top did
    for number in range(1, len(rows)):
        # The ops of an interval: top's own stats() call, and the worker's calls, at least one per name
        # it added. Over an interval that lasted at most ``took`` seconds, that is this rate at least.
        added = names[number] - names[number - 1]
        assert float(rows[number][1]) >= (1 + added) / took - 0.05, out
    assert all(int(row[2]) >= 2 for row in rows), out  # the worker and top itself
    assert all(row[8].endswith(("B", "K", "M")) for row in rows), out  # the journal's size
    assert CLEAR not in out


def test_in_a_terminal_it_redraws_the_screen(busy_server):
    main, child = os.openpty()
    try:
        proc = _top(busy_server, "--interval", "0.2", "--count", "2", stdin=child, stdout=child, stderr=child)
        os.close(child)
        child = -1
        seen = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if select.select([main], [], [], 1)[0]:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: the terminal's last writer is gone
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(30) == 0, seen
    finally:
        if child >= 0:
            os.close(child)
        os.close(main)
        reap(proc)
    text = seen.decode()
    screens = text.split(CLEAR)[1:]
    assert len(screens) == 3, text  # the first figures at once, then one per interval
    last = screens[-1]
    assert f"sharedstate top: {busy_server}" in last
    rate = next(line for line in last.splitlines() if line.startswith("ops/s"))
    assert float(rate.split()[1]) > 0, last
    assert "incr" in next(line for line in last.splitlines() if line.startswith("calls/s")), last


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_end_it_quietly(busy_server, sig):
    proc = _top(busy_server, "--interval", "0.1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert "ops/s" in proc.stdout.readline()
        assert proc.stdout.readline()  # a line of figures: it runs
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == 0
    assert err == ""


def test_a_server_that_goes_away_is_one_line_on_stderr_and_a_non_zero_exit(tmp_path):
    server, address = _serve(tmp_path)
    proc = _top(address, "--interval", "0.1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert "ops/s" in proc.stdout.readline()
        kill(server.pid, signal.SIGTERM)
        reap(server)
        out, err = proc.communicate(timeout=60)
    finally:
        kill(server.pid, signal.SIGTERM)
        reap(proc, server)
        server.stdout.close()
        server.stderr.close()
    assert proc.returncode == 1
    assert len(err.splitlines()) == 1 and err.startswith("sharedstate: error:"), err


@pytest.mark.parametrize("args", [["--interval", "0"], ["--count", "0"], ["--interval", "soon"]])
def test_bad_options_are_usage_errors(tmp_path, args):
    done = subprocess.run(
        [sys.executable, "-m", "sharedstate", "top", *args],
        env=_env(str(tmp_path / "none.sock")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "top" in done.stderr


def test_it_shows_a_redis_state_too(redis_server):
    done = _top(redis_server.url, "--interval", "0.1", "--count", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    header, row = out.splitlines()
    assert len(row.split()) == 9 and float(row.split()[1]) > 0  # Redis counts top's own commands too
    assert row.split()[6] == "-"  # waiters: not known on Redis
