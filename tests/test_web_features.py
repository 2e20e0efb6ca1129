"""Expiry and change notifications as web workers use them: sessions that expire and a rate limit
exact across gunicorn workers (examples/web/sessions_app.py), and long polls in uvicorn workers that
hear of a flag set through another worker (examples/web/flags_app.py)."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import shlex
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT
from test_web import free_port, start, stop_group, wait_ready

import sharedstate


def call(port: int, method: str, path: str, body: object = None, headers: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def parallel(task, count: int, threads: int = 8) -> list:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: task(), range(count)))


def serving(port: int, path: str) -> None:
    """Wait until at least two workers answer ``path`` (the master listens before its workers boot)."""
    deadline = time.monotonic() + 60
    while len({body["pid"] for _, body in parallel(lambda: call(port, "GET", path), 16)}) < 2:
        assert time.monotonic() < deadline, "a single worker answers"


#: The README's commands, run here as written (in a folder of their own, where ``examples`` is the
#: repository's; GUNICORN_CMD_ARGS and UVICORN_PORT move them off port 8000).
SESSIONS_SERVER = (
    "sharedstate run --path sessions.json -- gunicorn -w 4 --chdir examples/web 'sessions_app:create_app()'"
)
FLAGS_SERVER = "sharedstate run --path flags.json -- uvicorn --workers 3 --app-dir examples/web flags_app:app"


def start_as_written(command: str, folder, port: int, env_extra: dict[str, str] | None = None):
    """``command`` started in ``folder``, its programs run by this Python; and the address that
    ``sharedstate run`` printed."""
    argv = [
        part
        for word in shlex.split(command)
        for part in ([sys.executable, "-m", word] if word in ("sharedstate", "gunicorn", "uvicorn") else [word])
    ]
    (folder / "examples").symlink_to(ROOT / "examples")
    env = {"GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port}", "UVICORN_PORT": str(port), **(env_extra or {})}
    proc = start(argv, env, cwd=folder)
    line = proc.stderr.readline().decode()  # "sharedstate: serving at ADDRESS (pid N)"
    assert " serving at " in line, line + proc.stderr.read().decode()[-3000:]
    return proc, line.split(" serving at ", 1)[1].rsplit(" (pid ", 1)[0]


@pytest.mark.timeout(240)
def test_sessions_expire_and_a_rate_limit_is_exact_across_gunicorn_workers(tmp_path):
    port = free_port()
    limits = {"SESSION_TTL_S": "1.5", "RATE_LIMIT": "50", "RATE_WINDOW_S": "120"}
    proc, address = start_as_written(SESSIONS_SERVER, tmp_path, port, limits)
    try:
        wait_ready(proc, port)
        serving(port, "/me")
        state = sharedstate.connect(address)

        # The rate limit: 120 calls from 8 threads through 4 workers, exactly 50 allowed, counted 1..50.
        replies = parallel(lambda: call(port, "GET", "/limited"), 120)
        allowed = sorted(body["calls"] for status, body in replies if status == 200)
        assert allowed == list(range(1, 51))
        assert sum(status == 429 for status, _ in replies) == 70
        assert len({body["pid"] for _, body in replies}) >= 2, "served by a single worker"
        assert 0 < state.ttl("rate:127.0.0.1") <= 120

        # A session started in one worker is known in every worker while it is used...
        status, body = call(port, "POST", "/login", {"user": "ada"})
        assert status == 201
        session = {"X-Session": body["session"]}
        replies = parallel(lambda: call(port, "GET", "/me", headers=session), 40)
        assert {(status, body["user"]) for status, body in replies} == {(200, "ada")}
        assert len({body["pid"] for _, body in replies}) >= 2, "served by a single worker"

        # ...and once unused for its time to live, the server drops it: every worker then refuses it.
        name = f"session:{session['X-Session']}"
        deadline = time.monotonic() + 10
        while name in state.snapshot():  # a snapshot does not move the expiry, and shows what is stored
            assert time.monotonic() < deadline, "the session outlived its time to live"
            time.sleep(0.05)
        replies = parallel(lambda: call(port, "GET", "/me", headers=session), 20)
        assert {status for status, _ in replies} == {401}
        state.close()
    finally:
        stop_group(proc)


@pytest.mark.timeout(240)
def test_a_long_poll_in_one_uvicorn_worker_hears_a_flag_set_through_another(tmp_path):
    port = free_port()
    proc, address = start_as_written(FLAGS_SERVER, tmp_path, port)
    connections: list[http.client.HTTPConnection] = []
    try:
        wait_ready(proc, port)
        state = sharedstate.connect(address)
        # A kept-alive connection stays with the worker that accepted it: open connections until two
        # are served by different workers (the kernel picks the worker of each).
        by_worker: dict[int, http.client.HTTPConnection] = {}
        deadline = time.monotonic() + 60
        while len(by_worker) < 2:
            assert time.monotonic() < deadline, "every connection went to one worker"
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            connections.append(connection)
            by_worker.setdefault(kept_call(connection, "GET", "/flags/beta")[1]["pid"], connection)
            time.sleep(0.05)
        (watcher_pid, watching), (setter_pid, setting) = list(by_worker.items())[:2]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            poll = pool.submit(kept_call, watching, "GET", "/flags/beta/next?timeout=60")
            while state.stats()["watchers"] < 1:  # the long poll is watching
                assert time.monotonic() < deadline + 60, "the long poll never started watching"
                time.sleep(0.02)
            status, body = kept_call(setting, "PUT", "/flags/beta", {"on": True})
            assert (status, body["pid"]) == (200, setter_pid)
            assert poll.result(60) == (200, {"value": {"on": True}, "pid": watcher_pid})
        # A long poll that hears nothing ends at its timeout.
        assert call(port, "GET", "/flags/beta/next?timeout=0.2") == (204, {})
        state.close()
    finally:
        for connection in connections:
            connection.close()
        stop_group(proc)


def kept_call(connection: http.client.HTTPConnection, method: str, path: str, body: object = None) -> tuple[int, dict]:
    """``call`` on a kept-alive connection (the same worker every time)."""
    data = None if body is None else json.dumps(body)
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    raw = response.read()
    return response.status, json.loads(raw) if raw else {}
