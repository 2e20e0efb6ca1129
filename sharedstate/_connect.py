"""``sharedstate.connect()``: a ``State`` on whatever backend the address names."""

from __future__ import annotations

from sharedstate._state import State
from sharedstate.backends import open_backend
from sharedstate.wire.addresses import CALL_TIMEOUT


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

    ``timeout`` (seconds, default 30, at most 86400) is the deadline of one call, connecting included: a
    server that stops answering (stopped with SIGSTOP, a frozen host) makes the call raise
    ``ServerUnavailable`` after it instead of hanging. A wait for a lock is not cut short by it: the
    server keeps a waiting caller informed, and the wait lasts as long as the lock's own timeout says.
    If the server crashes and its owner starts it again, a call is sent again on a new connection until
    the new server answers, within ``timeout`` seconds; writes carry a request id, so one the crashed
    server applied is answered again, never applied twice. ``TypeError``/``ValueError`` for a timeout
    that is not a positive number of at most a day.

    A ``redis://``, ``rediss://`` or ``unix://`` URL (given, or in ``SHAREDSTATE_ADDRESS``) connects to
    Redis or Valkey instead, with the keys of ``namespace`` and locks leased for ``lease`` seconds
    (``sharedstate.backends.redis``); ``cache`` does not apply there.

    >>> state = sharedstate.connect()          # doctest: +SKIP
    >>> state = sharedstate.connect("redis://localhost:6379/0", namespace="myapp")  # doctest: +SKIP
    """
    return State(open_backend(address, authkey, cache=cache, namespace=namespace, lease=lease, timeout=timeout))
