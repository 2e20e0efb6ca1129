"""sharedstate: one dictionary shared by many processes, kept safe by a lock and across restarts.

>>> import sharedstate
>>> with sharedstate.serve() as state:          # doctest: +SKIP
...     state.incr("hits")
1
"""

from sharedstate._changes import Change
from sharedstate._connect import connect
from sharedstate._errors import (
    AccessDenied,
    LockLost,
    LockTimeout,
    ServerUnavailable,
    SharedStateError,
    SnapshotError,
    StateFileBusy,
)
from sharedstate._lock import Lock
from sharedstate._owner import StateServer, serve
from sharedstate._state import State
from sharedstate._storage import LocalFileStorage
from sharedstate._version import version

from . import aio

__version__ = version()  # the installed metadata's (sharedstate/_version.py)

__all__ = [
    "AccessDenied",
    "Change",
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
