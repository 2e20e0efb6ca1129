"""``State``, the handle every process uses, and ``connect()``."""

from __future__ import annotations

import decimal
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil

from sharedstate._errors import ServerUnavailable, SharedStateError
from sharedstate._lock import Lock
from sharedstate._pattern import compile_pattern
from sharedstate._processes import process_alive
from sharedstate._sentinels import MISSING, NOT_CACHED, PRESENT
from sharedstate._values import PartBudget, check_name, check_names, check_scope, check_value
from sharedstate.persistence.files import caller_target
from sharedstate.wire import answers as _answers
from sharedstate.wire.addresses import (
    BOOT_SCOPE,
    CALL_TIMEOUT,
    CONNECT_TIMEOUT,
    STORE_ID,
    Address,
    check_call_timeout,
    format_address,
    parse_address,
    resolve,
)
from sharedstate.wire.cache import ClientCache, cache_for, encode
from sharedstate.wire.pool import ConnectionPool

_NUMBER_TYPES = (int, float, decimal.Decimal)
#: Values with nothing to check (str is checked: it must encode as UTF-8).
_PLAIN_FAST = frozenset({int, float, bool, type(None)})
#: Names with nothing to check when ASCII (a str subclass is stored as its plain text).
_PLAIN_NAMES = frozenset({str})


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
#: nothing. Writes are sent with a request id instead (``_write``), so the server applies them once. Lock
#: calls carry what their caller believes it holds (and a release its request id), so the server applies
#: them once too (``_lock_call``; ``_locktable`` explains how).
_RESENDABLE = frozenset("get getitem contains names get_many snapshot length stats save lock_locked lock_owner".split())
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


class State:
    """A handle on the shared dictionary of one server (Pode's ``Set/Get/Remove/Test-PodeState``).

    Every call is one round trip to the server and atomic there. Values are copies: change a nested
    value and ``set`` it again (inside ``state.lock``), or use the atomic calls ``incr``, ``append``,
    ``setdefault``, ``compare_and_set`` and ``update``.

    A handle can be pickled into pool tasks and child processes; each process and each thread uses
    its own connection. Get one from ``StateServer.state`` or ``sharedstate.connect()``.
    """

    def __init__(
        self,
        address: Address | str,
        authkey: bytes | None,
        *,
        cache: bool = True,
        timeout: float = CALL_TIMEOUT,
        restart: dict[str, Any] | None = None,
    ) -> None:
        self._address = parse_address(address)
        self._authkey = authkey
        self._use_cache = bool(cache)
        #: The deadline of one call (``connect(timeout=)``).
        self._timeout = check_call_timeout(timeout)
        #: The values this handle read (``_cache``), for the server process it talks to; ``None`` when
        #: off, before the first connection, or when the server's version table cannot be mapped here.
        self._cache: ClientCache | None = None
        self._pool = ConnectionPool(
            self._address,
            authkey,
            _hello_client,
            self._connected if cache else None,
            call_timeout=self._timeout,
            restart=restart,
        )

    # -- plumbing -----------------------------------------------------------------------------------
    def _connected(self, info: dict[str, Any]) -> None:
        """A connection opened: use this process' cache for that server process."""
        self._cache = cache_for(info.get("versions"))

    def _fresh_cache(self) -> ClientCache | None:
        """The cache, once this thread is connected (a new connection may bring a new server's cache)."""
        if self._use_cache:
            try:
                self._pool.get()
            except ServerUnavailable:
                return None  # the call itself reconnects, or waits for a restarting server
        return self._cache

    def _call(self, method: str, args: tuple[Any, ...], start: float | None = None) -> Any:
        # Pickled before anything is sent: an argument that cannot be pickled fails here, and the
        # connection (which keeps this process' locks alive) stays usable.
        return self._send(method, _pickle_dumps((STORE_ID, method, args, _NO_KWARGS), _PROTOCOL), start=start)

    def _write(self, method: str, args: tuple[Any, ...], start: float | None = None) -> Any:
        """``_call`` for a write: sent with a request id, so that it may be sent again after a crash
        and is still applied once."""
        # The sequence number alone: the connection introduced this thread's client id (``_hello_client``).
        request = _pickle_dumps((next(_sequence), method, args, _NO_KWARGS), _PROTOCOL)
        return self._send(method, request, True, start=start)

    def _lock_call(self, method: str, args: tuple[Any, ...], again: Callable[[], tuple[Any, ...]] | None = None) -> Any:
        """``_call`` for a lock call, sent again if the server crashes before it answers (and its owner
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
        """``start``: when the call began, if it already tried to connect (``_fresh_cache``): a new
        attempt may take only what is left of the call's time."""
        pool = self._pool
        conn = None
        if start is None:
            start = _monotonic()
            connect_within = None
        else:
            connect_within = max(0.001, min(CONNECT_TIMEOUT, start + self._timeout - _monotonic()))
        try:
            conn = pool.get(connect_within)
            answer = conn.request(request)
        except BaseException as exc:
            if again is None:
                resendable = resendable or method in _RESENDABLE
                deadline = start + self._timeout
            else:
                # A lock call (``again``: its request for a later attempt) may have waited long for its
                # lock before the failure: the new server gets the call's timeout from now.
                request, deadline = again, _monotonic() + self._timeout  # type: ignore[assignment]
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
        pool = self._pool
        pause = RETRY_FIRST_S
        missing_since: list[float] = []
        while True:
            pool.drop()
            self._cache = None
            if not isinstance(exc, (EOFError, OSError)) or (
                isinstance(exc, SharedStateError) and not isinstance(exc, ServerUnavailable)
            ):
                raise exc
            if isinstance(exc, BlockingIOError):  # the socket's timeout: nothing came back in time
                raise ServerUnavailable(
                    f"the sharedstate server at {self.address} did not answer {method}() within {self._timeout:g} s",
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
                    f"no sharedstate server answered {method}() at {self.address} within {self._timeout:g} s ({what})",
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
            conn.set_timeout(self._timeout)
            return answer

    def _restart_expected(self, missing_since: list[float]) -> bool:
        """Whether the server's owner will start it again (the last server said it would, the owner
        lives, and its socket file is there, or went away only a moment ago)."""
        restart = self._pool.restart
        if not restart:
            return False
        if restart.get("scope") == BOOT_SCOPE and not process_alive(restart.get("owner"), restart.get("ctime")):
            return False
        address = self._address
        if isinstance(address, str) and not os.path.exists(address):
            now = time.monotonic()
            if not missing_since:
                missing_since.append(now)
            elif now - missing_since[0] > RESTART_GRACE_S:
                return False
        else:
            missing_since.clear()
        return True

    @property
    def address(self) -> str:
        """The server's address, as ``SHAREDSTATE_ADDRESS`` holds it."""
        return format_address(self._address)

    def close(self) -> None:
        """Close this thread's connection (it is opened again by the next call)."""
        self._pool.drop()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # The key travels with the handle: whoever can unpickle it can use the state. So does what the
        # server said about its restart, so a new process' first call can wait for a restarting server.
        return (_rebuild, (self.address, self._authkey, self._use_cache, self._timeout, self._pool.restart))

    def __repr__(self) -> str:
        return f"<sharedstate.State at {self.address}>"

    # -- Pode's calls -------------------------------------------------------------------------------
    def _read(self, name: str, method: str = "get") -> Any:
        """The value of ``name`` (``MISSING`` if there is none), from the cache when it is still the
        server's; ``method="contains"`` asks only whether the name exists (``PRESENT`` or ``MISSING``)."""
        cache = self._cache
        if cache is not None:
            value = cache.lookup(name)
            if value is not NOT_CACHED and (value is not PRESENT or method == "contains"):
                return value
        start = _monotonic()
        cache = self._fresh_cache()
        # The counters are read before the request: a change after this makes the entry stale.
        stamp = None if cache is None else cache.stamp(name)
        value = self._call(method, (name,), start)
        if method == "contains":
            value = PRESENT if value else MISSING
        if stamp is not None and cache is self._cache:  # not after a reconnection to a new server
            cache.fill(name, stamp, value)
        return value

    def _peek(self, name: str) -> Any:
        """The cached value of ``name`` (``MISSING`` for a name known not to exist) if it is still the
        server's, else ``NOT_CACHED``; never a round trip (the asyncio client answers hits at once)."""
        cache = self._cache
        if cache is None:
            return NOT_CACHED
        value = cache.lookup(name)
        return NOT_CACHED if value is PRESENT else value

    def get(self, name: str, default: Any = None) -> Any:
        """The value of ``name``, or ``default`` when there is no such name.

        A value this handle read before and that has not changed since is answered from its cache,
        with no round trip (``connect(cache=False)`` turns that off)."""
        if type(name) is not str:
            name = check_name(name)
        value = self._read(name)
        return default if value is MISSING else value

    def set(self, name: str, value: Any, *, scope: str | Iterable[str] | None = None) -> Any:
        """Store ``value`` under ``name``, replacing its value and scopes; return ``value``.

        Raises ``TypeError`` for a name that is not a ``str`` or a value (at any depth) of a type that
        cannot be stored; the state is then unchanged.
        """
        if type(name) is not str or not name.isascii():
            name = check_name(name)
        if type(value) not in _PLAIN_FAST:  # ints, floats, bools, None: nothing to check
            check_value(name, value)
        scopes = check_scope(scope) if scope is not None else ()
        start = _monotonic()
        cache = self._fresh_cache()
        kept = None if cache is None else encode(value)  # as sent, whatever the caller does to it next
        stamp = self._write("set", (name, value, scopes) if scopes else (name, value), start)
        if stamp is not None and kept is not None and cache is self._cache:
            # The server's counters right after this change: the value is the server's until they move.
            cache.put(name, stamp, kept)
        return value

    def remove(self, name: str) -> Any:
        """Remove ``name``; return its value, or ``None`` if there was no such name."""
        return self._write("remove", (check_name(name),))

    def contains(self, name: str) -> bool:
        """Whether ``name`` exists."""
        return self._read(check_name(name), "contains") is not MISSING

    def names(self, pattern: str | None = None, *, scope: str | Iterable[str] | None = None) -> list[str]:
        """The sorted names, those matching the regular expression ``pattern`` (``re.search``) and
        having any of the scopes ``scope`` when given (an empty list: no filter). An invalid pattern
        raises ``ValueError``. The server matches with RE2 only; names it leaves undecided (a pattern
        with backreferences or lookaround, say) are matched here, with ``re``, at this caller's cost."""
        checked = None if pattern is None else compile_pattern(pattern)
        found = self._call("names", (None if checked is None else checked.text, check_scope(scope)))
        if type(found) is tuple:
            matched, undecided = found
            assert checked is not None
            found = sorted(matched + checked.search_undecided(undecided))
        return found

    def clear(self) -> None:
        """Remove every name."""
        self._write("clear", ())

    # -- atomic calls -------------------------------------------------------------------------------
    def incr(self, name: str, by: int | float = 1) -> Any:
        """Add ``by`` to the number under ``name`` (a missing name counts from 0); return the new value.

        Atomic. Raises ``TypeError`` if ``by`` or the stored value is not a number; nothing changes then.
        """
        name = check_name(name)
        if type(by) not in _NUMBER_TYPES:
            raise TypeError(f"cannot incr {name!r} by {type(by).__name__}: by must be an int, float or Decimal")
        if type(by) is decimal.Decimal:
            check_value(name, by)  # a signalling NaN: ValueError
        return self._write("incr", (name, by))

    def setdefault(self, name: str, default: Any) -> Any:
        """Store ``default`` under ``name`` unless the name exists; return the stored value. Atomic."""
        name = check_name(name)
        check_value(name, default)
        return self._write("setdefault", (name, default))

    def compare_and_set(self, name: str, expected: Any, new: Any) -> bool:
        """Store ``new`` under ``name`` only if its current value ``== expected`` (a missing name matches
        only ``expected=None``); return whether it did. Atomic. The name keeps its scopes."""
        name = check_name(name)
        check_value(name, expected)
        check_value(name, new)
        return self._write("compare_and_set", (name, expected, new))

    def append(self, name: str, item: Any) -> int:
        """Append ``item`` to the list under ``name`` (a missing name starts an empty list); return the
        new length. Atomic. Raises ``TypeError`` if the stored value is not a list."""
        name = check_name(name)
        check_value(name, item)
        return self._write("append", (name, item))

    def update(self, mapping: Mapping[str, Any]) -> None:
        """Store many names in one call, all or nothing, like ``set`` without a scope. Every name and
        value is checked before anything is sent."""
        if not isinstance(mapping, Mapping):
            raise TypeError(f"update() takes a mapping of names to values, not {type(mapping).__name__}")
        checked = dict(mapping)  # what is checked is what is sent, whatever happens to ``mapping`` meanwhile
        # The usual batch (ASCII names, plain numbers) is checked by scans in C; anything else item by item.
        if not (
            _PLAIN_NAMES.issuperset(map(type, checked))
            and "".join(checked).isascii()
            and _PLAIN_FAST.issuperset(map(type, checked.values()))
        ):
            items, checked, budget = checked, {}, PartBudget()  # one budget: a save writes them all
            for name, value in items.items():
                name = check_name(name)
                check_value(name, value, budget)
                checked[name] = value
        if checked:
            self._write("update", (checked,))

    def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        """The values of those of ``names`` that exist, in one call (none when every one is cached)."""
        names = check_names(names)
        cache = self._cache
        if cache is not None:
            found = cache.lookup_many(names)
            if found is not None:
                return found
        start = _monotonic()
        cache = self._fresh_cache()
        if cache is None:
            return self._call("get_many", (names,), start)
        stamps = cache.stamps(names)
        found = self._call("get_many", (names,), start)
        if cache is self._cache:  # not after a reconnection to a new server
            for name, stamp in stamps.items():
                cache.fill(name, stamp, found.get(name, MISSING))
        return found

    def snapshot(self) -> dict[str, Any]:
        """A copy of every name and value."""
        return self._call("snapshot", ())

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
        ``exclude`` drops names — applied in that order (Pode's), so ``exclude`` has the last word.
        Raises ``ValueError`` when neither the server nor the call gives a path, and the ``OSError`` of a
        failed write (the previous file is then untouched).
        """
        target = _absolute(path, "save")
        # An empty list is no filter (Pode's rule), as for names(scope=[]).
        include_list = (check_names(include) if include is not None else None) or None
        exclude_list = check_names(exclude) if exclude is not None else None
        return Path(self._call("save", (target, include_list, exclude_list, check_scope(scope))))

    def restore(self, path: str | os.PathLike[str] | None = None, *, merge: bool = False) -> int:
        """Load a snapshot (ours, or a Pode state file) from the server's path or ``path``; return the
        number of names it held. With ``merge=False`` it replaces the whole state; with ``merge=True`` its
        names are set over the current ones. A missing file, or one that is empty or only white space,
        restores 0 names and changes nothing; an invalid one raises ``SnapshotError`` and changes nothing.
        """
        if type(merge) is not bool:
            raise TypeError(f"merge must be a bool, not {type(merge).__name__}")
        return self._write("restore", (_absolute(path, "restore"), merge))

    def stats(self) -> dict[str, Any]:
        """The server's figures: ``names``, ``pid``, ``rss_bytes``, ``uptime_s``, ``ops``, ``clients``,
        ``last_save_at``, ``last_save_s``, ``last_save_error``, ``lock_recoveries`` (and more)."""
        return self._call("stats", ())

    # -- locks --------------------------------------------------------------------------------------
    #: Whether this backend renews leased locks itself (Redis does); else ``Lock``'s thread does.
    _renews_leases = False

    @property
    def lock(self) -> Lock:
        """The global lock (Pode's ``Lock-PodeObject`` on the state)."""
        return Lock(self, None)

    def named_lock(self, name: str, lease: float | None = None) -> Lock:
        """An independent lock for ``name`` (any ``str``; it need not be a stored name). ``lease``: a
        holder that is alive but has not renewed it for that many seconds (a stopped process) loses it."""
        return Lock(self, check_name(name), lease)

    # -- mapping sugar ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        value = self._read(check_name(name))
        if value is MISSING:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: Any) -> None:
        self.set(name, value)

    def __delitem__(self, name: str) -> None:
        self._write("delitem", (check_name(name),))

    def __contains__(self, name: object) -> bool:
        return self.contains(name)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._call("length", ())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __bool__(self) -> bool:
        # A handle is always true, like any other object, whether or not the state is empty.
        return True


def _absolute(path: object, verb: str) -> str | None:
    """A path argument resolved here, in the caller's process (the server may run in another folder,
    and ``/dev/stdout`` there is not the caller's); ``SnapshotError`` for something other than a regular
    file."""
    if path is None:
        return None
    return str(caller_target(path, verb))


def _rebuild(
    address: str,
    authkey: bytes | None,
    cache: bool,
    timeout: float = CALL_TIMEOUT,
    restart: dict[str, Any] | None = None,
) -> State:
    return State(address, authkey, cache=cache, timeout=timeout, restart=restart)


def connect(
    address: object = None,
    authkey: bytes | None = None,
    *,
    cache: bool = True,
    namespace: str | None = None,
    lease: float | None = None,
    timeout: float = CALL_TIMEOUT,
) -> State:
    """Connect to a running server and return a ``State`` handle.

    ``address`` and ``authkey`` default to ``SHAREDSTATE_ADDRESS`` and ``SHAREDSTATE_AUTHKEY``, which
    ``StateServer.start()`` exports to child processes. Given an address of a Unix socket and no key,
    the key is read from ``ADDRESS.key``. Raises ``ServerUnavailable`` when no server answers (within
    5 seconds, or ``timeout`` when shorter) and ``AccessDenied`` when the key is refused.

    ``timeout`` (seconds, default 30, at most 86400) is the deadline of one call, connecting included: a server that
    stops answering (stopped with SIGSTOP, a frozen host) makes the call raise ``ServerUnavailable``
    after it instead of hanging. A wait for a lock is not cut short by it: the server keeps a waiting
    caller informed, and the wait lasts as long as the lock's own timeout says. If the server crashes
    and its owner starts it again, a call is sent again on a new connection until the new server
    answers, within ``timeout`` seconds; writes carry a request id, so one the crashed server applied
    is answered again, never applied twice. ``TypeError``/``ValueError`` for a timeout that is not a
    positive number of at most a day.

    A ``redis://``, ``rediss://`` or ``unix://`` URL (given, or in ``SHAREDSTATE_ADDRESS``) connects to
    Redis or Valkey instead, with the keys of ``namespace`` and locks leased for ``lease`` seconds
    (``sharedstate.backends.redis.connect``).

    >>> state = sharedstate.connect()          # doctest: +SKIP
    >>> state = sharedstate.connect("redis://localhost:6379/0", namespace="myapp")  # doctest: +SKIP
    """
    from sharedstate.backends import (
        redis as _redis,  # the Redis backend (redis-py itself is imported only for a Redis URL)
    )

    timeout = check_call_timeout(timeout)
    redis_state = _redis.connect(address, authkey, cache=cache, namespace=namespace, lease=lease, timeout=timeout)
    if redis_state is not None:
        return redis_state
    parsed, key = resolve(address, authkey)
    state = State(parsed, key, cache=cache, timeout=timeout)
    state._pool.get()  # connect now: fail here, not at the first call
    return state
