"""``State``: the handle every process uses on the shared dictionary, whatever backend keeps it.

``State`` is a facade: it checks every argument once, here, in the caller (a bad name or value is a
``TypeError``/``ValueError`` at the call, and nothing is sent), holds the mapping sugar and pickling, and
delegates each call to ``self.backend`` (``backends.base.Backend``): a sharedstate server
(``backends.local``) or Redis/Valkey (``backends.redis``).
"""

from __future__ import annotations

import decimal
import os
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from sharedstate._lock import Lock, check_timeout
from sharedstate._pattern import compile_pattern
from sharedstate._replies import popped, popped_item, removed, sorted_view
from sharedstate._rules import check_increment
from sharedstate._semaphore import Semaphore, check_permits
from sharedstate._sentinels import MISSING, NO_DEFAULT
from sharedstate._values import PartBudget, check_name, check_names, check_scope, check_ttl, check_value
from sharedstate._watch import WAIT_BUFFER, Changes, deadline_of, left, waited, watch_arguments
from sharedstate.backends.base import Backend
from sharedstate.persistence.files import caller_target

#: Values with nothing to check (str is checked: it must encode as UTF-8).
_PLAIN_FAST = frozenset({int, float, bool, type(None)})
#: Names with nothing to check when ASCII (a str subclass is stored as its plain text).
_PLAIN_NAMES = frozenset({str})


class State(MutableMapping[str, Any]):
    """A handle on the shared dictionary (Pode's ``Set/Get/Remove/Test-PodeState``), and a
    ``collections.abc.MutableMapping``, so code written for a ``multiprocessing.Manager().dict()`` runs
    unchanged.

    Each call is atomic where the state lives, and one round trip to it, except a read the client cache
    answers (none) and an ``incr``, ``compare_and_set`` or ``append`` that Redis cannot finish in one
    script (see ``backends.redis``). Values are copies: change a nested value and ``set`` it again
    (inside ``state.lock``), or use the atomic calls ``incr``, ``append``, ``setdefault``,
    ``compare_and_set`` and ``update``.

    A handle can be pickled into pool tasks and child processes; each process and each thread uses its
    own connection. Get one from ``StateServer.state`` or ``sharedstate.connect()``.
    """

    __slots__ = ("_backend", "__weakref__")  # weakly referable, as a Lock is

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @property
    def backend(self) -> Backend:
        """Where the dictionary lives: a ``LocalBackend`` (a sharedstate server) or a ``RedisBackend``
        (with its ``namespace`` and ``lease``)."""
        return self._backend

    @property
    def address(self) -> str:
        """Where the state lives, as ``SHAREDSTATE_ADDRESS`` holds it (a Redis URL without its password)."""
        return self._backend.address

    def close(self) -> None:
        """Close this thread's connection (it is opened again by the next call)."""
        self._backend.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # The backend pickles what it needs to connect again (the key or the URL travels with it).
        return (State, (self._backend,))

    def __repr__(self) -> str:
        return f"<sharedstate.State at {self.address}>"

    # -- Pode's calls -------------------------------------------------------------------------------
    def get(self, name: str, default: Any = None) -> Any:
        """The value of ``name``, or ``default`` when there is no such name.

        On a local server, a value this handle read before and that has not changed since is answered
        from its cache, with no round trip (``connect(cache=False)`` turns that off)."""
        if type(name) is not str or not name.isascii():
            name = check_name(name)
        value = self._backend.get(name)
        return default if value is MISSING else value

    def set(self, name: str, value: Any, *, scope: str | Iterable[str] | None = None, ttl: float | None = None) -> Any:
        """Store ``value`` under ``name``, replacing its value and scopes; return ``value``.

        ``ttl`` (seconds, > 0) makes the name expire then; without it the name has no expiry (any it had
        goes). Raises ``TypeError`` for a name that is not a ``str`` or a value (at any depth) of a type
        that cannot be stored; the state is then unchanged.
        """
        if type(name) is not str or not name.isascii():
            name = check_name(name)
        if type(value) not in _PLAIN_FAST:  # ints, floats, bools, None: nothing to check
            check_value(name, value)
        scopes = check_scope(scope) if scope is not None else ()
        if ttl is None:
            self._backend.set(name, value, scopes)
        else:
            self._backend.set(name, value, scopes, check_ttl(ttl))
        return value

    def remove(self, name: str) -> Any:
        """Remove ``name``; return its value, or ``None`` if there was no such name."""
        return removed(self._backend.remove(check_name(name)))

    def contains(self, name: str) -> bool:
        """Whether ``name`` exists."""
        return self._backend.contains(check_name(name))

    def names(self, pattern: str | None = None, *, scope: str | Iterable[str] | None = None) -> list[str]:
        """The sorted names, those matching the regular expression ``pattern`` (``re.search``) and
        having any of the scopes ``scope`` when given (an empty list: no filter). An invalid pattern
        raises ``ValueError``. Matching runs in linear time (RE2) where the state lives; what RE2 cannot
        decide (backreferences, lookaround) is matched with ``re`` in the calling process, at its cost."""
        checked = None if pattern is None else compile_pattern(pattern)
        return self._backend.names(checked, check_scope(scope))

    def clear(self) -> None:
        """Remove every name."""
        self._backend.clear()

    # -- atomic calls -------------------------------------------------------------------------------
    def incr(self, name: str, by: int | float | decimal.Decimal = 1, *, ttl: float | None = None) -> Any:
        """Add ``by`` to the number under ``name`` (a missing name counts from 0); return the new value.

        Atomic. ``ttl`` (seconds) is the expiry of a name this call creates; a name that exists keeps its
        own (a fixed-window rate limit in one call). Raises ``TypeError`` if ``by`` or the stored value is
        not a number; nothing changes then.
        """
        name = check_name(name)
        check_increment(name, by)
        if ttl is None:
            return self._backend.incr(name, by)
        return self._backend.incr(name, by, check_ttl(ttl))

    def expire(self, name: str, ttl: float | None) -> bool:
        """Make ``name`` expire ``ttl`` seconds from now (``None``: never); whether the name exists (if not,
        nothing changes)."""
        name = check_name(name)
        return self._backend.expire(name, None if ttl is None else check_ttl(ttl))

    def ttl(self, name: str) -> float | None:
        """The seconds ``name`` has left before it expires; ``None`` if it has no expiry or does not exist."""
        return self._backend.ttl(check_name(name))

    def setdefault(self, name: str, default: Any = None) -> Any:
        """Store ``default`` under ``name`` unless the name exists; return the stored value. Atomic."""
        name = check_name(name)
        check_value(name, default)
        return self._backend.setdefault(name, default)

    def compare_and_set(self, name: str, expected: Any, new: Any) -> bool:
        """Store ``new`` under ``name`` only if its current value ``== expected`` (a missing name matches
        only ``expected=None``); return whether it did. Atomic. The name keeps its scopes."""
        name = check_name(name)
        check_value(name, expected)
        check_value(name, new)
        return self._backend.compare_and_set(name, expected, new)

    def append(self, name: str, item: Any) -> int:
        """Append ``item`` to the list under ``name`` (a missing name starts an empty list); return the
        new length. Atomic. Raises ``TypeError`` if the stored value is not a list."""
        name = check_name(name)
        check_value(name, item)
        return self._backend.append(name, item)

    def update(self, other: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /, **names: Any) -> None:
        """Store many names in one call, all or nothing, like ``set`` without a scope: from a mapping, an
        iterable of ``(name, value)`` pairs and keyword arguments, as ``dict.update`` takes them. Every
        name and value is checked before anything is sent."""
        # A handle is read in one call: dict() of it would read it name by name.
        items = update_items(other.snapshot() if isinstance(other, State) else other, names)
        if items:
            self._backend.update(items)

    def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        """The values of those of ``names`` that exist, in one call (none when every one is cached)."""
        return self._backend.get_many(check_names(names))

    def snapshot(self) -> dict[str, Any]:
        """A copy of every name and value."""
        return self._backend.snapshot()

    def save(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        scope: str | Iterable[str] | None = None,
    ) -> Path:
        """Write a snapshot of the state (JSON, atomically, mode 0600, the previous file kept as
        ``NAME.bak``) to the server's path or to ``path``; return the path written.

        ``scope`` keeps names having any of those scopes, ``include`` keeps only the names listed, and
        ``exclude`` drops names — applied in that order (Pode's), so ``exclude`` has the last word; an
        empty list is no filter. Raises ``ValueError`` when neither the server nor the call gives a path
        (a Redis state has no file of its own), and the ``OSError`` of a failed write (the previous file
        is then untouched). ``path`` is resolved here, in the calling process.
        """
        return self._backend.save(*save_arguments(path, include, exclude, scope))

    def restore(self, path: str | os.PathLike[str] | None = None, *, merge: bool = False) -> int:
        """Load a snapshot (ours, or a Pode state file) from the server's path or ``path``; return the
        number of names it held. With ``merge=False`` it replaces the whole state; with ``merge=True`` its
        names are set over the current ones. A missing file, or one that is empty or only white space,
        restores 0 names and changes nothing; an invalid one raises ``SnapshotError`` and changes nothing.
        """
        return self._backend.restore(*restore_arguments(path, merge))

    def stats(self) -> dict[str, Any]:
        """Figures of where the state lives: ``names``, ``pid``, ``rss_bytes``, ``uptime_s``, ``ops``,
        ``clients``, ``last_save_at``, ``last_save_s``, ``last_save_error``, ``lock_recoveries``; ``calls``
        (by name), ``locks_held``, ``lock_waiters``, ``lock_holders``, ``lock_wait_p50_s``/``_p99_s``,
        ``cache_hits``/``cache_misses``/``cache_hit_ratio`` (this process' cache) and more: every key is
        in docs/observability.md."""
        return self._backend.stats()

    # -- change notifications -----------------------------------------------------------------------
    def watch(
        self,
        pattern: str | None = None,
        *,
        names: Iterable[str] | None = None,
        scope: str | Iterable[str] | None = None,
        buffer: int = 10_000,
    ) -> Changes:
        """Watch the changes of the names that match ``pattern`` (``re.search``), are among ``names`` and
        have any of the scopes ``scope`` (each: no filter when not given), and every clear and restore:
        an iterator of ``Change(name, kind, value)`` in commit order, lossless from the moment this
        returns, and a context manager that stops watching. A watcher more than ``buffer`` changes
        behind gets one ``Change(None, "overflow", None)`` and continues from the present."""
        return Changes(self._backend.watch(*watch_arguments(pattern, names, scope, buffer)))

    def wait(self, name: str, *, timeout: float | None = None) -> Any:
        """Block until ``name`` changes after this call (set, removed, expired, cleared or restored) and
        return its new value (``None`` when it no longer exists); ``TimeoutError`` after ``timeout``
        seconds."""
        name = check_name(name)
        timeout = check_timeout(True, timeout)
        deadline = deadline_of(timeout)
        with Changes(self._backend.watch(None, (name,), (), WAIT_BUFFER)) as changes:
            known, value = waited(name, changes.next(left(deadline)), timeout)
        return value if known else self.get(name)

    # -- locks --------------------------------------------------------------------------------------
    @property
    def lock(self) -> Lock:
        """The global lock (Pode's ``Lock-PodeObject`` on the state)."""
        return Lock(self, None)

    def named_lock(self, name: str, lease: float | None = None) -> Lock:
        """An independent lock for ``name`` (any ``str``; it need not be a stored name). ``lease``: a
        holder that is alive but has not renewed it for that many seconds (a stopped process) loses it."""
        return Lock(self, check_name(name), lease)

    def semaphore(self, name: str, value: int = 1) -> Semaphore:
        """A cross-process counting semaphore of ``value`` permits (Pode's ``New-PodeSemaphore``); the first
        call that reaches the state fixes its value (docs/semaphores.md)."""
        return Semaphore(self, check_name(name), check_permits(value))

    # -- the mapping --------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        value = self._backend.get(check_name(name))
        if value is MISSING:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: Any) -> None:
        self.set(name, value)

    def __delitem__(self, name: str) -> None:
        if self._backend.remove(check_name(name)) is MISSING:
            raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return self.contains(name)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._backend.length()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def keys(self) -> Any:
        """The names, sorted: a view of one copy, taken in one call."""
        return dict.fromkeys(self.names()).keys()

    def values(self) -> Any:
        """The values, in the order of their sorted names: a view of one copy, taken in one call."""
        return sorted_view(self.snapshot()).values()

    def items(self) -> Any:
        """``(name, value)`` pairs, sorted by name: a view of one copy, taken in one call."""
        return sorted_view(self.snapshot()).items()

    def pop(self, name: str, default: Any = NO_DEFAULT) -> Any:
        """Remove ``name`` and return its value; ``default`` if there is no such name, or ``KeyError``
        when no default is given. Atomic."""
        return popped(name, self._backend.remove(check_name(name)), default)

    def popitem(self) -> tuple[str, Any]:
        """Remove some name and return ``(name, value)``; ``KeyError`` when the state is empty. Atomic.
        Which name is not specified (on a local server, the name added last; on Redis, a random one)."""
        return popped_item(self._backend.popitem())

    def __eq__(self, other: object) -> bool:
        """Whether the state holds the same names and values as ``other`` (a mapping, or a handle),
        compared on a copy of each."""
        if isinstance(other, State):
            return self.snapshot() == other.snapshot()
        if isinstance(other, Mapping):
            return self.snapshot() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to its contents, which change


# -- what ``State`` and ``aio.AsyncState`` share: checks of arguments, and what answers mean -------------
def update_items(other: Mapping[str, Any] | Iterable[tuple[str, Any]], names: dict[str, Any]) -> dict[str, Any]:
    """The names and values of ``update(other, **names)``, each checked."""
    if isinstance(other, Mapping):
        items = dict(other)  # what is checked is what is sent, whatever happens to ``other`` meanwhile
    else:
        try:
            items = dict(other)
        except (TypeError, ValueError):
            raise TypeError(
                f"update() takes a mapping or an iterable of (name, value) pairs, not {type(other).__name__}"
            ) from None
    if names:
        items.update(names)
    # The usual batch (ASCII names, plain numbers) is checked by scans in C; anything else item by item.
    if not (
        _PLAIN_NAMES.issuperset(map(type, items))
        and "".join(items).isascii()
        and _PLAIN_FAST.issuperset(map(type, items.values()))
    ):
        given, items, budget = items, {}, PartBudget()  # one budget: a save writes them all
        for name, value in given.items():
            name = check_name(name)
            check_value(name, value, budget)
            items[name] = value
    return items


def save_arguments(
    path: object,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    scope: str | Iterable[str] | None = None,
) -> tuple[Any, ...]:
    """The backend's arguments of ``save(path, include=, exclude=, scope=)``, checked."""
    target = _absolute(path, "save")
    include_list = (check_names(include) if include is not None else None) or None
    exclude_list = check_names(exclude) if exclude is not None else None
    return target, include_list, exclude_list, check_scope(scope)


def restore_arguments(path: object, merge: object) -> tuple[Any, ...]:
    """The backend's arguments of ``restore(path, merge=)``, checked."""
    if type(merge) is not bool:
        raise TypeError(f"merge must be a bool, not {type(merge).__name__}")
    return _absolute(path, "restore"), merge


def _absolute(path: object, verb: str) -> str | None:
    """A path argument resolved here, in the caller's process (the server may run in another folder,
    and ``/dev/stdout`` there is not the caller's); ``SnapshotError`` for something other than a regular
    file."""
    if path is None:
        return None
    return str(caller_target(path, verb))
