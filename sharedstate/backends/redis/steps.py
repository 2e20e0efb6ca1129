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


def run(operation: Operation, conn: Any) -> Any:
    """Carry out ``operation`` on a blocking ``connection.Connection``."""
    client = conn.client
    reply = None
    try:
        while True:
            step = operation.send(reply)
            kind = type(step)
            if kind is Script:
                reply = conn.scripts[step.name](keys=step.keys, args=step.args)
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


async def run_step(step: Step, conn: Any) -> Any:
    """One step on an ``connection.AsyncConnection``."""
    kind = type(step)
    if kind is Script:
        return await conn.scripts[step.name](keys=step.keys, args=step.args)
    if kind is Command:
        client = conn.waits if step.method in WAITS else conn.client
        return await getattr(client, step.method)(*step.args, **step.kwargs)
    if kind is Pipeline:
        pipe = conn.client.pipeline(transaction=step.transaction)
        for command in step.commands:
            getattr(pipe, command.method)(*command.args, **command.kwargs)  # queued, not awaited
        return await pipe.execute()
    await asyncio.sleep(step.seconds)
    return None


async def run_async(operation: Operation, conn: Any, late: Callable[[Any], None] | None = None) -> Any:
    """Carry out ``operation`` on an ``connection.AsyncConnection``, awaiting each reply.

    With ``late`` (a lock acquire), safe against cancellation: each ``Script`` step (a try, which may take
    the lock) is shielded, and when the task is cancelled while one is under way, its reply is still given
    to the operation, so a lock it took is counted as held, and ``late(True)`` gives it back. A wait (a
    ``BLPOP``, a ``Sleep``) is simply cut short: it takes nothing."""
    reply = None
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
                attempt.add_done_callback(functools.partial(_finish, operation, late))
                raise
    except StopIteration as done:
        return done.value


def _finish(operation: Operation, late: Callable[[Any], None], attempt: asyncio.Future[Any]) -> None:
    """The reply of a try whose task was cancelled: if the operation then ends with the lock taken, ``late``."""
    if attempt.cancelled() or attempt.exception() is not None:
        operation.close()
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
