"""The Redis (or Valkey) backend: a state whose dictionary lives in a Redis database.

``sharedstate.connect("redis://host:6379/0")`` (also ``rediss://`` and ``unix://`` URLs, and
``SHAREDSTATE_ADDRESS`` holding one) gives a ``State`` over a ``RedisBackend``: the same calls, checks,
value types (through the snapshot codec) and errors as on the local server, on keys of one namespace:

- ``NAMESPACE:data``, a hash of name to the value as typed JSON (the snapshot codec's), and
  ``NAMESPACE:scopes``, a hash of name to its scopes as a JSON list (only names that have scopes);
- ``NAMESPACE:lock`` and ``NAMESPACE:lock:NAME``, the locks (a string: holder pid, process token and
  owner, with a lease), and ``NAMESPACE:wake[:NAME]``, a list a release pushes to so a waiter wakes;
- ``NAMESPACE:deadlines``, a sorted set of name by its deadline (UTC seconds of Redis' ``TIME``), for
  the names that expire (``scripts.PRELUDE``);
- ``NAMESPACE:changes``, the stream of changes for watchers, written while ``NAMESPACE:watching`` (a hash,
  leased and renewed by the watching processes: the stream's cap, the number of its last entry, and a
  ``p:TOKEN`` field per watching process with the cap it needs) exists, and ``NAMESPACE:watchers``, the
  processes that watch, by the deadline of their registration (``watch``).

Every call is atomic in Redis: a single command, a ``MULTI``/``EXEC`` block, or a Lua script
(``scripts``), and most are one round trip. The exceptions: ``names()`` walks the hash by ``HSCAN``
steps, one round trip per ``SCAN_COUNT`` names; and an ``incr``, ``append`` or ``compare_and_set`` that
the script cannot finish exactly (a ``Decimal``, an integer beyond ``scripts.EXACT_INT``, Python's
``==`` between different texts such as ``1`` and ``1.0``) is finished in Python by an optimistic
compare-and-swap on the stored text: two more round trips per attempt, attempted again whenever
another client changed the name in between. That keeps ``Decimal``, big integers and Python's
equality exactly as on the local server.

Locks are leased: a ``SET NX PX`` with a token, renewed every third of the lease by a thread of the
holding process (``leases``), released by a script that deletes the key only if it still holds the
token. A dead holder stops renewing, so its lock is free within the lease.

Modules: ``url`` (addresses and options), ``connection`` (redis-py, imported on first use, and its
errors), ``scripts`` (Lua; the reads' in ``read_scripts``), ``stored`` (values, ttls and Redis' clock as
sent and read), ``leases`` (held locks and their renewal), ``locks`` (the lock calls), ``files`` (save,
restore and reads of every name), ``watch`` (watchers and the thread that keeps them registered),
``backend`` (``RedisBackend``).
"""

from __future__ import annotations

from sharedstate.backends.redis.backend import RedisBackend
from sharedstate.backends.redis.connection import REPLY_TIMEOUT
from sharedstate.backends.redis.url import DEFAULT_LEASE, DEFAULT_NAMESPACE, SCHEMES, mask, parse_target, redis_url

__all__ = ["DEFAULT_LEASE", "DEFAULT_NAMESPACE", "SCHEMES", "RedisBackend", "open_backend", "redis_url"]


def open_backend(
    address: object,
    *,
    namespace: object = None,
    lease: object = None,
    timeout: float = REPLY_TIMEOUT,
    authkey: object = None,
) -> RedisBackend:
    """A connected ``RedisBackend`` for the Redis URL ``address`` (or ``SHAREDSTATE_ADDRESS``, when
    ``address`` is ``None``): a ``redis://``, ``rediss://`` or ``unix://`` URL, as
    ``sharedstate.backends.SCHEMES`` sends here.

    ``namespace`` (default ``"sharedstate"``, or ``?namespace=`` in the URL) prefixes every key, so
    several states share one database; ``lease`` (seconds, default 2, or ``?lease=``) bounds how long a
    dead holder's lock stays held. A password goes in the URL (``redis://:PASSWORD@host:6379/0``).

    Raises ``ValueError`` for an address that is not a Redis URL, for an ``authkey`` and for bad options;
    ``ServerUnavailable`` when no Redis server answers (within 5 seconds), ``AccessDenied`` when it refuses
    the credentials, and ``ImportError`` naming ``pip install 'sharedstate[redis]'`` without redis-py. A
    reply that takes longer than ``timeout`` seconds (a Redis server that stopped answering) raises
    ``ServerUnavailable``; lock waits are made of shorter blocking waits, so they are not cut short by it.
    """
    url = redis_url(address)
    if url is None:
        raise ValueError(f"not a Redis URL: {address!r} (expected redis://, rediss:// or unix://)")
    if authkey is not None:
        raise ValueError(
            f"{mask(url)} is a Redis URL: give its password in the URL (redis://:PASSWORD@host), not as authkey"
        )
    backend = RedisBackend(parse_target(url, namespace, lease), timeout)
    backend.connect()
    return backend
