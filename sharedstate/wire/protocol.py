"""The protocol of a call to a sharedstate server, without any I/O: how a request is built, how an
answer is read, which calls may be sent again when their answer was lost, and the policy that sends
them again while the server's owner restarts a crashed server. The blocking client (``calls``) and the
asyncio client (``aio_calls``) only read and write what this module decides.

Reads change nothing, so they are simply sent again. Writes carry a request id (``answers``): the server
applies each once and answers a resent one as it did. Lock calls carry what their caller believes it
holds (and a release its request id), so the server applies them once too (``server/locktable``).
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Any

import psutil

from sharedstate._errors import ServerUnavailable, SharedStateError
from sharedstate._processes import process_alive
from sharedstate.wire.addresses import BOOT_SCOPE, CONNECT_TIMEOUT, STORE_ID, Address

#: Requests and answers are plain data (names, values, exceptions): the plain pickler does, without the
#: per-call set-up of multiprocessing's ForkingPickler (a copy of its dispatch table, a BytesIO).
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_NO_KWARGS: dict[str, Any] = {}
_pickle_dumps = pickle.dumps
_pickle_loads = pickle.loads
_monotonic = time.monotonic

#: Calls whose request may be sent again when its answer was lost (a crash of the server): they change
#: nothing. Writes are sent with a request id instead, and lock calls with what their caller believes it
#: holds.
RESENDABLE = frozenset("get contains names get_many snapshot length stats save lock_locked lock_owner".split())
#: A restarting server binds its socket again this soon after it removed the dead server's one; a socket
#: file missing for longer means the server stopped for good (a clean stop removes it).
RESTART_GRACE_S = 1.0
#: First and longest pause between attempts to reach a restarting server.
RETRY_FIRST_S = 0.005
RETRY_MAX_S = 0.1

_hello_cache: dict[int, dict[str, Any]] = {}


def hello() -> dict[str, Any]:
    """How this process introduces itself to a server: pid, start time and machine, so the server can
    tell when it is gone."""
    pid = os.getpid()
    known = _hello_cache.get(pid)
    if known is None:
        try:
            ctime: float | None = psutil.Process(pid).create_time()
        except psutil.Error:
            ctime = None
        known = _hello_cache[pid] = {"pid": pid, "scope": BOOT_SCOPE, "ctime": ctime}
    return known


def call_request(method: str, args: tuple[Any, ...]) -> bytes:
    """The request of a call on the store. Pickled before anything is sent: an argument that cannot be
    pickled fails here, and the connection (which keeps this process' locks alive) stays usable."""
    return _pickle_dumps((STORE_ID, method, args, _NO_KWARGS), _PROTOCOL)


def write_request(request_id: int | tuple[str, int], method: str, args: tuple[Any, ...]) -> bytes:
    """The request of a write: its request id in place of the store's id — a sequence number alone when
    the connection introduced its client id, else ``(client, sequence)`` (``answers``)."""
    return _pickle_dumps((request_id, method, args, _NO_KWARGS), _PROTOCOL)


def read_answer(answer: bytes | bytearray, method: str, address: str) -> Any:
    """The result an answer carries, or the exception it carries raised."""
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
    raise SharedStateError(f"the server at {address} failed in {method}(): {result}")


def connect_within(start: float, timeout: float) -> float:
    """How long a call that began at ``start`` may still take to connect."""
    return max(0.001, min(CONNECT_TIMEOUT, start + timeout - _monotonic()))


class Retry:
    """The retry policy of one call whose attempt failed: whether to try again on a new connection, and
    after which pause, until ``deadline``; else the error to raise. ``resendable``: whether the request
    may be sent again after it left (a read, a write with its id, a lock call)."""

    __slots__ = ("method", "address", "parsed", "timeout", "resendable", "deadline", "_pause", "_missing_since")

    def __init__(
        self, method: str, address: str, parsed: Address, timeout: float, resendable: bool, deadline: float
    ) -> None:
        self.method = method
        self.address = address
        self.parsed = parsed
        self.timeout = timeout
        self.resendable = resendable or method in RESENDABLE
        self.deadline = deadline
        self._pause = RETRY_FIRST_S
        self._missing_since: list[float] = []

    def after(self, exc: BaseException, sent: bool, restart: dict[str, Any] | None) -> float:
        """An attempt failed with ``exc`` (``sent``: perhaps after its request left) and its connection
        was dropped: the pause before the next attempt. Raises ``ServerUnavailable`` (or ``exc`` itself,
        if it is not a failure of the transport) when there is none to make. ``restart``: what the last
        server reached said of its restart."""
        if not isinstance(exc, (EOFError, OSError)) or (
            isinstance(exc, SharedStateError) and not isinstance(exc, ServerUnavailable)
        ):
            raise exc
        method, address = self.method, self.address
        if isinstance(exc, BlockingIOError):  # the socket's timeout: nothing came back in time
            raise ServerUnavailable(
                f"the sharedstate server at {address} did not answer {method}() within {self.timeout:g} s", address
            ) from None
        if (sent and not self.resendable) or not self._restart_expected(restart):
            if isinstance(exc, ServerUnavailable):
                raise exc
            went = f"the sharedstate server at {address} went away during {method}()"
            raise ServerUnavailable(went, address) from None
        pause = self._pause
        if _monotonic() + pause >= self.deadline:
            what = str(exc) if isinstance(exc, ServerUnavailable) else f"the server went away during {method}()"
            raise ServerUnavailable(
                f"no sharedstate server answered {method}() at {address} within {self.timeout:g} s ({what})", address
            ) from None
        self._pause = min(pause * 2, RETRY_MAX_S)
        return pause

    def connect_within(self) -> float:
        """How long the next attempt may take to connect."""
        return max(0.001, min(CONNECT_TIMEOUT, self.deadline - _monotonic()))

    def left(self) -> float:
        """How long the next attempt may wait for its answer: what is left of the call's time."""
        return max(0.001, self.deadline - _monotonic())

    def _restart_expected(self, restart: dict[str, Any] | None) -> bool:
        """Whether the server's owner will start it again (the last server said it would, the owner
        lives, and its socket file is there, or went away only a moment ago)."""
        if not restart:
            return False
        if restart.get("scope") == BOOT_SCOPE and not process_alive(restart.get("owner"), restart.get("ctime")):
            return False
        address = self.parsed
        missing_since = self._missing_since
        if isinstance(address, str) and not os.path.exists(address):
            now = _monotonic()
            if not missing_since:
                missing_since.append(now)
            elif now - missing_since[0] > RESTART_GRACE_S:
                return False
        else:
            missing_since.clear()
        return True
