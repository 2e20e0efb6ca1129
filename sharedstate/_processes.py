"""Whether a process is alive: the one question the server (lock holders, clients), the client (a
restarting server's owner) and the version table (a dead server's block) all ask."""

from __future__ import annotations

import psutil


def process_alive(pid: int, create_time: float | None) -> bool:
    """Whether ``pid`` is a live process, and the same one that had ``create_time`` (pids are reused).
    A zombie (exited, not yet reaped) counts as dead; a process we may not inspect counts as alive."""
    try:
        process = psutil.Process(pid)
        if create_time is not None and process.create_time() != create_time:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
