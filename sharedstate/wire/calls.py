"""Calls to one sharedstate server from a blocking client: a request on this thread's connection, sent
again on a new one while the server's owner restarts a crashed server, within the call's deadline.

What is sent, what an answer means and when a call is sent again is ``protocol``'s to decide; this
module does the reading, writing, connecting and sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sharedstate.wire import answers as _answers
from sharedstate.wire.addresses import Address, format_address, parse_address
from sharedstate.wire.pool import ConnectionPool
from sharedstate.wire.protocol import Retry, call_request, connect_within, hello, read_answer, write_request

_monotonic = time.monotonic
_sequence = _answers.sequence


def _hello_client() -> dict[str, Any]:
    """``hello`` with the client id of the thread that opens the connection (the connection is used
    by that thread only): the server reads a write's request id as that client's."""
    return {**hello(), "client": _answers.client_id()}


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
        return self._send(method, call_request(method, args), start=start)

    def write(self, method: str, args: tuple[Any, ...], start: float | None = None) -> Any:
        """``call`` for a write: sent with a request id, so that it may be sent again after a crash
        and is still applied once."""
        # The sequence number alone: the connection introduced this thread's client id (``_hello_client``).
        return self._send(method, write_request(next(_sequence), method, args), True, start=start)

    def lock_call(self, method: str, args: tuple[Any, ...], again: Callable[[], tuple[Any, ...]] | None = None) -> Any:
        """``call`` for a lock call, sent again if the server crashes before it answers (and its owner
        starts it again): the server answers a call it applied already as it did then. ``again()`` gives
        the arguments of a later attempt (an acquire's remaining timeout); by default, the same ones."""
        request = call_request(method, args)
        if again is None:
            return self._send(method, request, True, request)
        return self._send(method, request, True, lambda: call_request(method, again()))

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
            within = None
        else:
            within = connect_within(start, self.timeout)
        try:
            conn = pool.get(within)
            answer = conn.request(request)
        except BaseException as exc:
            if again is None:
                deadline = start + self.timeout
            else:
                # A lock call (``again``: its request for a later attempt) may have waited long for its
                # lock before the failure: the new server gets the call's timeout from now.
                request, deadline = again, _monotonic() + self.timeout  # type: ignore[assignment]
            retry = Retry(method, self.address, self.parsed, self.timeout, resendable, deadline)
            answer = self._recover(retry, request, conn is not None, exc)
        return read_answer(answer, method, self.address)

    def _recover(self, retry: Retry, request: bytes | Callable[[], bytes], sent: bool, exc: BaseException) -> Any:
        """A call failed on its way (``sent``: perhaps after its request left). Drop the connection: a
        half-sent request or an unread answer leaves it unusable, and the cache goes with it (the next
        connection may reach a new server process). Then send the request again on a new connection as
        long as ``retry`` says so; return the answer."""
        pool = self.pool
        while True:
            pool.drop()
            self._dropped()
            time.sleep(retry.after(exc, sent, pool.restart))
            conn = None
            try:
                conn = pool.get(retry.connect_within())
                conn.set_timeout(retry.left())  # this attempt may wait only for what is left of the call's time
                answer = conn.request(request if type(request) is bytes else request())  # type: ignore[operator]
            except BaseException as again:
                exc, sent = again, conn is not None
                continue
            conn.set_timeout(self.timeout)
            return answer
