"""What the owner tells a new server process, and how the process tells it that its final save failed."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sharedstate.persistence.schedule import SaveEvery
from sharedstate.wire.addresses import Address


@dataclass
class ServerConfig:
    """What the owner tells a new server process."""

    address: Address
    authkey: bytes
    write_key_file: bool
    owner_pid: int | None
    owner_create_time: float | None
    path: str | None = None
    save_every: SaveEvery = None
    durability: str = "snapshot"
    journal_fsync: str = "everysec"
    log_level: int = logging.WARNING
    #: Where the process writes, as it exits, whether its final save failed (a pipe to the owner).
    report_fd: int | None = None
    #: Where the process sends its log records, for the owner's logging to handle (a pipe to the owner;
    #: ``None``: they go to its stderr).
    log_fd: int | None = None
    #: Where the lock table is recorded, in a folder only this user may write, so a server process
    #: started again after a crash holds the same locks (``None``: locks do not survive a crash).
    lock_file: str | None = None
    #: The owner starts this server again if it crashes: clients then retry their calls (``info``).
    restart: bool = False


#: The exit status of a server process that stopped as asked but could not write its final snapshot.
EXIT_SAVE_FAILED = 3
