"""The Redis backend's operations without I/O, and the two executors that run them.

An operation (``RedisBackend``'s ``get``, ``incr``, ``lock_acquire`` ...) is written once, as a generator
that yields what to send to Redis (a ``Script`` of ``scripts``, a ``Command`` of the client, a
``Pipeline`` of commands, or a ``Sleep`` between lock attempts) and receives each reply, then returns the
answer or raises the error. ``run`` carries it out on a blocking ``Connection`` (redis-py's
``redis.Redis``), ``run_async`` on an ``AsyncConnection`` (``redis.asyncio.Redis``): the scripts, the
arguments, the decoding of replies, the errors and the lock rules are the same code for both faces.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Generator
from typing import Any, NamedTuple


class Script(NamedTuple):
    """Run one of ``scripts.SCRIPTS`` by its name."""

    name: str
    keys: list[str]
    args: list[Any]


class Command(NamedTuple):
    """Call a method of the redis-py client (``hget``, ``blpop`` ...)."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}  # noqa: RUF012 -- never changed


class Pipeline(NamedTuple):
    """Commands sent together (in one ``MULTI``/``EXEC`` block when ``transaction``); the reply is the
    list of their replies."""

    commands: list[Command]
    transaction: bool = True


class Sleep(NamedTuple):
    """Wait this many seconds (a lock waiter's short pause); the reply is ``None``."""

    seconds: float


Step = Script | Command | Pipeline | Sleep
#: Commands that wait in Redis (``Command.method``): the asyncio face sends them on a connection of their own.
WAITS = frozenset({"blpop"})
#: An operation: yields steps, receives their replies, returns the answer.
Operation = Generator[Step, Any, Any]


def run(operation: Operation, conn: Any, client: Any = None) -> Any:
    """Carry out ``operation`` on a blocking ``connection.Connection`` (its scripts and commands on ``client``
    if given: a watcher's own, or the watch thread's)."""
    client = conn.client if client is None else client
    reply = None
    try:
        while True:
            step = operation.send(reply)
            kind = type(step)
            if kind is Script:
                reply = conn.scripts[step.name](keys=step.keys, args=step.args, client=client)
            elif kind is Command:
                reply = getattr(client, step.method)(*step.args, **step.kwargs)
            elif kind is Pipeline:
                pipe = client.pipeline(transaction=step.transaction)
                for command in step.commands:
                    getattr(pipe, command.method)(*command.args, **command.kwargs)
                reply = pipe.execute()
            else:
                time.sleep(step.seconds)
                reply = None
    except StopIteration as done:
        return done.value
    except BaseException:
        operation.close()  # now, not when the traceback lets it go: its ``finally`` puts back what it took
        raise


async def run_step(step: Step, conn: Any) -> Any:
    """One step on an ``connection.AsyncConnection``: a script or command goes out alone when nothing else
    is in flight, else with the other tasks' of the same turn of the loop (``Batches``)."""
    kind = type(step)
    if kind is Script or (kind is Command and step.method not in WAITS):
        return await conn.batches.call(step)
    if kind is Command:
        return await conn.wait(step.method, step.args, step.kwargs)
    if kind is Pipeline:
        pipe = conn.client.pipeline(transaction=step.transaction)
        for command in step.commands:
            getattr(pipe, command.method)(*command.args, **command.kwargs)  # queued, not awaited
        return await pipe.execute()
    await asyncio.sleep(step.seconds)
    return None


async def run_async(
    operation: Operation,
    conn: Any,
    late: Callable[[Any], None] | None = None,
    unknown: Callable[[], None] | None = None,
) -> Any:
    """Carry out ``operation`` on an ``connection.AsyncConnection``, awaiting each reply.

    With ``late`` (a lock acquire), safe against cancellation: each ``Script`` step (a try, which may take
    the lock) is shielded, and when the task is cancelled while one is under way, its reply is still given
    to the operation, so a lock it took is counted as held, and ``late(True)`` gives it back. A wait (a
    ``BLPOP``, a ``Sleep``) is simply cut short: it takes nothing. If the try itself ends without an
    answer (cancelled too, as ``asyncio.run`` does to every task at its end, or failed), ``unknown()``:
    the lock may have been taken all the same."""
    reply = None
    handed = False  # to ``_finish``, which goes on with the operation
    try:
        while True:
            step = operation.send(reply)
            if late is None or type(step) is not Script:
                reply = await run_step(step, conn)
                continue
            attempt = asyncio.ensure_future(run_step(step, conn))
            try:
                reply = await asyncio.shield(attempt)
            except asyncio.CancelledError:
                attempt.add_done_callback(functools.partial(_finish, operation, late, unknown))
                handed = True
                raise
    except StopIteration as done:
        return done.value
    except BaseException:
        if not handed:
            operation.close()  # as ``run``
        raise


async def run_watch(operation: Operation, conn: Any) -> Any:
    """Carry out a watcher's ``operation`` on an ``connection.AsyncConnection``: its commands (``XREAD
    BLOCK``) on the connection's ``watches`` client, a connection each, its scripts as any call's."""
    reply = None
    try:
        while True:
            step = operation.send(reply)
            if type(step) is Command:
                reply = await getattr(conn.watches, step.method)(*step.args, **step.kwargs)
            else:
                reply = await run_step(step, conn)
    except StopIteration as done:
        return done.value
    except BaseException:
        operation.close()  # as ``run``: a read cancelled is no longer ``reading``
        raise


def _finish(
    operation: Operation,
    late: Callable[[Any], None],
    unknown: Callable[[], None] | None,
    attempt: asyncio.Future[Any],
) -> None:
    """The reply of a try whose task was cancelled: if the operation then ends with the lock taken, ``late``;
    without a reply, ``unknown``."""
    if attempt.cancelled() or attempt.exception() is not None:
        operation.close()
        if unknown is not None:
            unknown()
        return
    try:
        operation.send(attempt.result())
    except StopIteration as done:
        if done.value is True:
            late(True)
        return
    except Exception:  # the operation's own error: nothing was taken
        return
    operation.close()  # not taken: its next step is a wait, which nobody awaits any more


async def _alone(step: Script | Command, conn: Any) -> Any:
    await conn.check_alone()
    if type(step) is Script:
        return await conn.scripts[step.name](keys=step.keys, args=step.args)
    return await getattr(conn.alone, step.method)(*step.args, **step.kwargs)


class Batches:
    """The scripts and commands of an asyncio connection's tasks: one alone goes out at once; those made
    while others are in flight are gathered for one turn of the loop and sent together, in one write, as
    a pipeline without ``MULTI`` (each still atomic on its own, as alone). Many tasks then share each round
    trip, where redis-py would give each command a connection and a round trip of its own."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._in_flight = 0
        self._batch: list[tuple[Script | Command, asyncio.Future[Any]]] | None = None
        #: The batches being sent (the loop keeps only weak references to tasks).
        self._sending: set[asyncio.Future[None]] = set()

    async def call(self, step: Script | Command) -> Any:
        if self._in_flight or self._batch is not None:
            batch = self._batch
            if batch is None:
                batch = self._batch = []
                asyncio.get_running_loop().call_soon(self._flush)  # after the other tasks of this turn
            future = asyncio.get_running_loop().create_future()
            batch.append((step, future))
            return await future
        self._in_flight += 1
        try:
            return await _alone(step, self._conn)
        finally:
            self._in_flight -= 1

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch:
            self._in_flight += 1
            sending = asyncio.ensure_future(self._send(batch))
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Script | Command, asyncio.Future[Any]]]) -> None:
        conn = self._conn
        try:
            pipe = conn.client.pipeline(transaction=False)
            for step, _ in batch:
                if type(step) is Script:
                    pipe.evalsha(conn.scripts[step.name].sha, len(step.keys), *step.keys, *step.args)
                else:
                    getattr(pipe, step.method)(*step.args, **step.kwargs)
            replies = await pipe.execute(raise_on_error=False)
            for (step, future), reply in zip(batch, replies, strict=True):
                if isinstance(reply, conn.no_script):  # Redis did not know it, so did not run it: load and run
                    try:
                        reply = await _alone(step, conn)
                    except Exception as exc:
                        reply = exc
                if not future.done():  # else its task was cancelled
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
