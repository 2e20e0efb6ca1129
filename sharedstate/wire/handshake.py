"""The handshake: how a client reaches a server (addresses and keys are ``addresses``), authenticates
and introduces itself, with a deadline on every step.

The wire protocol is that of ``multiprocessing.managers``: an HMAC challenge in both directions, then an
``accept_connection`` request, then pickled ``(ident, method, args, kwargs)`` requests answered by
``('#RETURN', result)`` or ``('#ERROR', exception)``, each message framed as ``framing`` frames it. The
handshake goes through the stdlib's ``Connection``; the calls after it take the lean path of
``connection.Connection.request``.
"""

from __future__ import annotations

import os
import socket
import time
from multiprocessing import connection as mpc
from typing import Any

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
from sharedstate.wire.connection import Connection, set_recv_timeout


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


#: What a client meets when the server closed its connection before the challenge was over: the server's
#: admission pushed it out to make room (``server/admission``: a burst of clients, or idle peers, filled
#: the connections allowed in the challenge at once). Connecting again is safe (nothing was sent yet).
_PUSHED_OUT = (EOFError, ConnectionResetError, BrokenPipeError)


def _handshake(address: Address, authkey: bytes | None, timeout: float) -> Connection:
    """Connect and authenticate both ways within ``timeout`` seconds, connecting again while the server
    closes the connection in the challenge (see ``_PUSHED_OUT``)."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            return _handshake_once(address, authkey, max(0.001, deadline - time.monotonic()))
        except _PUSHED_OUT as exc:
            if time.monotonic() + pause > deadline:
                _raise_unavailable(exc, format_address(address), timeout)
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _handshake_once(address: Address, authkey: bytes | None, timeout: float) -> Connection:
    """Connect and authenticate both ways, each step within ``timeout`` seconds."""
    text = format_address(address)
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = _connect_socket(address, family, text, timeout)
    try:
        # A blocking socket with a receive timeout: the handshake cannot hang on a server that accepted
        # the connection but does not answer (stopped, overloaded, or not a sharedstate server).
        set_recv_timeout(sock, timeout)
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
        if not isinstance(exc, _PUSHED_OUT):  # those are ``_handshake``'s to retry
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
        conn.set_timeout(call_timeout)  # None: calls may block as long as they need (a lock wait)
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
