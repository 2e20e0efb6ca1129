"""Nobody in who should not be: keys from files nobody else could have planted, a server that no pile of
unauthenticated connections can lock up, and nothing said to a peer before it proves it knows the key.

The attacker is a real second OS user running a real squatting server; the floods are real sockets.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import connection as mpc
from pathlib import Path

import pytest
from conftest import reap, second_user_python, wait_until

import sharedstate
from sharedstate.wire.addresses import parse_address

#: What the squatter makes whoever loads its answer do: create this file.
MARKER = "pwned"


# The squatter: listens at a socket before the real server does, answers the challenge with the key it
# planted (or the empty key), and answers the first request with a pickle that creates MARKER when
# loaded. It takes any answer to its own challenge: all that protects the client is its own challenge.
SQUATTER = textwrap.dedent(
    """
    import os, pickle, sys
    from multiprocessing import connection as mpc
    address, marker, key_hex = sys.argv[1:4]
    key = bytes.fromhex(key_hex)

    class Plant:
        def __reduce__(self):
            return (open, (marker, "w"))

    reply = pickle.dumps(("#RETURN", Plant()))
    listener = mpc.Listener(address)
    os.chmod(address, 0o777)
    print("ready", flush=True)
    while True:
        conn = listener.accept()
        try:
            conn.send_bytes(b"#CHALLENGE#" + os.urandom(20))
            conn.recv_bytes(256)
            conn.send_bytes(b"#WELCOME#")
            mpc.answer_challenge(conn, key)
            conn.recv_bytes()
            conn.send_bytes(reply)
            conn.recv_bytes()
        except Exception:
            pass
        conn.close()
    """
)


def _start_squatter(user: str, address: Path, key: bytes) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [second_user_python(), "-I", "-c", SQUATTER, str(address), str(address.parent / MARKER), key.hex()],
        user=user,
        stdout=subprocess.PIPE,
        cwd="/",
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()  # it says nothing more
    if line.strip() != b"ready":
        reap(proc)
        raise AssertionError(f"the squatter did not start: {line!r}")
    return proc


def _plant_key(user: str, path: Path, key: bytes, mode: int) -> None:
    """Write a key file as ``user``, with ``mode``."""
    script = f"import os; fd = os.open({str(path)!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL, {mode}); " \
             f"os.write(fd, b{key.hex()!r}); os.fchmod(fd, {mode})"  # fmt: skip
    subprocess.run([second_user_python(), "-I", "-c", script], user=user, check=True, cwd="/")


@pytest.fixture
def squat(second_user: str, shared_folder: Path) -> Iterator[tuple[Path, bytes]]:
    """Another user's server at ``app.sock`` with a world-readable ``app.sock.key`` planted beside it."""
    address = shared_folder / "app.sock"
    key = os.urandom(32)
    _plant_key(second_user, Path(str(address) + ".key"), key, 0o644)
    proc = _start_squatter(second_user, address, key)
    try:
        yield address, key
    finally:
        proc.kill()
        reap(proc)


# -- point 7: a key is trusted only from a file nobody else could have written or read -----------------
def test_a_key_planted_by_another_user_beside_a_squatted_socket_is_refused(squat):
    address, _ = squat
    key_file = f"{address}.key"
    with pytest.raises(sharedstate.AccessDenied, match=key_file.replace(".", r"\.")):
        sharedstate.connect(str(address))
    assert not (address.parent / MARKER).exists(), "the squatter's pickle was loaded"


def test_a_root_key_file_beside_another_users_socket_is_refused(second_user, shared_folder):
    # The key file passes every check (root's, 0600) but the server behind the socket is another user's.
    address = shared_folder / "app.sock"
    key = os.urandom(32)
    proc = _start_squatter(second_user, address, key)
    try:
        key_file = Path(f"{address}.key")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, key.hex().encode())
        os.close(fd)
        with pytest.raises(sharedstate.AccessDenied, match=f"socket {address}"):
            sharedstate.connect(str(address))
        assert not (shared_folder / MARKER).exists(), "the squatter's pickle was loaded"
    finally:
        proc.kill()
        reap(proc)


def test_without_a_key_file_a_squatter_cannot_answer_the_challenge(second_user, shared_folder):
    # No key at all: the client must not fall back to a key a squatter can guess (the empty key).
    address = shared_folder / "app.sock"
    proc = _start_squatter(second_user, address, b"")
    try:
        with pytest.raises((sharedstate.AccessDenied, sharedstate.ServerUnavailable)):
            sharedstate.connect(str(address))
        assert not (shared_folder / MARKER).exists(), "the squatter's pickle was loaded"
    finally:
        proc.kill()
        reap(proc)


@pytest.fixture
def own_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[sharedstate.StateServer]:
    """This user's server with a key file; the environment does not carry its key."""
    server = sharedstate.StateServer(address=str(tmp_path / "own.sock")).start()
    monkeypatch.delenv("SHAREDSTATE_ADDRESS", raising=False)
    monkeypatch.delenv("SHAREDSTATE_AUTHKEY", raising=False)
    try:
        yield server
    finally:
        server.shutdown()


def test_a_key_file_others_can_read_is_refused_even_when_it_is_ours(own_server):
    key_file = f"{own_server.address}.key"
    os.chmod(key_file, 0o644)
    with pytest.raises(sharedstate.AccessDenied, match=key_file.replace(".", r"\.")) as info:
        sharedstate.connect(own_server.address)
    assert "0644" in str(info.value)
    os.chmod(key_file, 0o600)
    sharedstate.connect(own_server.address).get("x")


def test_a_symlinked_key_file_is_refused(own_server, tmp_path):
    key_file = Path(f"{own_server.address}.key")
    target = tmp_path / "elsewhere.key"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, key_file.read_bytes())
    os.close(fd)
    key_file.unlink()
    key_file.symlink_to(target)
    with pytest.raises(sharedstate.AccessDenied, match="symbolic link"):
        sharedstate.connect(own_server.address)


def test_a_key_file_that_is_not_a_regular_file_is_refused_without_blocking(own_server):
    key_file = Path(f"{own_server.address}.key")
    key_file.unlink()
    os.mkfifo(key_file, 0o600)  # opening a FIFO to read it would wait for a writer
    with pytest.raises(sharedstate.AccessDenied, match="not a regular file"):
        sharedstate.connect(own_server.address)


# -- point 9: nothing but the challenge before authentication ------------------------------------------
def _read_frames(sock: socket.socket, timeout: float = 10.0) -> list[bytes]:
    """Every frame the server sends until it closes the connection."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"the server neither answered nor closed within {timeout} s: {data!r}"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        data += chunk
    frames = []
    while data:
        (size,) = struct.unpack("!i", data[:4])
        frames.append(data[4 : 4 + size])
        data = data[4 + size :]
    return frames


def _raw(address: str | tuple[str, int]) -> socket.socket:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family)
    sock.settimeout(5)
    sock.connect(address)
    # Blocking with a receive timeout of its own, so a multiprocessing Connection on it blocks too.
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 10, 0))
    return sock


@pytest.fixture(params=["unix", "tcp"])
def any_server(request, tmp_path) -> Iterator[sharedstate.StateServer]:
    address = str(tmp_path / "s.sock") if request.param == "unix" else ("127.0.0.1", 0)
    server = sharedstate.StateServer(address=address).start()
    try:
        yield server
    finally:
        server.shutdown()


def _frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


@pytest.mark.parametrize(
    "hello",
    [
        pytest.param(b"wrong key", id="wrong-key"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        pytest.param(b"\x00\x00\x01\x01" + b"x" * 257, id="too-long"),
        pytest.param(b"\x00\x00\x00\x10abc", id="half-a-frame-then-gone"),
    ],
)
def test_a_peer_that_fails_the_challenge_gets_no_traceback(any_server, hello):
    sock = _raw(parse_address(any_server.address))
    try:
        conn = mpc.Connection(os.dup(sock.fileno()))
        try:
            if hello == b"wrong key":
                with pytest.raises(mpc.AuthenticationError):  # it has read the failure message
                    mpc.answer_challenge(conn, b"not the key")
            else:
                assert conn.recv_bytes(256).startswith(b"#CHALLENGE#")
                sock.sendall(hello)
                if hello.startswith(b"\x00\x00\x00\x10"):
                    sock.shutdown(socket.SHUT_WR)
        finally:
            conn.close()
        frames = _read_frames(sock)
    finally:
        sock.close()
    # At most the fixed failure message, then a closed connection: no traceback, no path.
    assert frames in ([], [b"#FAILURE#"]), frames
    assert any_server.state.get("alive", "yes") == "yes"


def test_a_peer_that_sends_a_pickle_instead_of_the_challenge_answer_gets_no_traceback(any_server):
    import pickle

    sock = _raw(parse_address(any_server.address))
    try:
        sock.sendall(_frame(pickle.dumps((None, "accept_connection", ({"pid": 1, "scope": "x"},), {}))))
        frames = _read_frames(sock)
    finally:
        sock.close()
    assert frames[0].startswith(b"#CHALLENGE#")
    assert frames[1:] in ([], [b"#FAILURE#"]), frames


# -- point 8: unauthenticated connections cannot lock the server up -------------------------------------
#: The server's descriptor limit in these tests: low, so that a flood reaches it cheaply.
SERVER_FD_LIMIT = 256


class CliServer:
    """``sharedstate serve`` under a low descriptor limit (soft and hard, so it cannot raise it)."""

    def __init__(self, tmp_path: Path, kind: str, save_every: str = "none", soft_limit: int = SERVER_FD_LIMIT) -> None:
        self.path = tmp_path / "state.json"
        address = "127.0.0.1:0" if kind == "tcp" else str(tmp_path / "cli.sock")

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft_limit, SERVER_FD_LIMIT))

        env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
        argv = [sys.executable, "-m", "sharedstate", "serve", "--path", str(self.path), "--address", address,
                "--save-every", save_every]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=limit, env=env)
        assert self.proc.stdout is not None
        exported: dict[str, str] = {}
        for line in self.proc.stdout:
            text = line.decode().strip()
            if text.startswith("export "):
                name, _, value = text[len("export ") :].partition("=")
                exported[name] = value
                if kind == "unix" or "SHAREDSTATE_AUTHKEY" in exported:
                    break
        assert "SHAREDSTATE_ADDRESS" in exported, "the server did not start"
        self.address = parse_address(exported["SHAREDSTATE_ADDRESS"])
        if kind == "tcp":
            self.key = bytes.fromhex(exported["SHAREDSTATE_AUTHKEY"])
        else:
            self.key = bytes.fromhex(Path(f"{self.address}.key").read_text())

    def connect(self) -> sharedstate.State:
        return sharedstate.connect(self.address, self.key)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        finally:
            reap(self.proc)
            assert self.proc.stdout is not None
            self.proc.stdout.close()


@pytest.fixture(params=["tcp", "unix"])
def cli_server(request, tmp_path) -> Iterator[CliServer]:
    server = CliServer(tmp_path, request.param)
    try:
        yield server
    finally:
        server.stop()


def _flood(address, count: int) -> list[socket.socket]:
    """``count`` connections that never say a word (a connect the server never takes is skipped)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    socks = []
    for _ in range(count):
        sock = socket.socket(family)
        sock.settimeout(2)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            continue
        socks.append(sock)
    return socks


@pytest.mark.timeout(180)
def test_a_thousand_idle_connections_lock_no_keyed_client_out(cli_server):
    flood = _flood(cli_server.address, 1100)
    try:
        assert len(flood) > 1000
        started = time.monotonic()
        state = cli_server.connect()  # ServerUnavailable if it cannot get through within 5 s
        state.set("x", 1)
        took = time.monotonic() - started
        assert state.get("x") == 1
        assert state.save() == cli_server.path
        stats = state.stats()
        assert stats["last_save_error"] is None
        print(f"keyed connect + set under a flood of {len(flood)}: {took * 1000:.1f} ms")
    finally:
        for sock in flood:
            sock.close()
    assert cli_server.stop() == 0
    assert '"x"' in cli_server.path.read_text()


#: A frame length of -1 announces a longer length in the next 8 bytes, which never come.
NEGATIVE_LENGTH = b"\xff\xff\xff\xff"


def _closed_after(address, hello: bytes | None) -> tuple[list[bytes], float]:
    """Connect; after the challenge send ``hello`` (``None``: say nothing at all); return the frames the
    server sends after the challenge until it closes the connection, and the seconds since the connect."""
    sock = _raw(address)
    try:
        started = time.monotonic()
        conn = mpc.Connection(os.dup(sock.fileno()))
        try:
            assert conn.recv_bytes(256).startswith(b"#CHALLENGE#")
        finally:
            conn.close()
        if hello is not None:
            sock.sendall(hello)
        frames = _read_frames(sock, timeout=20)
        return frames, time.monotonic() - started
    finally:
        sock.close()


def test_an_idle_or_stalled_unauthenticated_connection_is_closed_after_five_seconds_without_a_traceback(tmp_path):
    """Over TCP and a Unix socket at once (the waits overlap): a peer that says nothing after the
    challenge, and one that sends a negative frame length and then nothing, are closed after the
    handshake's five seconds, with at most the fixed failure message; the server serves on."""
    servers = []
    try:
        for kind in ("tcp", "unix"):
            (tmp_path / kind).mkdir()
            servers.append(CliServer(tmp_path / kind, kind))
        peers = [(server.address, hello) for server in servers for hello in (None, NEGATIVE_LENGTH)]
        with ThreadPoolExecutor(len(peers)) as pool:
            results = list(pool.map(lambda peer: _closed_after(*peer), peers))
        for (address, hello), (frames, took) in zip(peers, results, strict=True):
            if hello is None:
                assert frames == [], (address, frames)
            else:  # at most the fixed failure message: no traceback, no path
                assert frames in ([], [b"#FAILURE#"]), (address, frames)
            assert 4.0 <= took <= 8.0, f"{address} {hello!r}: closed after {took:.2f} s"
        for server in servers:
            assert server.connect().get("alive", "yes") == "yes"
    finally:
        for server in servers:
            server.stop()


def _authenticated_idle(address, key: bytes) -> socket.socket | None:
    """A connection that passes the challenge both ways and then says nothing; ``None`` when the
    server closes it or does not answer."""
    sock = _raw(address)
    conn = mpc.Connection(os.dup(sock.fileno()))
    try:
        mpc.answer_challenge(conn, key)
        mpc.deliver_challenge(conn, key)
    except (OSError, EOFError, mpc.AuthenticationError):
        sock.close()
        return None
    finally:
        conn.close()
    return sock


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_saves_and_stats_work_with_every_descriptor_taken(tmp_path, kind):
    server = CliServer(tmp_path, kind, save_every="1")
    held: list[socket.socket] = []
    try:
        state = server.connect()
        state.set("before", 1)
        # Fill the server with authenticated, idle connections until it closes new ones at once.
        for _ in range(SERVER_FD_LIMIT + 50):
            sock = _authenticated_idle(server.address, server.key)
            if sock is None:
                break
            held.append(sock)
        else:
            raise AssertionError("the server took more connections than it has descriptors")
        assert len(held) > SERVER_FD_LIMIT // 2
        state.set("at the limit", len(held))
        assert state.save() == server.path
        stats = state.stats()
        assert stats["last_save_error"] is None
        saved_at = stats["last_save_at"]
        # A scheduled save at the limit.
        wait_until(lambda: state.stats()["last_save_at"] != saved_at, timeout=10, what="a scheduled save")
        assert state.stats()["last_save_error"] is None
        state.set("last", True)
    finally:
        code = server.stop()  # the final save, still at the limit
        for sock in held:
            sock.close()
    assert code == 0
    text = server.path.read_text()
    assert '"at the limit"' in text and '"last"' in text


def test_the_server_raises_its_open_file_limit_to_the_hard_limit(tmp_path):
    server = CliServer(tmp_path, "unix", soft_limit=64)
    try:
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
        line = next(text for text in limits.splitlines() if text.startswith("Max open files"))
        assert line.split()[3:5] == [str(SERVER_FD_LIMIT), str(SERVER_FD_LIMIT)], line
    finally:
        assert server.stop() == 0
