"""sharedstate: one dictionary shared by many processes, kept safe by a lock and across restarts.

>>> import sharedstate
>>> with sharedstate.serve() as state:          # doctest: +SKIP
...     state.incr("hits")
1
"""

from . import aio
from ._client import State, connect
from ._errors import (
    AccessDenied,
    LockLost,
    LockTimeout,
    ServerUnavailable,
    SharedStateError,
    SnapshotError,
    StateFileBusy,
)
from ._lock import Lock
from ._server import StateServer, serve
from ._storage import LocalFileStorage

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "LocalFileStorage",
    "Lock",
    "LockLost",
    "LockTimeout",
    "ServerUnavailable",
    "SharedStateError",
    "SnapshotError",
    "State",
    "StateFileBusy",
    "StateServer",
    "__version__",
    "aio",
    "connect",
    "serve",
]
