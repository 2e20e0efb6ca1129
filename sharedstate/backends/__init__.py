"""Where the dictionary lives: the backends a ``State`` delegates to.

``base.Backend`` is the protocol; ``local`` talks to a sharedstate server process, ``redis`` to a Redis or
Valkey server (redis-py is imported only when a Redis URL is used). ``sharedstate.connect()`` picks one
from the address.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from sharedstate.backends.base import Backend
from sharedstate.wire.addresses import CALL_TIMEOUT, ENV_ADDRESS, check_call_timeout


def _open_local(
    address: object,
    authkey: bytes | None,
    *,
    timeout: float,
    cache: bool = True,
    namespace: None = None,
    lease: None = None,
) -> Backend:
    from sharedstate.backends.local import open_local

    if namespace is not None or lease is not None:
        raise TypeError("namespace and lease are options of a Redis state: give a redis://, rediss:// or unix:// URL")
    return open_local(address, authkey, cache=cache, timeout=timeout)


def _open_redis(
    address: object,
    authkey: bytes | None,
    *,
    timeout: float,
    cache: bool = True,
    namespace: object = None,
    lease: object = None,
) -> Backend:
    from sharedstate.backends.redis import open_backend  # redis-py itself is imported on first use

    # ``cache`` does not apply: Redis has no client cache.
    return open_backend(address, authkey=authkey, namespace=namespace, lease=lease, timeout=timeout)


#: URL schemes of a Redis (or Valkey) server, as redis-py reads them.
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: URL scheme -> how to open the backend it names; any other address is a local server's.
SCHEMES: dict[str, Callable[..., Backend]] = dict.fromkeys(REDIS_SCHEMES, _open_redis)


def open_backend(address: object = None, authkey: bytes | None = None, **options: Any) -> Backend:
    """The backend ``address`` names (``SHAREDSTATE_ADDRESS`` when it is ``None``), connected; ``options``
    are the keyword arguments of ``sharedstate.connect()``. ``TypeError``/``ValueError`` for a call
    timeout that is not a positive number of at most a day."""
    timeout = check_call_timeout(options.pop("timeout", CALL_TIMEOUT))
    shown = os.environ.get(ENV_ADDRESS) if address is None else address
    scheme = shown.partition("://")[0] if isinstance(shown, str) and "://" in shown else None
    opener = SCHEMES.get(scheme, _open_local) if scheme is not None else _open_local
    return opener(address, authkey, timeout=timeout, **options)
