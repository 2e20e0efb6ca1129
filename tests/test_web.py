"""The web examples as users run them share one state across real workers: the Flask app factory under
gunicorn (around it `sharedstate run`, or gunicorn's master owning the server through the hooks of
gunicorn.conf.py) and the FastAPI app with its lifespan under uvicorn's workers. Rounds of 400 requests
from 8 threads (more rounds while the other workers boot) get as many distinct counts from several
workers; SIGTERM to the whole process group leaves the count in the file, and the next start goes on from
it. (The framework-free wsgi_app.py and asgi_app.py run the same way against Redis in test_redis.py.)"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, reap

from sharedstate.persistence.snapshot import read_snapshot

WEB = ROOT / "examples" / "web"
REQUESTS = 400
THREADS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], env_extra: dict[str, str] | None = None, cwd=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(env_extra or {})
    # its own session, so the test can signal the whole process group as a service manager would
    return subprocess.Popen(
        argv, env=env, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def get(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        return json.loads(response.read())


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listened on port {port} within {timeout} s")


def stop_group(proc: subprocess.Popen) -> int:
    """SIGTERM to the whole process group; wait for the leader; kill what is left."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reap(proc)
        proc.stderr.close()


def hammer(port: int) -> list[dict]:
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(lambda _: get(port), range(REQUESTS)))


def hammer_workers(port: int) -> list[dict]:
    """``hammer`` once, and again until two workers served some requests, within a deadline: the port
    answers once one worker is up, and the others may still be booting."""
    replies = hammer(port)
    deadline = time.monotonic() + 60
    while len({r["pid"] for r in replies}) < 2 and time.monotonic() < deadline:
        replies += hammer(port)
    return replies


def check_round(argv_for, path, env_extra=None) -> None:
    port = free_port()
    proc = start(argv_for(port), env_extra)
    try:
        wait_ready(proc, port)
        replies = hammer_workers(port)
        counts = [r["hits"] for r in replies]
        assert sorted(counts) == list(range(1, len(replies) + 1)), "lost or repeated counts"
        assert len({r["pid"] for r in replies}) >= 2, "served by a single worker"
    finally:
        stop_group(proc)
    assert read_snapshot(path).data["hits"] == len(replies)
    port = free_port()
    proc = start(argv_for(port), env_extra)
    try:
        wait_ready(proc, port)
        assert get(port)["hits"] == len(replies) + 1  # restored at start
    finally:
        stop_group(proc)
    assert read_snapshot(path).data["hits"] == len(replies) + 1


RUN = [sys.executable, "-m", "sharedstate", "run"]


@pytest.mark.timeout(300)
def test_flask_app_factory_under_gunicorn_workers_and_sharedstate_run(tmp_path):
    path = tmp_path / "hits.json"
    check_round(
        lambda port: [*RUN, "--path", str(path), "--", sys.executable, "-m", "gunicorn", "-w", "4",
                      "-b", f"127.0.0.1:{port}", "--chdir", str(WEB), "flask_app:create_app()"],
        path,
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_flask_app_factory_under_gunicorn_whose_master_owns_the_server(tmp_path):
    path = tmp_path / "hits.json"
    check_round(
        lambda port: [sys.executable, "-m", "gunicorn", "-c", str(WEB / "gunicorn.conf.py"), "-w", "4",
                      "-b", f"127.0.0.1:{port}", "--chdir", str(WEB), "flask_app:create_app()"],
        path,
        {"HITS_STATE_FILE": str(path)},
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_fastapi_app_with_lifespan_under_uvicorn_workers_and_sharedstate_run(tmp_path):
    path = tmp_path / "hits.json"
    check_round(
        lambda port: [*RUN, "--path", str(path), "--", sys.executable, "-m", "uvicorn", "--workers", "3",
                      "--host", "127.0.0.1", "--port", str(port), "--app-dir", str(WEB), "--no-access-log",
                      "fastapi_app:app"],
        path,
    )  # fmt: skip


def test_a_worker_that_cannot_reach_the_state_fails_to_boot_under_the_server_hooks():
    """gunicorn.conf.py's post_fork connects in each new worker: with the state out of reach (nothing
    listens at the Redis address) gunicorn stops at boot, though this app would connect only on its
    first request."""
    # One worker: when two fail to boot at once, gunicorn's master may stop with a traceback and status 1.
    argv = [sys.executable, "-m", "gunicorn", "-c", str(WEB / "gunicorn.conf.py"), "-w", "1",
            "-b", f"127.0.0.1:{free_port()}", "--chdir", str(WEB), "wsgi_app:app"]  # fmt: skip
    proc = start(argv, {"SHAREDSTATE_ADDRESS": "redis://127.0.0.1:1/0"})
    try:
        status = proc.wait(60)
        errors = proc.stderr.read().decode()
        assert status == 3, errors  # gunicorn's status when a worker failed to boot
        assert "no Redis server answers at redis://127.0.0.1:1/0" in errors
    finally:
        if proc.poll() is None:
            stop_group(proc)
        proc.stderr.close()


def test_a_stop_while_workers_connect_in_post_fork_ends_them_at_once():
    """A SIGTERM to the whole group while the workers are still in gunicorn.conf.py's post_fork (here:
    connecting to a Redis address whose listener never answers) ends them at once, and gunicorn with
    them, instead of being swallowed by the master's handlers that a booting worker still runs, which
    made the master wait out its 30 s graceful timeout."""
    import psutil

    accepted: list[socket.socket] = []  # held open, unanswered, until the test ends
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent.setblocking(False)
        address = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        argv = [sys.executable, "-m", "gunicorn", "-c", str(WEB / "gunicorn.conf.py"), "-w", "2",
                "-b", f"127.0.0.1:{free_port()}", "--chdir", str(WEB), "wsgi_app:app"]  # fmt: skip
        proc = start(argv, {"SHAREDSTATE_ADDRESS": address})
        try:
            master = psutil.Process(proc.pid)
            deadline = time.monotonic() + 30
            # Both workers are in post_fork: forked, and their connections to the listener are open.
            while len(master.children()) < 2 or len(accepted) < 2:
                assert time.monotonic() < deadline, "the workers never reached post_fork's connect"
                try:
                    accepted.append(silent.accept()[0])
                except BlockingIOError:
                    time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGTERM)
            # Well under gunicorn's graceful timeout (30 s) and the connect's own timeout (30 s).
            status = proc.wait(15)
            assert status == 0, proc.stderr.read().decode()[-3000:]
        finally:
            for conn in accepted:
                conn.close()
            if proc.poll() is None:
                stop_group(proc)
            else:
                reap(proc)
                proc.stderr.close()
