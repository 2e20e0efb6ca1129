"""Connections: how a client reaches a server (addresses and keys are ``_addresses``), with deadlines on
every step.

The wire protocol is that of ``multiprocessing.managers``: an HMAC challenge in both directions, then an
``accept_connection`` request, then pickled ``(ident, method, args, kwargs)`` requests answered by
``('#RETURN', result)`` or ``('#ERROR', exception)``, each message framed as ``multiprocessing.connection``
frames it (a 4-byte big-endian length, then the pickle). Calls read and write those frames with one
system call each way where the stdlib's ``Connection`` makes two reads per message (``Connection``,
``MessageReader`` and ``write_message`` below); the handshake still goes through the stdlib.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing import connection as mpc
from typing import Any

from sharedstate import _fork
from sharedstate._errors import AccessDenied, ServerUnavailable, SharedStateError
from sharedstate.wire.addresses import (
    CONNECT_TIMEOUT,
    ENV_AUTHKEY,
    KEEPALIVES_PER_TIMEOUT,
    STORE_ID,
    Address,
    format_address,
    key_file_for,
)

# -- framing -----------------------------------------------------------------------------------------
#: multiprocessing's frame header: a signed big-endian length; -1 announces an 8-byte length after it
#: (messages of 2 GiB or more).
_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")
_LONG = 0x7FFFFFFF
#: Bytes asked for by one read: a request or an answer of up to this size costs one system call.
READ_SIZE = 65536
#: Payloads up to this size are copied behind their header and written in one call (as the stdlib does).
_JOIN_MAX = 16384


def write_message(fd: int, payload: bytes) -> None:
    """Write one framed message, whole (a write may take less than it was given)."""
    n = len(payload)
    if n <= _JOIN_MAX:
        write_raw(fd, _HEADER.pack(n) + payload)
        return
    write_raw(fd, _HEADER.pack(n) if n <= _LONG else _HEADER.pack(-1) + _LONG_HEADER.pack(n))
    write_raw(fd, payload)


def frame(payload: bytes) -> bytes:
    """A framed message, header and payload."""
    n = len(payload)
    return (_HEADER.pack(n) if n <= _LONG else _HEADER.pack(-1) + _LONG_HEADER.pack(n)) + payload


def write_raw(fd: int, data: bytes) -> None:
    """Write bytes that are already framed, whole (a write may take less than it was given)."""
    written = os.write(fd, data)
    if written != len(data):
        with memoryview(data) as view:
            while written < len(data):
                written += os.write(fd, view[written:])


class MessageReader:
    """Reads framed messages from a file descriptor, as few system calls as it takes: usually one read
    of up to ``READ_SIZE`` bytes per message. Bytes read past the end of a message (a peer that sends
    two messages at once) are kept for the next ``read``. End of file raises ``EOFError``."""

    __slots__ = ("fd", "_buffer")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def read(self) -> bytes | bytearray:
        """The payload of the next message."""
        if not self._buffer:
            data = os.read(self.fd, READ_SIZE)
            if len(data) >= 4 and _HEADER.unpack_from(data)[0] == len(data) - 4:
                return data[4:]  # the usual case: exactly one whole message
            if not data:
                raise EOFError("end of file")
            self._buffer = data
        return self._read_slowly()

    def _read_slowly(self) -> bytes | bytearray:
        buffer = bytearray(self._buffer)
        self._buffer = b""
        self._fill(buffer, 4)
        (size,) = _HEADER.unpack_from(buffer)
        start = 4
        if size == -1:
            self._fill(buffer, 12)
            (size,) = _LONG_HEADER.unpack_from(buffer, 4)
            start = 12
        elif size < 0:
            raise OSError(f"invalid message length {size}")
        end = start + size
        if len(buffer) >= end:
            self._buffer = bytes(buffer[end:])
            return bytes(buffer[start:end])
        # The rest of a large message: read straight into its place, never past its end.
        payload = bytearray(size)
        have = len(buffer) - start
        payload[:have] = buffer[start:]
        with memoryview(payload) as view:
            while have < size:
                got = os.readv(self.fd, [view[have:]])
                if not got:
                    raise EOFError("end of file inside a message")
                have += got
        return payload

    def _fill(self, buffer: bytearray, size: int) -> None:
        while len(buffer) < size:
            data = os.read(self.fd, READ_SIZE)
            if not data:
                raise EOFError("end of file inside a message")
            buffer += data


class Connection(mpc.Connection):
    """A ``multiprocessing`` connection with a lean request/answer path (``request``); every stdlib method
    still works for the handshake."""

    def __init__(self, handle: int) -> None:
        super().__init__(handle)
        self._reader = MessageReader(handle)

    def request(self, payload: bytes) -> bytes | bytearray:
        """Send one framed request and return the payload of its answer. Empty messages are the
        keepalives of a server while the call waits for a lock: skipped (each one restarts the receive
        timeout). Raises ``BlockingIOError`` when nothing came within the connection's timeout."""
        reader = self._reader
        write_message(reader.fd, payload)
        answer = reader.read()
        while not answer:
            answer = reader.read()
        return answer

    def set_timeout(self, seconds: float) -> None:
        """Give up a read or a write that makes no progress for ``seconds`` (``BlockingIOError``)."""
        sock = socket.socket(fileno=os.dup(self.fileno()))
        try:
            _set_timeouts(sock, seconds)
        finally:
            sock.close()

    def close(self) -> None:
        self._reader.fd = -1  # never reach a descriptor number that another file reuses
        super().close()


_TIMEVAL = "@ll"


def _set_recv_timeout(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack(_TIMEVAL, whole, int((seconds - whole) * 1e6)))


def _set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Receive and send timeouts of a blocking socket (so a read or write of a stopped peer ends)."""
    whole = int(seconds)
    micros = int((seconds - whole) * 1e6)
    if not whole and not micros:
        micros = 1  # a zero timeval would mean no timeout at all
    value = struct.pack(_TIMEVAL, whole, micros)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def _connect_socket(address: Address, family: int, text: str, timeout: float) -> socket.socket:
    """A connected blocking socket. A Unix socket whose accept queue is full refuses at once (EAGAIN)
    rather than waiting: that is retried with a short backoff until ``timeout``."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        sock = socket.socket(family)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(address)
            sock.settimeout(None)
            if family == socket.AF_INET:
                # The handshake ends with two writes in a row (the last challenge answer, then the first
                # request): with Nagle's algorithm the second waits for a delayed ACK, 40 ms per connect.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() + pause > deadline:
                raise ServerUnavailable(
                    f"the server at {text} accepted no connection within {timeout:g} s", text
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ServerUnavailable(f"no sharedstate server at {text} ({exc.strerror})", text) from None
        except OSError as exc:
            sock.close()
            raise ServerUnavailable(f"cannot connect to the sharedstate server at {text}: {exc}", text) from None


def _handshake(address: Address, authkey: bytes | None, timeout: float) -> Connection:
    """Connect and authenticate both ways, each step within ``timeout`` seconds."""
    text = format_address(address)
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = _connect_socket(address, family, text, timeout)
    try:
        # A blocking socket with a receive timeout: the handshake cannot hang on a server that accepted
        # the connection but does not answer (stopped, overloaded, or not a sharedstate server).
        _set_recv_timeout(sock, timeout)
        conn = Connection(sock.detach())
    finally:
        sock.close()
    try:
        # Without a key, one nobody knows: an empty key would let any peer pass both challenges.
        key = authkey if authkey is not None else os.urandom(32)
        try:
            # Both ways before anything else is read: the first pickle this client loads (the answer to
            # accept_connection) comes from a peer that has proved it knows the key.
            mpc.answer_challenge(conn, key)
            mpc.deliver_challenge(conn, key)
        except mpc.AuthenticationError:
            if authkey is None:
                where = key_file_for(address)
                raise AccessDenied(
                    f"no key for the server at {text}: pass authkey, set {ENV_AUTHKEY}"
                    + (f", or make {where} readable" if where else ""),
                    text,
                ) from None
            raise AccessDenied(f"the server at {text} refused the authentication key", text) from None
        return conn
    except BaseException as exc:
        conn.close()
        _raise_unavailable(exc, text, timeout)
        raise


def _raise_unavailable(exc: BaseException, text: str, timeout: float) -> None:
    """Turn a transport failure during the handshake into ``ServerUnavailable``; let others through."""
    if isinstance(exc, SharedStateError):
        return
    if isinstance(exc, (BlockingIOError, TimeoutError)):
        raise ServerUnavailable(f"the server at {text} did not answer within {timeout:g} s", text) from None
    if isinstance(exc, (EOFError, OSError, AssertionError)):
        raise ServerUnavailable(f"the server at {text} closed the connection during the handshake", text) from None


def _request(conn: Connection, text: str, funcname: str, args: tuple[Any, ...]) -> Any:
    conn.send((None, funcname, args, {}))
    kind, result = conn.recv()
    if kind != "#RETURN":
        raise ServerUnavailable(f"the server at {text} is not a sharedstate server", text)
    return result


def open_connection(
    address: Address,
    authkey: bytes | None,
    hello: dict[str, Any],
    timeout: float = CONNECT_TIMEOUT,
    call_timeout: float | None = None,
) -> tuple[Connection, dict[str, Any]]:
    """Connect, authenticate and introduce this client, every step within ``timeout`` seconds; then
    every read and write of a call may wait ``call_timeout`` seconds (``None``: as long as it takes).

    Returns the connection and what the server said about itself. Raises ``ServerUnavailable`` when
    nothing answers (or it stops answering) and ``AccessDenied`` when the key is refused.
    """
    if call_timeout is not None:
        # The server keeps a caller that waits for a lock informed, well within its timeout.
        hello = {**hello, "keepalive": call_timeout / KEEPALIVES_PER_TIMEOUT}
    text = format_address(address)
    conn = _handshake(address, authkey, timeout)
    try:
        info = _request(conn, text, "accept_connection", (hello,))
        if not isinstance(info, dict) or info.get("service") != STORE_ID:
            raise ServerUnavailable(f"the server at {text} is not a sharedstate server", text)
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            if call_timeout is None:
                _set_recv_timeout(sock, 0)  # calls may block as long as they need (a lock wait)
            else:
                _set_timeouts(sock, call_timeout)
        finally:
            sock.close()
        return conn, info
    except BaseException as exc:
        conn.close()
        _raise_unavailable(exc, text, timeout)
        raise


def open_control(address: Address, authkey: bytes, funcname: str, timeout: float = CONNECT_TIMEOUT) -> Any:
    """Send one of the manager server's own requests (``shutdown``) on a connection of its own."""
    text = format_address(address)
    conn = _handshake(address, authkey, timeout)
    try:
        return _request(conn, text, funcname, ())
    except BaseException as exc:
        _raise_unavailable(exc, text, timeout)
        raise
    finally:
        conn.close()


class ConnectionPool:
    """One connection per thread for one client handle; dropped in a forked child and after any failure.

    A connection is never shared between threads (the protocol is one request, one answer) nor inherited
    across ``fork``: the child opens its own.
    """

    def __init__(
        self,
        address: Address,
        authkey: bytes | None,
        hello: Callable[[], dict[str, Any]],
        on_connect: Callable[[dict[str, Any]], None] | None = None,
        call_timeout: float | None = None,
        restart: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        self.authkey = authkey
        self.hello = hello
        #: Called with what the server says about itself each time a connection opens.
        self.on_connect = on_connect
        #: How long a call's read or write may make no progress (``None``: no limit).
        self.call_timeout = call_timeout
        #: What the last server reached said about its restart (its owner restarts it if it crashes):
        #: ``{"owner", "ctime", "scope"}``, or ``None`` when no restart is to be expected.
        self.restart = restart
        self._local = threading.local()
        self._generation = _fork.generation

    def get(self, timeout: float | None = None) -> Connection:
        """This thread's connection, opened (within ``timeout`` seconds; by default ``CONNECT_TIMEOUT``,
        or the call timeout when that is shorter) if it has none."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None and self._generation == _fork.generation:
            return conn
        if self._generation != _fork.generation:
            self._local = local = threading.local()
            self._generation = _fork.generation
        if timeout is None:
            timeout = CONNECT_TIMEOUT if self.call_timeout is None else min(CONNECT_TIMEOUT, self.call_timeout)
        conn, info = open_connection(self.address, self.authkey, self.hello(), timeout, self.call_timeout)
        self.restart = info.get("restart")
        local.conn = conn
        if self.on_connect is not None:
            self.on_connect(info)
        return conn

    def drop(self) -> None:
        """Close this thread's connection (after a failure, or when the handle is closed)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and self._generation == _fork.generation:
            try:
                conn.close()
            except OSError:
                pass
