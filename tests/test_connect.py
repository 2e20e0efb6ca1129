"""connect(): from the environment, with an address and key, with the key file; and its failures."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, exited, kill, wait_until

import sharedstate


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in an unrelated Python process (not a child of multiprocessing)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    full_env["PYTHONPATH"] = str(ROOT)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout)


def test_start_exports_the_address_and_key(server):
    assert os.environ["SHAREDSTATE_ADDRESS"] == server.address
    assert bytes.fromhex(os.environ["SHAREDSTATE_AUTHKEY"]) == server.authkey
    assert len(server.authkey) >= 32
    state = sharedstate.connect()
    state.set("a", 1)
    assert server.state.get("a") == 1


def test_shutdown_removes_the_exported_variables():
    server = sharedstate.StateServer().start()
    server.shutdown()
    assert "SHAREDSTATE_ADDRESS" not in os.environ and "SHAREDSTATE_AUTHKEY" not in os.environ


def test_an_unrelated_process_connects_with_address_and_key(server):
    server.state.set("greeting", "hello")
    code = (
        "import sharedstate, sys; "
        f"s = sharedstate.connect({server.address!r}, bytes.fromhex({server.authkey.hex()!r})); "
        "s.incr('visits'); print(s.get('greeting'))"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello"
    assert server.state.get("visits") == 1


def test_the_key_file_is_private_and_enough_with_the_address_alone(server):
    key_file = server.address + ".key"
    mode = stat.S_IMODE(os.stat(key_file).st_mode)
    assert mode == 0o600
    assert bytes.fromhex(Path(key_file).read_text()) == server.authkey
    folder_mode = stat.S_IMODE(os.stat(os.path.dirname(server.address)).st_mode)
    assert folder_mode == 0o700
    result = run_python(
        "import sharedstate; print(sharedstate.connect().incr('n'))", env={"SHAREDSTATE_ADDRESS": server.address}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    assert sharedstate.connect(server.address).get("n") == 1


def test_the_key_file_is_removed_at_shutdown(tmp_path):
    address = str(tmp_path / "x.sock")
    with sharedstate.StateServer(address=address) as server:
        assert server.address == address
        assert os.path.exists(address + ".key")
    assert not os.path.exists(address + ".key")
    assert not os.path.exists(address)


def test_a_given_key_writes_no_key_file(tmp_path, monkeypatch):
    address = str(tmp_path / "x.sock")
    with sharedstate.StateServer(address=address, authkey=b"k" * 32):
        assert not os.path.exists(address + ".key")
        monkeypatch.delenv("SHAREDSTATE_AUTHKEY")
        with pytest.raises(sharedstate.AccessDenied, match="no key"):
            sharedstate.connect(address, None)
        assert sharedstate.connect(address, b"k" * 32).get("x") is None


def test_tcp_on_loopback(tmp_path):
    with sharedstate.StateServer(address=("127.0.0.1", 0)) as server:
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        state = sharedstate.connect(server.address, server.authkey)
        state.set("a", 1)
        assert sharedstate.connect(("127.0.0.1", int(port)), server.authkey).get("a") == 1


def test_a_non_loopback_address_needs_allow_remote_and_a_key():
    with pytest.raises(ValueError, match="allow_remote"):
        sharedstate.StateServer(address=("0.0.0.0", 0))
    with pytest.raises(ValueError, match="needs an explicit key"):
        sharedstate.StateServer(address=("0.0.0.0", 0), allow_remote=True)


def test_a_wrong_key_is_access_denied(server):
    start = time.monotonic()
    with pytest.raises(sharedstate.AccessDenied) as info:
        sharedstate.connect(server.address, b"wrong" * 8)
    assert time.monotonic() - start < 5
    assert isinstance(info.value, PermissionError)
    assert info.value.address == server.address and server.address in str(info.value)


def test_no_server_is_server_unavailable_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("SHAREDSTATE_ADDRESS", raising=False)
    with pytest.raises(sharedstate.ServerUnavailable, match="SHAREDSTATE_ADDRESS"):
        sharedstate.connect()
    start = time.monotonic()
    with pytest.raises(sharedstate.ServerUnavailable) as info:
        sharedstate.connect(str(tmp_path / "nothing.sock"), b"k")
    assert isinstance(info.value, ConnectionError)
    with pytest.raises(sharedstate.ServerUnavailable):
        sharedstate.connect(("127.0.0.1", _free_port()), b"k")
    assert time.monotonic() - start < 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_server_is_server_unavailable(tmp_path):
    """SIGKILL leaves the socket file behind; connecting fails at once, never hangs."""
    address = str(tmp_path / "dead.sock")
    server = sharedstate.StateServer(address=address, restart=False).start()
    try:
        state = server.state
        state.set("a", 1)
        kill(server.pid)
        wait_until(lambda: exited(server.pid), 10, what="the server to die")
        with pytest.raises(sharedstate.ServerUnavailable, match=address):
            state.set("a", 2)  # a call on the dead connection (a read of "a" may be answered by the cache)
        start = time.monotonic()
        with pytest.raises(sharedstate.ServerUnavailable):
            sharedstate.connect(address, server.authkey)
        with pytest.raises(sharedstate.ServerUnavailable):
            state.get("a")
        assert time.monotonic() - start < 1
    finally:
        server.shutdown()


def test_a_server_that_does_not_answer_is_unavailable_within_five_seconds(server):
    os.kill(server.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(sharedstate.ServerUnavailable, match="did not answer within 5 s"):
            sharedstate.connect(server.address, server.authkey)
        assert time.monotonic() - start < 6
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert sharedstate.connect(server.address, server.authkey).get("x") is None


def test_something_else_listening_is_not_taken_for_a_server(tmp_path):
    address = str(tmp_path / "other.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen()
    try:
        # A short connect timeout: what matters is that the listener is not taken for a server, not how
        # long the default wait is (test_a_server_that_does_not_answer_is_unavailable_within_five_seconds).
        start = time.monotonic()
        with pytest.raises(sharedstate.ServerUnavailable):
            sharedstate.connect(address, b"k", timeout=1.0)
        assert time.monotonic() - start < 2
    finally:
        listener.close()


def test_bad_arguments_to_connect():
    with pytest.raises(TypeError):
        sharedstate.connect(5, b"k")
    with pytest.raises(TypeError, match="bytes"):
        sharedstate.connect("/tmp/x.sock", "key")
    with pytest.raises(ValueError):
        sharedstate.connect("host:notaport", b"k")
