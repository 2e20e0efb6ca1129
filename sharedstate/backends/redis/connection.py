"""Connections to Redis through redis-py, and redis-py's errors as sharedstate's.

redis-py is imported on the first connection, so that ``import sharedstate`` and a local state never
need it; without it, the error names the extra to install.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from sharedstate import _fork
from sharedstate._errors import AccessDenied, ServerUnavailable, SharedStateError
from sharedstate.backends.redis.scripts import SCRIPTS
from sharedstate.backends.redis.steps import Batches, run

#: Connecting may take this long before the server counts as unavailable (as for the local server).
CONNECT_TIMEOUT = 5.0
#: A reply may take this long by default (``connect(timeout=)``; redis-py's own default is no limit
#: before version 8, 5 s from 8 on).
REPLY_TIMEOUT = 30.0
#: The reply timeout of the watch thread's ticks: well below a watch's lease (5 s) less a tick (0.5 s).
TICK_TIMEOUT = 1.0
#: Connections the asyncio face's commands share (lock waits take more of their own).
ASYNC_CONNECTIONS = 64
#: Lock waits (``BLPOP``) that hold a connection each at once; a waiter past them polls (``wait``).
MAX_WAITS = 64
#: Idle connections kept for lock waits (more are closed when their wait ends).
IDLE_WAITS = 8
#: How long a lock waiter past ``MAX_WAITS`` sleeps before it tries the lock again.
WAIT_POLL_S = 0.1
#: The ``alone`` connection, idle longer, is checked before it is used (Redis may have closed it: ``timeout``).
ALONE_IDLE_CHECK_S = 0.5
INSTALL_HINT = "pip install 'sharedstate[redis]'"

_redis_module: Any = None


class _NeverRaised(Exception):
    """Stands for redis-py's error class until redis-py is imported."""


#: redis-py's base error class, once it is imported.
RedisError: type[BaseException] = _NeverRaised


def import_redis() -> Any:
    """The ``redis`` module; ``ImportError`` naming the extra to install without it."""
    global _redis_module, RedisError
    if _redis_module is None:
        try:
            import redis
            import redis.exceptions
        except ImportError:
            raise ImportError(f"a Redis URL needs redis-py, an optional extra of sharedstate: {INSTALL_HINT}") from None
        RedisError = redis.exceptions.RedisError
        _redis_module = redis
    return _redis_module


def import_redis_asyncio() -> Any:
    """The ``redis.asyncio`` module (slow to import, unless ``import redis`` did: ``aio.connect`` imports
    it on its worker thread)."""
    import_redis()
    from redis import asyncio as aioredis

    return aioredis


def _options(retry: Any, timeout: float) -> dict[str, Any]:
    """The options of a redis-py client (blocking or asyncio, by its ``retry`` class)."""
    from redis.backoff import NoBackoff

    return {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        # A Redis server that stops answering (SIGSTOP, a frozen host) fails the call after it.
        "socket_timeout": timeout,
        # No silent retries: a script whose reply was lost may have run, and running it again
        # would count twice. A failed call raises ServerUnavailable, as on the local server.
        "retry": retry(NoBackoff(), 0),
    }


class Connection:
    """One process' redis-py client of a backend, with every script registered on it (as attributes
    named by ``scripts.SCRIPTS``). ``generation`` is the fork generation it was opened in: a forked child
    must open its own, the sockets are its parent's."""

    def __init__(self, url: str, timeout: float = REPLY_TIMEOUT) -> None:
        redis = import_redis()
        from redis.retry import Retry

        # Options in the URL's query win (redis-py lets them override keyword arguments).
        self.client = redis.Redis.from_url(url, **_options(Retry, timeout))
        self.generation = _fork.generation
        self.scripts = {name: self.client.register_script(source) for name, source in SCRIPTS.items()}
        #: Watchers' ``XREAD BLOCK``s: a pool of its own, so each wait holds a connection no other call waits for.
        self.watches = redis.Redis.from_url(url, **_options(Retry, timeout))
        #: The reply timeout in effect (``None``: no limit), which a ``socket_timeout`` in the URL may set.
        self.timeout: float | None = self.client.connection_pool.connection_kwargs.get("socket_timeout")
        #: The watch thread's ticks (``watch.Registry``): a short timeout, whatever the URL says, so that a
        #: Redis that stopped answering holds the thread up well within the lease of the other namespaces'.
        self.ticks = redis.Redis.from_url(url, **_options(Retry, TICK_TIMEOUT))
        self.ticks.connection_pool.connection_kwargs.update(
            socket_timeout=TICK_TIMEOUT, socket_connect_timeout=TICK_TIMEOUT
        )

    def close(self) -> None:
        """Close every connection (the next call opens them again)."""
        self.client.close()
        self.watches.close()
        self.ticks.close()

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run one of ``scripts.SCRIPTS`` (by ``EVALSHA``, loading it first if Redis does not know it)."""
        return self.scripts[script](keys=keys, args=args)


class AsyncConnection:
    """The same for asyncio: a ``redis.asyncio`` client, with the same options and scripts. It belongs
    to the event loop of its first command (redis-py's asyncio connections do). A command takes a
    connection of the pool for its round trip, so tasks' commands overlap on several connections."""

    def __init__(self, url: str, timeout: float = REPLY_TIMEOUT) -> None:
        redis = import_redis()
        aioredis = import_redis_asyncio()
        from redis.asyncio.retry import Retry

        options = _options(Retry, timeout)
        # At most ``ASYNC_CONNECTIONS`` connections; a task past them waits for a free one (within the
        # reply timeout) rather than fail, as it would past redis-py's default pool of 100.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=ASYNC_CONNECTIONS, timeout=timeout, **options
        )
        self.client = aioredis.Redis.from_pool(pool)
        # A call alone (nothing else in flight: ``steps.Batches``) keeps one connection of the pool, and
        # skips taking one from the pool and giving it back on every call.
        self.alone = aioredis.Redis(connection_pool=pool, single_connection_client=True)
        # A lock wait (``BLPOP``) holds its connection for up to a wait slice: waits take connections of
        # their own, so they never hold up the other tasks' commands; at most ``MAX_WAITS`` (``wait``).
        self.waits = aioredis.Redis.from_pool(
            aioredis.ConnectionPool.from_url(url, max_connections=MAX_WAITS, **options)
        )
        self._wait_slots = asyncio.Semaphore(MAX_WAITS)
        self._alone_used = 0.0  # the loop's time of the last call alone
        self.scripts = {name: self.alone.register_script(source) for name, source in SCRIPTS.items()}
        #: Watchers' ``XREAD BLOCK``s, each on a connection of its own (``watch``).
        self.watches = aioredis.Redis.from_pool(aioredis.ConnectionPool.from_url(url, **options))
        self.no_script = redis.exceptions.NoScriptError
        self.batches = Batches(self)

    async def check_alone(self) -> None:
        """Before a call alone: if its connection was idle a while and Redis has closed it meanwhile (an
        idle client past Redis' ``timeout``, a restart), drop it, so the call opens a new one instead of
        failing, as the blocking face's pool does when it hands out a connection."""
        now = asyncio.get_running_loop().time()
        idle, self._alone_used = now - self._alone_used, now
        conn = self.alone.connection
        if idle < ALONE_IDLE_CHECK_S or conn is None or not conn.is_connected:
            return
        try:
            # The end of the stream, or bytes nobody asked for (redis-py before 8 names it can_read_destructive).
            check = getattr(conn, "can_read", None) or conn.can_read_destructive
            closed = await check()
        except (RedisError, OSError):
            closed = True
        if closed:
            await conn.disconnect()

    async def wait(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A command that waits in Redis (``steps.WAITS``, with a ``timeout``) on a wait connection. Past
        ``MAX_WAITS`` waits at once, a short sleep instead, and ``None`` (as a wait that timed out): the
        waiter tries the lock again after it, so many waiters hold neither many sockets nor fds."""
        if self._wait_slots.locked():
            await asyncio.sleep(min(kwargs["timeout"], WAIT_POLL_S))
            return None
        async with self._wait_slots:
            try:
                return await getattr(self.waits, method)(*args, **kwargs)
            finally:
                await self._trim_waits()

    async def _trim_waits(self) -> None:
        """Close the idle wait connections past ``IDLE_WAITS`` (after a crowd of waiters has gone)."""
        idle = self.waits.connection_pool._available_connections  # redis-py's list of idle connections
        extra = [idle.pop() for _ in range(len(idle) - IDLE_WAITS)]  # taken out before any await
        for conn in extra:
            await conn.disconnect()

    async def aclose(self) -> None:
        """Close every connection (the next command opens them again)."""
        for client in (self.alone, self.client, self.waits, self.watches):
            await client.aclose()


def text(raw: bytes | str) -> str:
    """A reply as text: redis-py answers bytes, unless the URL asked it to decode replies."""
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def translate(exc: BaseException, address: str, call: str) -> BaseException:
    """A redis-py error as the error sharedstate raises for the same failure of the local server."""
    errors = _redis_module.exceptions
    text = str(exc) or type(exc).__name__
    if isinstance(exc, getattr(errors, "AuthenticationError", ())) or text.startswith(("NOAUTH", "WRONGPASS")):
        return AccessDenied(f"the Redis server at {address} refused the credentials: {text}", address)
    if isinstance(exc, getattr(errors, "NoPermissionError", ())):
        return AccessDenied(f"the Redis server at {address} refused {call}(): {text}", address)
    # An OSError: redis.asyncio lets some through unwrapped (no file descriptor left: EMFILE).
    if isinstance(exc, (errors.ConnectionError, errors.TimeoutError, OSError)):
        if call == "connect":
            return ServerUnavailable(f"no Redis server answers at {address}: {text}", address)
        return ServerUnavailable(f"the Redis server at {address} went away during {call}(): {text}", address)
    return SharedStateError(f"the Redis server at {address} failed in {call}(): {text}")


_F = TypeVar("_F", bound=Callable[..., Any])


def redis_call(function: _F) -> _F:
    """Raise sharedstate's errors, not redis-py's, from a backend method (whose ``address`` names the
    server in the message), and count the call (in the backend's ``counted``, for ``stats()``)."""
    call = function.__name__.strip("_")

    @functools.wraps(function)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.counted.count(call)
        try:
            return function(self, *args, **kwargs)
        except RedisError as exc:
            raise translate(exc, self.address, call) from None

    return wrapper  # type: ignore[return-value]


def operation(function: _F) -> _F:
    """A backend method written as a ``steps.Operation`` (a generator of the steps to send): the method
    runs it on the backend's blocking connection, as a ``redis_call``. Its ``steps`` attribute is the
    generator function itself, which the asyncio face (``aio_redis``) runs on its own connection."""

    @functools.wraps(function)
    def blocking(self: Any, *args: Any) -> Any:
        return run(function(self, *args), self._conn)

    wrapped: Any = redis_call(blocking)
    wrapped.steps = function
    return wrapped  # type: ignore[no-any-return]
