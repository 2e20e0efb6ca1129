"""Calls to one sharedstate server: a request on this thread's connection, sent again on a new one while
the server's owner restarts a crashed server, within the call's deadline.

Reads change nothing, so they are simply sent again. Writes carry a request id (``answers``): the server
applies each once and answers a resent one as it did. Lock calls carry what their caller believes it
holds (and a release its request id), so the server applies them once too (``server/locktable`` explains
how).
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from typing import Any

import psutil

from sharedstate._errors import ServerUnavailable, SharedStateError
from sharedstate._processes import process_alive
from sharedstate.wire import answers as _answers
from sharedstate.wire.addresses import BOOT_SCOPE, CONNECT_TIMEOUT, STORE_ID, Address, format_address, parse_address
from sharedstate.wire.pool import ConnectionPool

#: Requests and answers are plain data (names, values, exceptions): the plain pickler does, without the
#: per-call set-up of multiprocessing's ForkingPickler (a copy of its dispatch table, a BytesIO).
_PROTOCOL = pickle.HIGHEST_PROTOCOL


_NO_KWARGS: dict[str, Any] = {}
_pickle_dumps = pickle.dumps
_pickle_loads = pickle.loads
_monotonic = time.monotonic
_sequence = _answers.sequence

_hello_cache: dict[int, dict[str, Any]] = {}

#: Calls whose request may be sent again when its answer was lost (a crash of the server): they change
#: nothing. Writes are sent with a request id instead (``write``), and lock calls with what their caller
#: believes it holds (``lock_call``).
_RESENDABLE = frozenset("get contains names get_many snapshot length stats save lock_locked lock_owner".split())
#: A restarting server binds its socket again this soon after it removed the dead server's one; a socket
#: file missing for longer means the server stopped for good (a clean stop removes it).
RESTART_GRACE_S = 1.0
#: First and longest pause between attempts to reach a restarting server.
RETRY_FIRST_S = 0.005
RETRY_MAX_S = 0.1


def _hello() -> dict[str, Any]:
    """How this process introduces itself to a server: pid, start time and machine, so the server can
    tell when it is gone."""
    pid = os.getpid()
    hello = _hello_cache.get(pid)
    if hello is None:
        try:
            ctime: float | None = psutil.Process(pid).create_time()
        except psutil.Error:
            ctime = None
        hello = _hello_cache[pid] = {"pid": pid, "scope": BOOT_SCOPE, "ctime": ctime}
    return hello


def _hello_client() -> dict[str, Any]:
    """``_hello`` with the client id of the thread that opens the connection (the connection is used
    by that thread only): the server reads a write's request id as that client's."""
    return {**_hello(), "client": _answers.client_id()}


class Calls:
    """The requests of one handle to one server (``address``, ``authkey``), each on the calling thread's
    connection. ``connected(info)`` runs when a connection opens (with what the server said of itself),
    ``dropped()`` when one is given up (the next may reach a new server process)."""

    def __init__(
        self,
        address: Address | str,
        authkey: bytes | None,
        *,
        timeout: float,
        restart: dict[str, Any] | None,
        connected: Callable[[dict[str, Any]], None] | None,
        dropped: Callable[[], None],
    ) -> None:
        self.parsed = parse_address(address)
        #: The deadline of one call (``connect(timeout=)``).
        self.timeout = timeout
        self._dropped = dropped
        self.pool = ConnectionPool(
            self.parsed, authkey, _hello_client, connected, call_timeout=timeout, restart=restart
        )

    @property
    def address(self) -> str:
        """The server's address, as ``SHAREDSTATE_ADDRESS`` holds it."""
        return format_address(self.parsed)

    def call(self, method: str, args: tuple[Any, ...], start: float | None = None) -> Any:
        # Pickled before anything is sent: an argument that cannot be pickled fails here, and the
        # connection (which keeps this process' locks alive) stays usable.
        return self._send(method, _pickle_dumps((STORE_ID, method, args, _NO_KWARGS), _PROTOCOL), start=start)

    def write(self, method: str, args: tuple[Any, ...], start: float | None = None) -> Any:
        """``call`` for a write: sent with a request id, so that it may be sent again after a crash
        and is still applied once."""
        # The sequence number alone: the connection introduced this thread's client id (``_hello_client``).
        request = _pickle_dumps((next(_sequence), method, args, _NO_KWARGS), _PROTOCOL)
        return self._send(method, request, True, start=start)

    def lock_call(self, method: str, args: tuple[Any, ...], again: Callable[[], tuple[Any, ...]] | None = None) -> Any:
        """``call`` for a lock call, sent again if the server crashes before it answers (and its owner
        starts it again): the server answers a call it applied already as it did then. ``again()`` gives
        the arguments of a later attempt (an acquire's remaining timeout); by default, the same ones."""
        request = _pickle_dumps((STORE_ID, method, args, _NO_KWARGS), _PROTOCOL)
        if again is None:
            return self._send(method, request, True, request)
        return self._send(
            method, request, True, lambda: _pickle_dumps((STORE_ID, method, again(), _NO_KWARGS), _PROTOCOL)
        )

    def _send(
        self,
        method: str,
        request: bytes,
        resendable: bool = False,
        again: bytes | Callable[[], bytes] | None = None,
        start: float | None = None,
    ) -> Any:
        """``start``: when the call began, if it already tried to connect (the client cache's look-up): a new
        attempt may take only what is left of the call's time."""
        pool = self.pool
        conn = None
        if start is None:
            start = _monotonic()
            connect_within = None
        else:
            connect_within = max(0.001, min(CONNECT_TIMEOUT, start + self.timeout - _monotonic()))
        try:
            conn = pool.get(connect_within)
            answer = conn.request(request)
        except BaseException as exc:
            if again is None:
                resendable = resendable or method in _RESENDABLE
                deadline = start + self.timeout
            else:
                # A lock call (``again``: its request for a later attempt) may have waited long for its
                # lock before the failure: the new server gets the call's timeout from now.
                request, deadline = again, _monotonic() + self.timeout  # type: ignore[assignment]
            answer = self._recover(method, request, resendable, conn is not None, exc, deadline)
        kind, result = _pickle_loads(answer)
        if kind == "#RETURN":
            return result
        if kind == "#ERROR":
            try:
                raise result
            finally:
                # The traceback holds this frame: without this, frame -> result -> traceback -> frame
                # would keep the exception and everything it refers to until a garbage collection.
                del result
        raise SharedStateError(f"the server at {self.address} failed in {method}(): {result}")

    def _recover(
        self,
        method: str,
        request: bytes | Callable[[], bytes],
        resendable: bool,
        sent: bool,
        exc: BaseException,
        deadline: float,
    ) -> Any:
        """A call failed on its way (``sent``: perhaps after its request left). Drop the connection: a
        half-sent request or an unread answer leaves it unusable, and the cache goes with it (the next
        connection may reach a new server process). Then, while the server's owner may be restarting
        it, send the request again on a new connection until a server answers, before ``deadline`` (the
        call's start plus its timeout); return that answer. Otherwise raise ``ServerUnavailable`` (or the
        error itself, if it is not one of the transport)."""
        pool = self.pool
        pause = RETRY_FIRST_S
        missing_since: list[float] = []
        while True:
            pool.drop()
            self._dropped()
            if not isinstance(exc, (EOFError, OSError)) or (
                isinstance(exc, SharedStateError) and not isinstance(exc, ServerUnavailable)
            ):
                raise exc
            if isinstance(exc, BlockingIOError):  # the socket's timeout: nothing came back in time
                raise ServerUnavailable(
                    f"the sharedstate server at {self.address} did not answer {method}() within {self.timeout:g} s",
                    self.address,
                ) from None
            if (sent and not resendable) or not self._restart_expected(missing_since):
                if isinstance(exc, ServerUnavailable):
                    raise exc
                raise ServerUnavailable(
                    f"the sharedstate server at {self.address} went away during {method}()", self.address
                ) from None
            if time.monotonic() + pause >= deadline:
                what = str(exc) if isinstance(exc, ServerUnavailable) else f"the server went away during {method}()"
                raise ServerUnavailable(
                    f"no sharedstate server answered {method}() at {self.address} within {self.timeout:g} s ({what})",
                    self.address,
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)
            conn = None
            try:
                conn = pool.get(max(0.001, min(CONNECT_TIMEOUT, deadline - time.monotonic())))
                # This attempt may wait only for what is left of the call's time.
                conn.set_timeout(max(0.001, deadline - time.monotonic()))
                answer = conn.request(request if type(request) is bytes else request())  # type: ignore[operator]
            except BaseException as again:
                exc, sent = again, conn is not None
                continue
            conn.set_timeout(self.timeout)
            return answer

    def _restart_expected(self, missing_since: list[float]) -> bool:
        """Whether the server's owner will start it again (the last server said it would, the owner
        lives, and its socket file is there, or went away only a moment ago)."""
        restart = self.pool.restart
        if not restart:
            return False
        if restart.get("scope") == BOOT_SCOPE and not process_alive(restart.get("owner"), restart.get("ctime")):
            return False
        address = self.parsed
        if isinstance(address, str) and not os.path.exists(address):
            now = time.monotonic()
            if not missing_since:
                missing_since.append(now)
            elif now - missing_since[0] > RESTART_GRACE_S:
                return False
        else:
            missing_since.clear()
        return True
