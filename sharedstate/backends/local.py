"""The local backend: the dictionary lives in a sharedstate server process (``sharedstate.server``).

Each operation is one request on the calling thread's connection (``wire.calls``: sent again while the
server's owner restarts a crashed server), except reads the client cache answers (``wire.cache``): a
value this process read and that has not changed since costs no round trip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sharedstate._errors import ServerUnavailable, SharedStateError
from sharedstate._pattern import Pattern
from sharedstate._sentinels import MISSING, NOT_CACHED, PRESENT
from sharedstate.backends.base import LockRef
from sharedstate.backends.local_watch import LocalWatcher, watch_args
from sharedstate.wire.addresses import CALL_TIMEOUT, Address, check_server_supported, resolve
from sharedstate.wire.answers import sequence as _sequence
from sharedstate.wire.cache import CacheSlot, ClientCache, cache_figures, encode
from sharedstate.wire.calls import Calls
from sharedstate.wire.expiring import unwrap, unwrap_many

log = logging.getLogger(__name__)

_monotonic = time.monotonic


class LocalBackend:
    """The operations of ``Backend`` on a sharedstate server at ``address``. ``restart``: what the server
    said of its restarts, carried by a pickled handle so a new process' first call can wait for a
    restarting server."""

    renews_leases = False

    def __init__(
        self,
        address: Address | str,
        authkey: bytes | None,
        *,
        cache: bool = True,
        timeout: float = CALL_TIMEOUT,
        restart: dict[str, Any] | None = None,
    ) -> None:
        self._authkey = authkey
        self._use_cache = bool(cache)
        #: The values this handle read, for the server process it talks to.
        self._slot = slot = CacheSlot()
        self._calls = calls = Calls(
            address,
            authkey,
            timeout=timeout,  # checked by ``backends.open_backend``
            restart=restart,
            connected=slot.connected if cache else None,
            dropped=slot.dropped,
        )
        self._call = calls.call
        self._write = calls.write

    # -- plumbing -----------------------------------------------------------------------------------
    def _fresh_cache(self) -> ClientCache | None:
        """The cache, once this thread is connected (a new connection may bring a new server's cache)."""
        if self._use_cache:
            try:
                self._calls.pool.get()
            except ServerUnavailable:
                return None  # the call itself reconnects, or waits for a restarting server
        return self._slot.cache

    @property
    def _cache(self) -> ClientCache | None:
        """This handle's cache: ``None`` when off, before the first connection, or when the server's table
        cannot be mapped here."""
        return self._slot.cache

    def connect(self) -> None:
        """Open this thread's connection now (``connect()`` fails there, not at the first call)."""
        self._calls.pool.get()

    @property
    def address(self) -> str:
        return self._calls.address

    @property
    def identity(self) -> Hashable:
        return self._calls.address

    @property
    def calls(self) -> Calls:
        """The requests to the server (its address, key, call timeout and restarts)."""
        return self._calls

    @property
    def uses_cache(self) -> bool:
        """Whether this handle keeps a client cache (``connect(cache=)``)."""
        return self._use_cache

    @property
    def timeout(self) -> float:
        """The deadline of one call, in seconds."""
        return self._calls.timeout

    def close(self) -> None:
        self._calls.pool.drop()

    def __reduce__(self) -> tuple[Any, ...]:
        # The key travels with the handle: whoever can unpickle it can use the state.
        calls = self._calls
        return (_rebuild, (calls.address, self._authkey, self._use_cache, calls.timeout, calls.pool.restart))

    def __repr__(self) -> str:
        return f"<sharedstate local backend at {self.address}>"

    # -- reads --------------------------------------------------------------------------------------
    def _read(self, name: str, method: str) -> Any:
        """The value of ``name`` (``MISSING`` if there is none), from the cache when it is still the
        server's; ``method="contains"`` asks only whether the name exists (``PRESENT`` or ``MISSING``)."""
        value = cached(self._slot.cache, name, method)
        if value is not NOT_CACHED:
            return value
        start = _monotonic()
        cache = self._fresh_cache()
        # The counters are read before the request: a change after this makes the entry stale.
        stamp = None if cache is None else cache.stamp(name)
        value, deadline = read_result(method, self._call(method, (name,), start))
        if stamp is not None and cache is self._slot.cache:  # not after a reconnection to a new server
            cache.fill(name, stamp, value, deadline)
        return value

    def get(self, name: str) -> Any:
        return self._read(name, "get")

    def peek(self, name: str) -> Any:
        # Not a miss yet when it is not cached: the caller reads it next (``get``), which counts it.
        return cached(self._slot.cache, name, "get", count_miss=False)

    def contains(self, name: str) -> bool:
        return self._read(name, "contains") is not MISSING

    def get_many(self, names: list[str]) -> dict[str, Any]:
        found = cached_many(self._slot.cache, names)
        if found is not None:
            return found
        start = _monotonic()
        cache = self._fresh_cache()
        if cache is None:
            return unwrap_many(self._call("get_many", (names,), start))[0]
        stamps = cache.stamps(names)
        found, deadlines = unwrap_many(self._call("get_many", (names,), start))
        if cache is self._slot.cache:  # not after a reconnection to a new server
            cache.fill_many(stamps, found, deadlines)
        return found

    def names(self, pattern: Pattern | None, scopes: tuple[str, ...]) -> list[str]:
        return matched_names(pattern, self._call("names", names_args(pattern, scopes)))

    def length(self) -> int:
        return self._call("length", ())

    def snapshot(self) -> dict[str, Any]:
        return self._call("snapshot", ())

    # -- writes -------------------------------------------------------------------------------------
    def set(self, name: str, value: Any, scopes: tuple[str, ...], ttl: float | None = None) -> None:
        start = _monotonic()
        cache = self._fresh_cache()
        kept = None if cache is None else encode(value)  # as sent, whatever the caller does to it next
        stamp = self._write("set", set_args(name, value, scopes, ttl), start)
        if stamp is not None and kept is not None and cache is self._slot.cache:
            # The server's counters right after this change: the value is the server's until they move
            # (or its deadline, which the server answers after them).
            cache.put(name, stamp, kept, None if ttl is None else stamp[3])

    def remove(self, name: str) -> Any:
        return self._write("remove", (name,))

    def popitem(self) -> tuple[str, Any] | None:
        return self._write("popitem", ())

    def clear(self) -> None:
        self._write("clear", ())

    def incr(self, name: str, by: Any, ttl: float | None = None) -> Any:
        return self._write("incr", (name, by) if ttl is None else (name, by, ttl))

    def expire(self, name: str, ttl: float | None) -> bool:
        return self._write("expire", (name, ttl))

    def ttl(self, name: str) -> float | None:
        return self._call("ttl", (name,))

    def setdefault(self, name: str, default: Any) -> Any:
        return self._write("setdefault", (name, default))

    def compare_and_set(self, name: str, expected: Any, new: Any) -> bool:
        return self._write("compare_and_set", (name, expected, new))

    def append(self, name: str, item: Any) -> int:
        return self._write("append", (name, item))

    def update(self, mapping: dict[str, Any]) -> None:
        self._write("update", (mapping,))

    # -- change notifications -----------------------------------------------------------------------
    def watch(
        self, pattern: Pattern | None, names: tuple[str, ...] | None, scopes: tuple[str, ...], buffer: int
    ) -> LocalWatcher:
        return LocalWatcher(self._calls, pattern, watch_args(pattern, names, scopes, buffer))

    # -- files and figures --------------------------------------------------------------------------
    def save(
        self, path: str | None, include: list[str] | None, exclude: list[str] | None, scopes: tuple[str, ...]
    ) -> Path:
        return Path(self._call("save", (path, include, exclude, scopes)))

    def restore(self, path: str | None, merge: bool) -> int:
        return self._write("restore", (path, merge))

    def stats(self) -> dict[str, Any]:
        return {**self._call("stats", ()), **cache_figures(self._cache)}

    # -- locks --------------------------------------------------------------------------------------
    def lock_acquire(
        self, name: str | None, owner: Hashable, blocking: bool, timeout: float | None, lease: float | None, held: int
    ) -> bool:
        args = (name, owner, blocking, timeout, lease, held)
        again = None if timeout is None or not blocking else acquire_again(args)
        if held:  # a reentrant acquire: the count it sends next says how often it holds the lock
            return self._calls.lock_call("lock_acquire", args, again)
        with self._given_back("lock_give_back", (name, owner)):
            return self._calls.lock_call("lock_acquire", args, again)

    def lock_release(self, name: str | None, owner: Hashable, held: int) -> None:
        if not held:  # the server answers with the RuntimeError naming the holder
            self._call("lock_release", (name, owner, 0))
            return
        # The request id tells a release sent again after a crash from a lost lock (``server/locktable``).
        self._calls.lock_call("lock_release", (name, owner, held, next(_sequence)))

    def lock_renew(self, held: list[LockRef]) -> list[LockRef]:
        return self._calls.lock_call("lock_renew", (held,))

    def lock_locked(self, name: str | None) -> bool:
        return self._call("lock_locked", (name,))

    def lock_owner(self, name: str | None) -> int | None:
        return self._call("lock_owner", (name,))

    @contextmanager
    def _given_back(self, method: str, args: tuple[Any, ...]) -> Iterator[None]:
        """Around an acquire: if its caller cuts it short (``KeyboardInterrupt``, a signal handler's
        exception), perhaps after the server handed it the lock or permit, the server is asked (``method``)
        to give that back, before the exception goes on. The call's connection is closed already, but
        the process' other connections would keep it held."""
        try:
            yield
        except (SharedStateError, ValueError, TypeError):
            raise  # the server's answer, or no server to ask
        except BaseException:
            try:
                self._call(method, args)
            except Exception as exc:
                log.warning("could not give back what an interrupted acquire of %r may have taken: %s", args[0], exc)
            raise

    # -- semaphores (``server/semaphores``; the arguments: ``_semaphore``'s) --------------------------
    def sem_acquire(self, name: str, value: int, blocking: bool, timeout: float | None, owner: Hashable) -> bool:
        # The request id: a call sent again after a crash is answered as it was (``server/semaphores``),
        # and one cut short is given back by it.
        request = next(_sequence)
        args = (name, value, blocking, timeout, owner, request)
        with self._given_back("sem_give_back", (name, value, owner, request)):
            return self._calls.lock_call("sem_acquire", args, None if timeout is None else acquire_again(args))

    def sem_release(self, name: str, value: int, held: int, owner: Hashable) -> None:
        if held:
            self._calls.lock_call("sem_release", (name, value, held, owner, next(_sequence)))
        else:  # the server answers with the RuntimeError
            self._call("sem_release", (name, value, 0))

    def sem_value(self, name: str, value: int) -> int:
        return self._call("sem_value", (name, value))


# -- what the blocking and the asyncio backends share ---------------------------------------------------
def cached(cache: ClientCache | None, name: str, method: str, count_miss: bool = True) -> Any:
    """What the cache knows of ``name`` for ``method`` (``get``: the value or ``MISSING``; ``contains``: also
    ``PRESENT``), or ``NOT_CACHED``; counted as a hit, or (``count_miss``) a miss, of the cache."""
    if cache is None:
        return NOT_CACHED
    value = cache.lookup(name)
    if value is NOT_CACHED or (value is PRESENT and method != "contains"):
        if count_miss:
            cache.misses += 1
        return NOT_CACHED
    cache.hits += 1
    return value


def cached_many(cache: ClientCache | None, names: list[str]) -> dict[str, Any] | None:
    """What ``get_many(names)`` answers from the cache, or ``None`` when any of them is not cached (one
    hit or one miss of the cache)."""
    if cache is None:
        return None
    found = cache.lookup_many(names)
    if found is None:
        cache.misses += 1
    else:
        cache.hits += 1
    return found


def read_result(method: str, answer: Any) -> tuple[Any, float | None]:
    """The answer of a read as the cache keeps it (``contains``: ``PRESENT`` or ``MISSING``), and the
    name's deadline (``None``: it does not expire)."""
    value, deadline = unwrap(answer)
    if method == "contains":
        return (PRESENT if value else MISSING), deadline
    return value, deadline


def set_args(name: str, value: Any, scopes: tuple[str, ...], ttl: float | None) -> tuple[Any, ...]:
    """The arguments of the server's ``set``, the shortest that say it."""
    if ttl is not None:
        return (name, value, scopes, ttl)
    return (name, value, scopes) if scopes else (name, value)


def names_args(pattern: Pattern | None, scopes: tuple[str, ...]) -> tuple[Any, ...]:
    return (None if pattern is None else pattern.text, scopes)


def matched_names(pattern: Pattern | None, found: Any) -> list[str]:
    """The names a ``names`` call answered. The server matches with RE2 only; names it leaves undecided
    (a pattern with backreferences or lookaround, say) come back apart and are matched here, with ``re``,
    at this caller's cost."""
    if type(found) is tuple:
        matched, undecided = found
        assert pattern is not None
        found = sorted(matched + pattern.search_undecided(undecided))
    return found


def acquire_again(args: tuple[Any, ...]) -> Callable[[], tuple[Any, ...]]:
    """The arguments of a blocking ``lock_acquire`` (or ``sem_acquire``: the timeout is the fourth of
    either) sent again after a crash of the server: with what is left of its timeout."""
    timeout = args[3]
    end = None if timeout is None else _monotonic() + timeout

    def again() -> tuple[Any, ...]:
        return (*args[:3], None if end is None else max(0.0, end - _monotonic()), *args[4:])

    return again


def _rebuild(
    address: str, authkey: bytes | None, cache: bool, timeout: float, restart: dict[str, Any] | None
) -> LocalBackend:
    return LocalBackend(address, authkey, cache=cache, timeout=timeout, restart=restart)


def open_local(address: object, authkey: bytes | None, *, cache: bool, timeout: float) -> LocalBackend:
    """A backend connected to the server at ``address`` (default: ``SHAREDSTATE_ADDRESS``), with its key
    (default: ``SHAREDSTATE_AUTHKEY``, or ``ADDRESS.key`` beside a Unix socket). ``NotImplementedError``
    on Windows."""
    check_server_supported()
    parsed, key = resolve(address, authkey)
    backend = LocalBackend(parsed, key, cache=cache, timeout=timeout)
    backend.connect()
    return backend
