"""Nothing lost, nothing stuck: owner death, signals, server crashes and restarts."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, TESTS, exited, kill, reap, wait_until

import sharedstate
from sharedstate.persistence.snapshot import read_snapshot


def start_owner(path, durability="snapshot") -> tuple[subprocess.Popen, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    owner = subprocess.Popen(
        [sys.executable, str(TESTS / "owner_script.py"), str(path), durability],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    line = owner.stdout.readline()
    assert line, "the owner did not start its server"
    return owner, json.loads(line)


@pytest.mark.parametrize("durability", ["snapshot", "journal"])
def test_sigkill_of_the_owner_makes_the_server_save_and_exit(tmp_path, durability):
    path = tmp_path / "state.json"
    owner, info = start_owner(path, durability)
    try:
        state = sharedstate.connect(info["address"], bytes.fromhex(info["authkey"]))
        state.set("from another process", 42)
        kill(owner.pid)
        took = wait_until(lambda: exited(info["server_pid"]), 10, what="the orphaned server to exit")
        assert took < 10
    finally:
        kill(owner.pid)
        reap(owner)
        owner.stdout.close()
        kill(info["server_pid"])
    snapshot = read_snapshot(path)
    assert snapshot is not None
    assert snapshot.data == {"last": "set by the owner", "from another process": 42}
    assert not os.path.exists(info["address"])  # the socket was removed on the way out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_server_saves_the_last_change_and_it_stays_stopped(tmp_path, sig):
    path = tmp_path / "state.json"
    server = sharedstate.StateServer(path=path, save_every=None).start()
    try:
        pid = server.pid
        for i in range(50):
            server.state.set("last", i)
        os.kill(pid, sig)
        wait_until(lambda: exited(pid), 10, what="the server to stop")
        assert read_snapshot(path).data == {"last": 49}
        with pytest.raises(sharedstate.ServerUnavailable):
            server.state.get("last")
        time.sleep(0.5)  # give a wrong restart its chance to happen
        assert server.pid == pid, "a server that stopped cleanly was started again"
    finally:
        server.shutdown()


def test_a_crashed_server_is_restarted_and_old_handles_reconnect(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, durability="journal", save_every=None) as server:
        state = server.state
        child_view = sharedstate.connect(server.address, server.authkey)
        for i in range(100):
            state.set(f"k{i}", i)
            state.incr("n")
        old_pid = server.pid
        kill(old_pid)
        start = time.monotonic()
        # The call on the dead connection waits for the restarted server: callers do not see the crash.
        assert state.snapshot() == {**{f"k{i}": i for i in range(100)}, "n": 100}
        assert time.monotonic() - start < 15
        assert server.pid != old_pid
        assert child_view.get("k99") == 99
        assert os.environ["SHAREDSTATE_ADDRESS"] == server.address  # same address, same key
        assert sharedstate.connect().get("n") == 100


def test_restart_false_leaves_a_crashed_server_down(tmp_path):
    with sharedstate.StateServer(restart=False) as server:
        pid = server.pid
        kill(pid)
        wait_until(lambda: exited(pid), 5, what="the server to die")
        time.sleep(0.5)
        assert server.pid == pid
        with pytest.raises(sharedstate.ServerUnavailable):
            sharedstate.connect(server.address, server.authkey)


def test_default_socket_key_and_files_are_private(tmp_path):
    path = tmp_path / "state.json"
    with sharedstate.StateServer(path=path, durability="journal") as server:
        server.state.set("a", 1)
        server.save()
        server.save()  # the second one keeps the first as .bak
        folder = os.path.dirname(server.address)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(server.address).st_mode) & 0o077 == 0
        assert stat.S_IMODE(os.stat(server.address + ".key").st_mode) == 0o600
        assert len(server.authkey) >= 32
        for name in ("state.json", "state.json.bak", "state.json.journal"):
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name


def test_a_non_loopback_tcp_address_is_refused_without_allow_remote():
    with pytest.raises(ValueError, match="allow_remote"):
        sharedstate.StateServer(address=("0.0.0.0", 0))
    with pytest.raises(ValueError, match="allow_remote"):
        sharedstate.StateServer(address="0.0.0.0:0")
    with pytest.raises(ValueError, match="authkey"):
        sharedstate.StateServer(address=("0.0.0.0", 0), allow_remote=True)


def test_allow_remote_with_a_key_serves_on_all_interfaces():
    key = os.urandom(32)
    with sharedstate.StateServer(address=("0.0.0.0", 0), allow_remote=True, authkey=key) as server:
        port = int(server.address.rsplit(":", 1)[1])
        assert sharedstate.connect(("127.0.0.1", port), key).incr("n") == 1
        with pytest.raises(sharedstate.AccessDenied):
            sharedstate.connect(("127.0.0.1", port), os.urandom(32))


def test_a_call_in_flight_when_the_server_dies_raises_server_unavailable(tmp_path):
    with sharedstate.StateServer(restart=False) as server:
        state = server.state
        state.lock.acquire()
        errors = []

        def wait_for_lock() -> None:
            other = sharedstate.connect(server.address, server.authkey)
            try:
                other.lock.acquire()
            except sharedstate.ServerUnavailable as exc:
                errors.append(exc)

        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        wait_until(lambda: state.stats()["lock_waiters"] == 1, 5, what="the waiter")
        kill(server.pid)
        waiter.join(10)
        assert not waiter.is_alive()
        assert len(errors) == 1 and server.address in str(errors[0])
