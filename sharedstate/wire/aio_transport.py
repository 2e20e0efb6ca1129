"""The asyncio client's connection: many requests in flight at once on one socket (pipelining).

A server serves one connection in one thread, request after request, so it answers a connection's
requests in the order they came: each request here queues a future, and each answer (a framed message,
``framing``'s frames) resolves the oldest one. Empty messages are the keepalives a server sends while a
call waits for a lock: they resolve nothing, but count as progress. A connection on which requests wait
and nothing arrives for the call timeout fails them all with ``BlockingIOError`` (as a blocking client's
socket timeout does); a connection that breaks fails them with ``EOFError`` or its ``OSError``.

Requests made in one turn of the loop while others are in flight go out in one write. A lone request
(``spin``) may read its own answer for a moment, before the event loop would.

The handshake is the blocking client's own (``handshake.open_connection``), run on a worker thread once
per connection; the socket it leaves is then handed to the event loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from sharedstate._errors import ServerUnavailable
from sharedstate.wire.addresses import Address, format_address
from sharedstate.wire.framing import HEADER, LONG_HEADER, READ_SIZE, frame
from sharedstate.wire.handshake import open_connection

_unpack_header = HEADER.unpack_from
_write = os.write
_read = os.read
_clock = time.perf_counter
#: How long a lone call reads its answer itself before it waits for the event loop (``Pipeline.spin``).
SPIN_S = 50e-6
#: Calls that do not spin after one whose answer came ``SLOW_S`` or more after its spin gave up.
SPIN_SKIP = 32
SLOW_S = 500e-6


class Pipeline(asyncio.Protocol):
    """One connection to a server, with requests in flight (``request``) answered in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        self._loop = loop
        self._timeout = timeout
        self._pending: deque[asyncio.Future[bytes]] = deque()
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._fd = -1
        self._spin_skip = 0
        #: Requests made in this turn of the loop while others were in flight, sent together at its end.
        self._batch: list[bytes] | None = None
        self._spun_until = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: When the oldest request began to wait, or the last bytes came in since.
        self._since = 0.0
        #: What to run once the answer of a request whose caller gave up has come (``when_answered``).
        self._late: dict[asyncio.Future[bytes], Callable[[], None]] = {}
        #: Why the connection is unusable (an exception to raise, made anew for each request), or None.
        self.broken: tuple[type[BaseException], str] | None = None

    # -- requests -----------------------------------------------------------------------------------
    def request(self, payload: bytes) -> asyncio.Future[bytes]:
        """Send ``payload`` (framed) and return the future of its answer's payload. Raises at once, having
        sent nothing, when the connection is broken."""
        if self.broken is not None:
            kind, text = self.broken
            raise kind(text)
        future = self._loop.create_future()
        pending = self._pending
        if not pending and self._timeout is not None:
            self._since = self._loop.time()
            if self._timer is None:
                self._timer = self._loop.call_at(self._since + self._timeout, self._check)
        pending.append(future)
        batch = self._batch
        if batch is not None:  # more requests in this turn of the loop: they go out together
            batch.append(frame(payload))
        elif len(pending) == 1:  # a lone request: out at once
            self._send(frame(payload))
        else:
            self._batch = [frame(payload)]
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch and self.broken is None:
            self._send(b"".join(batch))

    def _send(self, data: bytes) -> None:
        transport = self._transport
        if self._fd >= 0 and not transport.get_write_buffer_size():  # type: ignore[union-attr]
            # Nothing queued before it: written here, without the transport's own bookkeeping (the
            # hot path of every call); whatever the socket does not take now, the transport sends.
            try:
                written = _write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                written = 0
            except OSError:
                written = 0  # the transport meets the same error and reports it (``connection_lost``)
            if written == len(data):
                return
            data = data[written:]
        transport.write(data)  # type: ignore[union-attr]

    def spin(self, future: asyncio.Future[bytes]) -> None:
        """Read the answer of ``future``, the one request in flight, for at most ``SPIN_S`` seconds before
        the event loop would: an answer that comes that soon (a usual call) then costs no turn of the
        loop, which costs more than the call itself. After an answer that came more than ``SLOW_S`` after
        the spin gave up, the next ``SPIN_SKIP`` calls do not spin (slow calls are not polled for nothing)."""
        if self._spin_skip:
            self._spin_skip -= 1
            return
        fd = self._fd
        end = _clock() + SPIN_S
        while fd >= 0:
            try:
                data = _read(fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                now = _clock()
                if now < end:
                    continue
                self._spun_until = now  # the answer will tell how long it took (``_answer``)
                return
            except OSError:
                return  # the transport meets the same error and reports it
            if not data:
                return  # the end of the stream: the transport reads it too, and reports it
            self.data_received(data)
            if future.done():
                return

    def when_answered(self, future: asyncio.Future[bytes], callback: Callable[[], None]) -> None:
        """Run ``callback`` once the answer of ``future``'s request has come, though its caller gave up on
        it (``future`` cancelled); never if the connection breaks first (the answer never comes)."""
        if not future.done():
            if self.broken is None:
                self._late[future] = callback
        elif future.cancelled():
            if self.broken is None:
                if future in self._pending:
                    self._late[future] = callback
                else:
                    callback()  # its answer came between the cancellation and now
        elif future.exception() is None:
            callback()  # it had come already

    @property
    def idle(self) -> bool:
        """Whether no request waits for its answer."""
        return not self._pending

    @property
    def usable(self) -> bool:
        """Whether it may take a request now: not broken, and of the running event loop (a loop closed
        without closing its connections leaves them to the next one, which must not use them)."""
        return self.broken is None and self._loop is asyncio.get_running_loop()

    def close(self) -> None:
        self._fail(EOFError, "the connection was closed")
        transport = self._transport
        if transport is None:
            return
        if self._loop.is_closed():
            # Its loop was closed without closing it (no ``shutdown_asyncgens()``): ``transport.close()``
            # would raise, and leave the socket open (it closes it in a turn of that loop, which never comes).
            self._transport = None  # closed once: a second close finds nothing left to close
            transport._call_connection_lost(None)  # type: ignore[attr-defined]
        else:
            transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._fd = transport.get_extra_info("socket").fileno()

    def data_received(self, data: bytes) -> None:
        if self._timeout is not None:
            self._since = self._loop.time()
        buffer = self._buffer
        if not buffer:
            size = len(data) - 4
            if size > 0 and _unpack_header(data)[0] == size:  # the usual case: exactly one whole answer
                self._answer(data[4:])
                return
        buffer += data
        start = 0
        end = len(buffer)
        while end - start >= 4:
            (size,) = _unpack_header(buffer, start)
            head = 4
            if size == -1:
                if end - start < 12:
                    break
                (size,) = LONG_HEADER.unpack_from(buffer, start + 4)
                head = 12
            elif size < 0:
                self._fail(OSError, f"invalid message length {size}")
                self._transport.abort()  # type: ignore[union-attr]
                return
            if end - start - head < size:
                break
            if size:  # not a keepalive
                self._answer(bytes(buffer[start + head : start + head + size]))
            start += head + size
        del buffer[:start]

    def _answer(self, payload: bytes) -> None:
        try:
            future = self._pending.popleft()
        except IndexError:  # an answer nobody asked for: the stream cannot be trusted any more
            self._fail(OSError, "the server sent an answer to no request")
            self._transport.abort()  # type: ignore[union-attr]
            return
        if not future.done():  # a cancelled caller's answer is read and dropped
            future.set_result(payload)
        if self._late:
            late = self._late.pop(future, None)
            if late is not None:
                late()
        if self._spun_until:
            if _clock() - self._spun_until > SLOW_S:
                self._spin_skip = SPIN_SKIP
            self._spun_until = 0.0

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._fail(EOFError, "the server closed the connection")
        else:
            self._fail(type(exc) if isinstance(exc, OSError) else OSError, str(exc))

    # -- failures -----------------------------------------------------------------------------------
    def _check(self) -> None:
        """The watchdog: fail the requests once nothing has come for the call timeout."""
        self._timer = None
        if not self._pending or self.broken is not None:
            return
        assert self._timeout is not None
        due = self._since + self._timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self._fail(BlockingIOError, f"no answer within {self._timeout:g} s")
        self._transport.abort()  # type: ignore[union-attr]

    def _fail(self, kind: type[BaseException], text: str) -> None:
        if self.broken is None:
            self.broken = (kind, text)
        self._fd = -1  # the transport closes it: never write to a number another file may get
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, deque()
        self._late.clear()  # their answers never come
        for future in pending:
            if not future.done():
                future.set_exception(kind(text))


async def open_pipeline(
    executor: Executor,
    address: Address,
    authkey: bytes | None,
    hello: dict[str, Any],
    timeout: float,
    call_timeout: float,
) -> tuple[Pipeline, dict[str, Any]]:
    """Connect, authenticate and introduce this client as ``handshake.open_connection`` does (on a thread
    of ``executor``, within ``timeout`` seconds); return the connection on this loop and what the server
    said of itself. ``ServerUnavailable`` if it is not done in time (even when no thread of ``executor``
    took it up); a connection made after all the same, or after the caller was cancelled, is closed."""
    loop = asyncio.get_running_loop()
    opening = loop.run_in_executor(executor, open_connection, address, authkey, hello, timeout, call_timeout)
    try:
        # Shielded, so that the future keeps the connection of a handshake that ends after all.
        conn, info = await asyncio.wait_for(asyncio.shield(opening), timeout)
    except BaseException as exc:
        opening.add_done_callback(_close_opened)
        if isinstance(exc, asyncio.TimeoutError):
            text = format_address(address)
            failed = f"no connection to the sharedstate server at {text} within {timeout:g} s"
            raise ServerUnavailable(failed, text) from None
        raise
    sock = socket.socket(fileno=conn.detach())
    try:
        if sock.family == socket.AF_UNIX:
            _, pipeline = await loop.create_unix_connection(lambda: Pipeline(loop, call_timeout), sock=sock)
        else:
            _, pipeline = await loop.create_connection(lambda: Pipeline(loop, call_timeout), sock=sock)
    except BaseException:
        sock.close()
        raise
    return pipeline, info


def _close_opened(opening: asyncio.Future[Any]) -> None:
    """Close the connection of a handshake whose caller gave up on it."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result()[0].close()
