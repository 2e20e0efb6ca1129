"""The Redis backend (docs/redis.md): what it does beyond the contract suite (tests/contract/), which
runs every State call, value, lock and snapshot test on Redis and Valkey too.

Every test here runs against a private redis-server (see ``redis_server`` in conftest.py) that has
``KEYS`` and ``HKEYS`` disabled, in a namespace of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time

import pytest
import workers
from conftest import ROOT, cancel_a_lock_wait, clean_env, drop_namespace, kill, reap, run_to_completion, wait_until
from contract.storable import assert_holds, fill_every_type

import sharedstate
from sharedstate import aio
from sharedstate.backends.redis import DEFAULT_LEASE, RedisBackend


def connect(redis_server, namespace, **options) -> sharedstate.State:
    state = sharedstate.connect(redis_server.url, namespace=namespace, **options)
    assert isinstance(state.backend, RedisBackend)
    return state


# -- connecting ----------------------------------------------------------------------------------------
def test_a_redis_url_gives_a_state_and_the_same_calls(redis_server, redis_namespace):
    state = connect(redis_server, redis_namespace)
    assert isinstance(state, sharedstate.State)
    assert state.address == redis_server.url and state.backend.namespace == redis_namespace
    assert redis_namespace in repr(state.backend)
    state.set("a", 1)
    again = sharedstate.connect(f"{redis_server.url}?namespace={redis_namespace}")
    assert again.get("a") == 1


def test_shared_state_address_may_hold_a_redis_url(redis_server, redis_namespace, monkeypatch):
    monkeypatch.setenv("SHAREDSTATE_ADDRESS", f"{redis_server.tcp_url}?namespace={redis_namespace}")
    monkeypatch.delenv("SHAREDSTATE_AUTHKEY", raising=False)
    state = sharedstate.connect()
    assert isinstance(state.backend, RedisBackend) and state.backend.namespace == redis_namespace
    assert state.incr("hits") == 1
    assert connect(redis_server, redis_namespace).get("hits") == 1


def test_no_redis_server_is_server_unavailable_at_once(redis_server):
    from conftest import _free_port

    url = f"redis://127.0.0.1:{_free_port()}/0"
    start = time.monotonic()
    with pytest.raises(sharedstate.ServerUnavailable) as info:
        sharedstate.connect(url)
    assert time.monotonic() - start < 6
    assert info.value.address == url and url in str(info.value)


def test_wrong_credentials_are_access_denied_and_a_password_is_hidden(redis_server):
    with redis_server.client() as admin:
        admin.acl_setuser("sstest", enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"])
    try:
        port = redis_server.port
        with pytest.raises(sharedstate.AccessDenied) as info:
            sharedstate.connect(f"redis://sstest:wrong@127.0.0.1:{port}/0")
        assert "wrong" not in str(info.value) and "sstest:***@" in str(info.value)
        state = sharedstate.connect(f"redis://sstest:right@127.0.0.1:{port}/0", namespace="acl-test")
        assert state.address == f"redis://sstest:***@127.0.0.1:{port}/0"
        assert "right" not in repr(state) and "right" not in str(state.stats())
        assert pickle.loads(pickle.dumps(state)).incr("n") == 1  # the password travels with the handle
    finally:
        drop_namespace(redis_server, "acl-test")
        with redis_server.client() as admin:
            admin.acl_deluser("sstest")


def test_options_are_checked(redis_server, redis_namespace, server):
    with pytest.raises(ValueError, match="two namespaces"):
        sharedstate.connect(f"{redis_server.url}?namespace=a", namespace="b")
    with pytest.raises(ValueError, match="namespace must not be empty"):
        sharedstate.connect(redis_server.url, namespace="")
    with pytest.raises(TypeError, match="namespace must be a str"):
        sharedstate.connect(redis_server.url, namespace=5)
    for lease in (0, -1, float("nan"), 10_000):
        with pytest.raises(ValueError, match="lease"):
            sharedstate.connect(redis_server.url, lease=lease)
    with pytest.raises(ValueError, match="lease"):
        sharedstate.connect(f"{redis_server.url}?lease=soon")
    assert sharedstate.connect(f"{redis_server.url}?lease=0.5&namespace={redis_namespace}").backend.lease == 0.5
    with pytest.raises(ValueError, match="password in the URL"):
        sharedstate.connect(redis_server.url, b"key")
    with pytest.raises(TypeError, match="options of a Redis state"):
        sharedstate.connect(server.address, server.authkey, namespace="x")
    assert connect(redis_server, redis_namespace).backend.lease == DEFAULT_LEASE == 2.0


#: The backend's main paths, in a process where redis-py finds no hiredis (the ``redis`` extra installs it,
#: but redis-py alone parses replies in Python), on RESP2 and RESP3, blocking and asyncio.
_WITHOUT_HIREDIS = """
import asyncio, sys
sys.modules["hiredis"] = None
import redis.utils, sharedstate
from sharedstate import Change, aio
assert not redis.utils.HIREDIS_AVAILABLE
url, namespace = sys.argv[1], sys.argv[2]

async def face(address):
    astate = await aio.connect(address, namespace=namespace + "-aio")
    try:
        async with astate.watch() as changes:
            await astate.set("a", [1, "x"], scope="s")
            assert await astate.incr("n", 2, ttl=30) == 2
            got = [await changes.next(5), await changes.next(5)]
            assert got == [Change("a", "set", [1, "x"]), Change("n", "set", 2)], got
        await astate.clear()
    finally:
        await astate.aclose()

for query in ("", "?protocol=3"):
    with sharedstate.connect(url + query, namespace=namespace) as state:
        with state.watch() as changes:
            state.set("a", {"x": [1, 2]}, scope="s")
            assert state.incr("n", 5, ttl=30) == 5
            state.set("big", "y" * 70000)
            state.remove("a")
            got = [changes.next(5) for _ in range(4)]
        assert got == [Change("a", "set", {"x": [1, 2]}), Change("n", "set", 5), Change("big", "set", "y" * 70000),
                       Change("a", "removed")], got
        assert state.get("n") == 5 and 0 < state.ttl("n") <= 30 and sorted(state.names()) == ["big", "n"]
        with state.named_lock("l").hold(5):
            semaphore = state.semaphore("s", 2)
            with semaphore:
                assert semaphore.value() == 1
        state.clear()
    asyncio.run(face(url + query))
print("ok")
"""


def test_the_backend_works_where_redis_py_parses_replies_in_python(redis_server, redis_namespace):
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_HIREDIS, redis_server.url, redis_namespace],
        env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.stdout.strip() == "ok", result.stderr


def test_without_redis_py_the_error_names_the_extra(redis_server):
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import sharedstate\n"
        f"try:\n    sharedstate.connect({redis_server.url!r})\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert "pip install 'sharedstate[redis]'" in result.stdout, result.stderr
    cli = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['redis'] = None\nfrom sharedstate._cli import main; main()",
         "get", "x"],
        env=clean_env(SHAREDSTATE_ADDRESS=redis_server.url), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert "pip install 'sharedstate[redis]'" in cli.stderr


def test_namespaces_keep_states_apart(redis_server, redis_namespace):
    one = connect(redis_server, redis_namespace + "-one")
    two = connect(redis_server, redis_namespace + "-two")
    try:
        one.set("a", 1, scope="s")
        two.set("a", "other")
        assert one.get("a") == 1 and two.get("a") == "other"
        assert one.names(scope="s") == ["a"] and two.names(scope="s") == []
        with one.lock:
            assert not two.lock.locked()
            assert two.lock.acquire(blocking=False)
            two.lock.release()
        one.clear()
        assert len(one) == 0 and two.snapshot() == {"a": "other"}
    finally:
        drop_namespace(redis_server, redis_namespace + "-one")
        drop_namespace(redis_server, redis_namespace + "-two")


def test_names_walk_a_large_state_by_hscan(redis_state):
    """KEYS and HKEYS are disabled on the test server; 5,000 names take several HSCAN steps."""
    redis_state.update({f"n{i:05}": i for i in range(5000)})
    for i in range(0, 5000, 2):
        redis_state.set(f"n{i:05}", i, scope="even")
    names = redis_state.names()
    assert names == [f"n{i:05}" for i in range(5000)]
    assert redis_state.names("^n0001") == [f"n{i:05}" for i in range(10, 20)]
    assert redis_state.names(scope="even") == [f"n{i:05}" for i in range(0, 5000, 2)]
    assert list(redis_state) == names and len(redis_state) == 5000


def test_sigkill_of_a_lock_holder_frees_the_lock_within_the_lease(redis_state, mp_context):
    state = redis_state
    held = mp_context.Event()
    proc = mp_context.Process(target=workers.hold_lock_forever, args=(state, None, held))
    proc.start()
    try:
        assert held.wait(30)
        assert state.lock.owner() == proc.pid
        assert not state.lock.acquire(timeout=0.2)
        kill(proc.pid)
        killed = time.monotonic()
        assert state.lock.acquire(timeout=DEFAULT_LEASE + 5), "the dead holder's lock was never freed"
        took = time.monotonic() - killed
        try:
            assert state.lock.owner() == os.getpid()
        finally:
            state.lock.release()
        assert took <= DEFAULT_LEASE + 0.25, f"took {took:.2f} s, the lease is {DEFAULT_LEASE} s"
    finally:
        reap(proc)


def test_a_holder_never_loses_a_lock_it_renews(redis_server, redis_namespace, mp_context):
    lease = 0.3
    state = connect(redis_server, redis_namespace, lease=lease)
    result = mp_context.Value("i", -1)
    with state.named_lock("job"):
        deadline = time.monotonic() + 6 * lease
        while time.monotonic() < deadline:  # six leases long, another process never gets it
            proc = mp_context.Process(target=workers.try_lock, args=(state, result, "job"))
            run_to_completion([proc], 60)
            assert result.value == 0
    assert not state.named_lock("job").locked()


def test_a_lock_whose_lease_ran_out_is_not_released_silently(redis_server, redis_namespace, caplog):
    state = connect(redis_server, redis_namespace, lease=0.3)
    lock = state.named_lock("job")
    lock.acquire()
    with redis_server.client() as client:  # what a lease that ran out looks like
        client.delete(f"{redis_namespace}:lock:job")
    with caplog.at_level(logging.WARNING, logger="sharedstate"):
        wait_until(lambda: "lost lock 'job'" in caplog.text, 5, what="the renewal to notice")
    # This thread held it: a reentrant acquire and the release that matches the first are LockLost
    # (also a RuntimeError), never a silent second holder.
    with pytest.raises(sharedstate.LockLost, match="lease of 0.3 s ran out"):
        lock.acquire(blocking=False)
    with pytest.raises(sharedstate.LockLost):
        lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="does not hold it"):
        lock.release()


def test_locks_wake_a_waiting_process_at_once(redis_state):
    """A release wakes a waiter at once (no polling interval to wait out)."""
    lock = redis_state.named_lock("w")
    acquired = threading.Event()
    lock.acquire()

    def waiter():
        with redis_state.named_lock("w"):
            acquired.set()

    t = threading.Thread(target=waiter)
    t.start()
    try:
        time.sleep(0.3)
        released = time.monotonic()
        lock.release()
        assert acquired.wait(10)
        assert time.monotonic() - released < 0.2
    finally:
        t.join(10)


def test_two_hosts_share_a_counter_over_tcp(redis_server, redis_namespace, tmp_path):
    """Two unrelated programs, each with an environment of its own (its home, its folder, no variable
    but the address), count in one state over TCP."""
    code = (
        "import sharedstate, os\n"
        "state = sharedstate.connect()\n"
        "for _ in range(500):\n"
        "    state.incr('visits')\n"
        "for _ in range(100):\n"
        "    with state.lock:\n"
        "        state.set('ledger', state.get('ledger', 0) + 1)\n"
        "state.append('hosts', os.environ['HOST_NAME'])\n"
    )
    address = f"{redis_server.tcp_url}?namespace={redis_namespace}"
    procs = []
    for host in ("alpha", "beta"):
        home = tmp_path / host
        home.mkdir()
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(home),
               "TMPDIR": str(home), "HOST_NAME": host, "SHAREDSTATE_ADDRESS": address}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=home, stderr=subprocess.PIPE))
    try:
        for proc in procs:
            assert proc.wait(120) == 0, proc.stderr.read().decode()
    finally:
        reap(*procs)
        for proc in procs:
            proc.stderr.close()
    state = connect(redis_server, redis_namespace)
    assert state.get("visits") == 1000 and state.get("ledger") == 200
    assert sorted(state.get("hosts")) == ["alpha", "beta"]


# -- snapshots ---------------------------------------------------------------------------------------------
def test_a_snapshot_moves_from_the_local_server_to_redis_and_back(server, redis_state, tmp_path):
    local = server.state
    expected = fill_every_type(local)
    first = local.save(tmp_path / "local.json")
    assert redis_state.restore(first) == len(expected)
    assert_holds(redis_state, expected)

    second = redis_state.save(tmp_path / "redis.json")
    local.clear()
    assert local.restore(second) == len(expected)
    assert_holds(local, expected)
    header = json.loads(second.read_text())
    assert header["format"] == "sharedstate" and header["count"] == len(expected)
    assert oct(second.stat().st_mode & 0o777) == "0o600"


# -- processes, forks, asyncio, the command line, a web server ---------------------------------------------
def test_a_forked_child_uses_connections_of_its_own(redis_state):
    redis_state.set("n", 0)
    with redis_state.lock:
        pid = os.fork()
        if pid == 0:  # the child: new connections, and none of the parent's locks
            code = 1
            try:
                redis_state.incr("n")
                code = 0 if not redis_state.lock.acquire(blocking=False) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert redis_state.incr("n") == 2  # the parent's connection still works
    assert not redis_state.lock.locked()


def test_a_cancelled_asyncio_wait_gives_the_lock_back_even_after_close(redis_server, redis_namespace):
    """close() right after a cancelled wait: a request still in flight that takes the lock gives it back."""
    sync = connect(redis_server, redis_namespace)

    async def main():
        state = await aio.connect(redis_server.url, namespace=redis_namespace)
        await state.lock.acquire()
        await cancel_a_lock_wait(state.lock, 0.25)
        await state.lock.release()
        await state.close()

    for _ in range(20):
        asyncio.run(asyncio.wait_for(main(), 60))
        assert sync.lock.acquire(timeout=5), "a cancelled wait kept the lock"
        sync.lock.release()


def cli(*args: str, address: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sharedstate", *args], env=clean_env(SHAREDSTATE_ADDRESS=address),
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_client_commands_work_on_redis(redis_server, redis_namespace, tmp_path):
    address = f"{redis_server.url}?namespace={redis_namespace}"
    assert cli("set", "greeting", '"héllo"', "--scope", "web", address=address).returncode == 0
    assert json.loads(cli("get", "greeting", address=address).stdout) == "héllo"
    assert cli("incr", "hits", "5", address=address).stdout.strip() == "5"
    assert json.loads(cli("names", address=address).stdout) == ["greeting", "hits"]
    assert json.loads(cli("stats", address=address).stdout)["names"] == 2
    saved = cli("save", str(tmp_path / "s.json"), address=address)
    assert saved.stdout.strip() == str(tmp_path / "s.json")
    assert json.loads(cli("remove", "hits", address=address).stdout) == 5
    assert cli("restore", str(tmp_path / "s.json"), address=address).stdout.strip() == "2"
    no_path = cli("save", address=address)
    assert no_path.returncode == 1 and "needs a path" in no_path.stderr and "Traceback" not in no_path.stderr
    state = connect(redis_server, redis_namespace)
    assert state.get("hits") == 5 and state.names(scope="web") == ["greeting"]
    down = cli("get", "x", address="redis://127.0.0.1:1/0")
    assert down.returncode == 1 and "no Redis server answers" in down.stderr and "Traceback" not in down.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("server_kind", ["gunicorn", "gunicorn-with-server-hooks", "uvicorn-asyncio"])
def test_the_web_examples_run_on_redis_by_changing_only_the_address(redis_server, redis_namespace, server_kind):
    from test_web import WEB, free_port, get, hammer_workers, start, stop_group, wait_ready

    address = f"{redis_server.tcp_url}?namespace={redis_namespace}"
    config = ["-c", str(WEB / "gunicorn.conf.py")] if server_kind == "gunicorn-with-server-hooks" else []

    def argv(port):
        if server_kind == "uvicorn-asyncio":
            return [sys.executable, "-m", "uvicorn", "--workers", "3", "--host", "127.0.0.1", "--port", str(port),
                    "--app-dir", str(WEB), "--no-access-log", "asgi_app:app"]  # fmt: skip
        return [sys.executable, "-m", "gunicorn", *config, "-w", "4", "-b", f"127.0.0.1:{port}", "--chdir", str(WEB),
                "wsgi_app:app"]  # fmt: skip

    port = free_port()
    proc = start(argv(port), {"SHAREDSTATE_ADDRESS": address})
    try:
        wait_ready(proc, port)
        replies = hammer_workers(port)
        counts = sorted(r["hits"] for r in replies)
        assert counts == list(range(1, len(replies) + 1)), "lost or repeated counts"
        assert len({r["pid"] for r in replies}) >= 2, "served by a single worker"
    finally:
        stop_group(proc)
    state = connect(redis_server, redis_namespace)
    assert state.get("hits") == len(replies)
    port = free_port()
    proc = start(argv(port), {"SHAREDSTATE_ADDRESS": address})
    try:
        wait_ready(proc, port)
        assert get(port)["hits"] == len(replies) + 1  # the count lives in Redis, across restarts
    finally:
        stop_group(proc)
