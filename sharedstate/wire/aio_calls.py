"""Calls to one sharedstate server from the asyncio client: every task's requests share one pipelined
connection (``aio_transport``), and are sent again on a new one while the server's owner restarts a
crashed server, within the call's deadline. What is sent, what an answer means and when a call is sent
again is ``protocol``'s to decide, as for the blocking client (``calls``).

Writes from many tasks are in flight at once: each carries a request id under a lane of its own
(``answers.take_lane``), so that all of them can be sent again after a crash and still be applied once.

A call that may wait (a lock or semaphore acquire, a watch's ``watch_next``) is sent on a connection of
its own (``wait``): the server waits in that connection's thread, and ends the wait when the connection
has something to read. A task cancelled while it waits sends such a request (a ``lock_locked``), which
ends the wait at once; what it got all the same goes to ``late``. Calls that may take long
(``LONG_CALLS``: files, the whole state) go on a connection of their own too: the shared connection's
watchdog fails every call on it once nothing came for the call timeout.

A handle's connections belong to the event loop they were opened in, and are closed when that loop
ends (``asyncio.run`` closes the asynchronous generators of its loop): the next loop opens its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from sharedstate import _fork
from sharedstate._errors import SharedStateError, handle_closed
from sharedstate.wire import answers as _answers
from sharedstate.wire.addresses import CONNECT_TIMEOUT, format_address
from sharedstate.wire.aio_transport import Pipeline, open_pipeline
from sharedstate.wire.calls import Calls
from sharedstate.wire.protocol import Retry, call_request, connect_within, hello, read_answer, write_request

_monotonic = time.monotonic
_yield = asyncio.sleep
_sequence = _answers.sequence
_take_lane = _answers.take_lane
_give_lane = _answers.give_lane
#: Idle connections kept for lock waits (more are closed when their wait ends).
MAX_IDLE_WAITS = 8
#: What ends a server-side lock wait that nobody waits for any more (any request would; this one is cheap).
_NUDGE = call_request("lock_locked", (None,))
#: Calls that may take long (a file to write or read, the whole state): each goes on a connection of its
#: own, so that its time counts against its own deadline only, not against the other tasks' calls.
LONG_CALLS = frozenset(("save", "restore", "snapshot"))


class AsyncCalls:
    """The requests of one asyncio handle to one server. ``connected(info)`` runs when the shared
    connection opens, ``dropped()`` when it is given up (as for ``calls.Calls``). ``executor`` runs the
    handshakes."""

    def __init__(
        self,
        calls: Calls,
        *,
        connected: Callable[[dict[str, Any]], None] | None,
        dropped: Callable[[], None],
        executor: Executor,
    ) -> None:
        # The server, key and call timeout of a blocking client's ``calls``.
        self.parsed, self.authkey, self.timeout = calls.parsed, calls.pool.authkey, calls.timeout
        #: What the last server reached said about its restart (``pool.ConnectionPool.restart``).
        self.restart = calls.pool.restart
        self._connected, self._dropped, self._executor = connected, dropped, executor
        self._conn: Pipeline | None = None
        self._opening: asyncio.Task[Pipeline] | None = None
        self._generation = _fork.generation
        #: Idle connections of their own for lock waits and long calls.
        self._idle_waits: list[Pipeline] = []
        #: Calls of this handle under way (a lone one may read its answer itself: ``_send``).
        self._active = 0
        #: Tasks that finish what a cancelled call left in flight (kept so they are not collected).
        self._finishing: set[asyncio.Task[None]] = set()
        #: The loop of the connections, and what closes them when it ends (``_until_the_loop_ends``).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_end: Any = None
        self._closed = False

    @property
    def address(self) -> str:
        return format_address(self.parsed)

    # -- connections --------------------------------------------------------------------------------
    async def _open(self, within: float | None = None) -> tuple[Pipeline, dict[str, Any]]:
        if self._closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new loop: the last one ended and closed its connections, or none was used yet, or it was
            # closed without closing them (no ``shutdown_asyncgens()``): they are closed here.
            stale, self._idle_waits, self._finishing = self._idle_waits, [], set()
            for conn in stale:
                conn.close()
            self._drop(self._conn)
            self._loop, self._loop_end = loop, self._until_the_loop_ends(loop)
            await self._loop_end.asend(None)
        if within is None:
            within = min(CONNECT_TIMEOUT, self.timeout)
        pipeline, info = await open_pipeline(self._executor, self.parsed, self.authkey, hello(), within, self.timeout)
        if self._closed:  # closed while the handshake ran
            pipeline.close()
            raise self._closed_error()
        self.restart = info.get("restart")
        return pipeline, info

    async def _until_the_loop_ends(self, loop: asyncio.AbstractEventLoop) -> Any:
        """Closes the connections of ``loop`` when it ends: an asynchronous generator is closed by the end
        of its loop (``asyncio.run``, ``loop.shutdown_asyncgens()``), while the loop can still close them."""
        try:
            yield
        finally:
            if self._loop is loop and self._generation == _fork.generation:
                self._close_connections()

    def _closed_error(self) -> SharedStateError:
        return handle_closed(self.address)

    def _forget(self) -> None:
        """In a forked child: forget the parent's connections (they are its parent's to close)."""
        self._conn, self._opening, self._idle_waits, self._finishing = None, None, [], set()
        self._loop = self._loop_end = None
        self._generation = _fork.generation

    async def connection(self, within: float | None = None) -> Pipeline:
        """The shared connection, opened (within ``within`` seconds) if there is none: tasks that need
        it at once wait for the same opening."""
        conn = self._conn
        loop = asyncio.get_running_loop()
        if self._generation != _fork.generation:
            self._forget()  # a forked child: the parent's connections and their opening are not its own
        elif conn is not None and conn.usable:
            return conn
        opening = self._opening
        if opening is None or opening.get_loop() is not loop:  # none, or one of a loop closed meanwhile
            opening = self._opening = asyncio.ensure_future(self._open_shared(within))
            opening.add_done_callback(_retrieve)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            if opening.cancelled() and self._closed:  # by ``close()``, not this task's cancellation
                raise self._closed_error() from None
            raise

    async def _open_shared(self, within: float | None) -> Pipeline:
        try:
            conn, info = await self._open(within)
            self._conn = conn
            if self._connected is not None:
                self._connected(info)
            return conn
        finally:
            if self._opening is asyncio.current_task():
                self._opening = None

    def _drop(self, conn: Pipeline | None) -> None:
        """Give up ``conn`` after a failure: a half-sent request or an unread answer leaves it unusable,
        and the cache goes with it (the next connection may reach a new server process)."""
        if conn is None:
            return
        conn.close()
        if self._conn is conn:
            self._conn = None
            self._dropped()

    async def aclose(self) -> None:
        """``close``, once what cancelled calls left in flight has ended: a nudged lock wait answers at
        once, and a lock handed to it is given back then (closing its connection would not free the lock
        while this process has other connections)."""
        finishing = [task for task in self._finishing if task.get_loop() is asyncio.get_running_loop()]
        if finishing and self._generation == _fork.generation:
            await asyncio.wait(finishing, timeout=self.timeout)
        self.close()
        loop_end, self._loop_end = self._loop_end, None
        if loop_end is not None and self._loop is asyncio.get_running_loop():
            await loop_end.aclose()  # nothing is left for the end of the loop to close

    def close(self) -> None:
        """Close every connection, the opening of one and what cancelled calls left in flight, for good:
        a call made after raises ``SharedStateError``."""
        self._closed = True
        if self._generation != _fork.generation:
            self._forget()
        self._close_connections()

    def _close_connections(self) -> None:
        opening, finishing = self._opening, self._finishing
        self._opening, self._finishing = None, set()
        if opening is not None:
            opening.cancel()  # a connection its handshake makes all the same is closed (``open_pipeline``)
        for task in finishing:
            task.cancel()  # it closes its connection
        self._drop(self._conn)
        idle, self._idle_waits = self._idle_waits, []
        for conn in idle:
            conn.close()

    # -- calls --------------------------------------------------------------------------------------
    async def call(self, method: str, args: tuple[Any, ...], start: float | None = None) -> Any:
        request = call_request(method, args)
        if method in LONG_CALLS:
            return read_answer(await self._alone(method, request), method, self.address)
        return read_answer(await self._send(method, request, start=start), method, self.address)

    async def write(self, method: str, args: tuple[Any, ...], start: float | None = None) -> Any:
        """``call`` for a write: sent with a request id of its own lane, so that it may be sent again
        after a crash and is still applied once."""
        lane = _take_lane()
        request = write_request((lane, next(_sequence)), method, args)
        if method in LONG_CALLS:
            answer = await self._alone(method, request)
        else:
            answer = await self._send(method, request, True, start=start, lane=lane)
        # Only now, with its answer: another write under the lane would make the server forget this one's
        # answer (and apply it again if sent again). A write cancelled in flight gives it back once its
        # answer came all the same (``_send``); one whose answer never comes keeps it for good.
        _give_lane(lane)
        return read_answer(answer, method, self.address)

    async def lock_call(self, method: str, args: tuple[Any, ...]) -> Any:
        """``call`` for a lock call that never waits (``calls.Calls.lock_call``)."""
        request = call_request(method, args)
        return read_answer(await self._send(method, request, True, request), method, self.address)

    async def _send(
        self,
        method: str,
        request: bytes,
        resendable: bool = False,
        again: bytes | None = None,
        start: float | None = None,
        lane: str | None = None,
    ) -> bytes:
        """The answer to ``request`` on the shared connection (sent again as ``protocol.Retry`` says).
        ``lane``: the request's write lane, given back if the calling task is cancelled before it is sent,
        or once its answer has come."""
        conn = self._conn
        sent = False
        self._active += 1
        try:
            if conn is None or not conn.usable or self._generation != _fork.generation:
                conn = None
                conn = await self.connection(None if start is None else connect_within(start, self.timeout))
            if self._active == 1:
                # A lone call lets the other tasks run first (a cancellation here sends nothing), then
                # reads its answer itself for a moment: calls one after the other neither starve the loop
                # nor pay a turn of it per round trip. Calls of many tasks at once are pipelined instead.
                await _yield(0)
            if self._active == 1 and conn.idle and conn.broken is None:
                future = conn.request(request)
                sent = True
                conn.spin(future)
            else:
                future = conn.request(request)
                sent = True
            return await future
        except asyncio.CancelledError:
            if lane is not None:
                if sent:
                    # Still in the pipeline: its answer comes in order, unless the connection breaks.
                    conn.when_answered(future, lambda: _give_lane(lane))
                else:
                    _give_lane(lane)
            raise
        except Exception as exc:
            if again is None:
                deadline = (_monotonic() if start is None else start) + self.timeout
            else:
                request, deadline = again, _monotonic() + self.timeout
            retry = Retry(method, self.address, self.parsed, self.timeout, resendable, deadline)
            return await self._recover(conn, retry, request, sent, exc)
        finally:
            self._active -= 1

    async def _recover(self, conn: Pipeline | None, retry: Retry, request: bytes, sent: bool, exc: Exception) -> bytes:
        """Send ``request`` again on a new shared connection as long as ``retry`` says so."""
        while True:
            self._drop(conn)
            await asyncio.sleep(retry.after(exc, sent, self.restart))
            conn, sent = None, False
            try:
                conn = await self.connection(retry.connect_within())
                future = conn.request(request)
                sent = True
                try:
                    # This attempt may wait only for what is left of the call's time.
                    return await asyncio.wait_for(future, retry.left())
                except asyncio.TimeoutError:
                    # Only this call is late: the connection stays, with the other tasks' calls on it
                    # (its watchdog fails them all if nothing comes at all).
                    conn = None
                    raise BlockingIOError("no answer in time") from None
            except Exception as again:
                exc = again

    # -- connections of their own: lock waits and long calls -----------------------------------------
    async def wait(
        self,
        method: str,
        args: tuple[Any, ...],
        again: Callable[[], tuple[Any, ...]],
        late: Callable[[Any], None],
    ) -> Any:
        """A call that may wait long in the server (``lock_acquire``, ``sem_acquire``, a watch's
        ``watch_next``), on a connection of its own; sent again (with ``again()``'s arguments) after a
        crash of the server. If the calling task is cancelled, the wait is ended and ``late`` runs once:
        ``late(result)`` with the answer it got all the same, ``late(None)`` when it has none."""
        answer = await self._alone(method, call_request(method, args), lambda: call_request(method, again()), late)
        return read_answer(answer, method, self.address)

    async def _alone(
        self,
        method: str,
        request: bytes,
        again: Callable[[], bytes] | None = None,
        late: Callable[[Any], None] | None = None,
    ) -> bytes:
        """The answer to ``request`` on a connection of its own (an idle one, or a new one), sent again
        (``again()``, else the same) after a crash of the server. A wait (``late`` given) whose task is
        cancelled is ended, and ``late`` gets its answer all the same (``_abandon``), or ``None``."""
        if self._generation != _fork.generation:
            self._forget()
        stale = self._loop is not asyncio.get_running_loop()  # ``_open`` closes what another loop left
        conn = self._idle_waits.pop() if self._idle_waits and not stale else None
        retry = None
        while True:
            sent = False
            try:
                if conn is None or conn.broken is not None:
                    conn = None
                    conn, _ = await self._open(None if retry is None else retry.connect_within())
                future = conn.request(request)
                sent = True
                try:
                    answer = await asyncio.shield(future)
                except asyncio.CancelledError:
                    self._abandon(conn, future, late, method)  # never raises: nothing below takes this for a failure
                    raise
                break
            except asyncio.CancelledError:
                if late is not None and not sent:
                    late(None)  # cancelled before its request went out: no answer will come
                raise
            except Exception as exc:
                if conn is not None:
                    conn.close()
                    conn = None
                if retry is None:  # it may have waited long before the failure: the call's timeout from now
                    retry = Retry(method, self.address, self.parsed, self.timeout, True, _monotonic() + self.timeout)
                try:
                    await asyncio.sleep(retry.after(exc, sent, self.restart))
                except asyncio.CancelledError:
                    if late is not None:
                        late(None)  # cancelled between two attempts: the failed one's answer will never come
                    raise
                if again is not None:
                    request = again()
        self._keep_idle(conn)
        return answer

    def _keep_idle(self, conn: Pipeline) -> None:
        if conn.broken is None and conn.idle and len(self._idle_waits) < MAX_IDLE_WAITS and not self._closed:
            self._idle_waits.append(conn)
        else:
            conn.close()

    def _abandon(
        self, conn: Pipeline, future: asyncio.Future[bytes], late: Callable[[Any], None] | None, method: str
    ) -> None:
        """End the server's wait of a cancelled wait (``late`` given), and hand its answer (``None``
        without one) to ``late`` in a task; keep the connection for another call once its answer came.
        Never raises: the caller's cancellation is what it raises."""
        nudge: asyncio.Future[bytes] | None = None
        if late is not None:
            with contextlib.suppress(Exception):  # broken (an ``EOFError``, an ``OSError``): its wait ends too
                nudge = conn.request(_NUDGE)

        async def finish() -> None:
            result = None
            try:
                try:
                    answer = await future
                    if nudge is not None:
                        await nudge
                except BaseException:
                    conn.close()  # failed, or ``close()`` cancelled this
                    return
                self._keep_idle(conn)
                with contextlib.suppress(Exception):  # an error answered: no result
                    result = read_answer(answer, method, self.address)
            finally:
                if late is not None:
                    late(result)

        try:
            task = asyncio.get_running_loop().create_task(finish())
        except Exception:  # no loop to finish in: the connection goes (and a lock with it)
            conn.close()
            if late is not None:
                late(None)
            return
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an opening's failure as seen: every caller that waited for it raised it already (or was
    cancelled)."""
    if not future.cancelled():
        future.exception()
