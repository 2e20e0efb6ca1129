"""Where the sweep of shared memory blocks finds this user's blocks: by listing ``/dev/shm`` (Linux), or,
where shared memory cannot be listed (macOS), in a registry of the names this user's servers made.

The registry is the file ``blocks`` in a folder of this user's alone, ``sharedstate-UID`` in the
temporary folder (which macOS makes per user already): one name a line, appended before the block is
made, and the names of blocks that are gone dropped by each sweep. A folder that is a symbolic link,
belongs to someone else or that others may write is not used (a warning says so): no name is recorded
there and none is read, so no other user can make a sweep retire blocks that are not this user's; the
blocks of killed servers then stay until the machine restarts.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import filelock

from sharedstate._errors import SnapshotError
from sharedstate.persistence.files import private_folder, read_regular, write_atomic

log = logging.getLogger(__name__)

#: Where Linux lists the POSIX shared memory blocks.
SHM_DIR = "/dev/shm"
#: A block name as ``versions`` makes them.
_NAME = re.compile(r"/sharedstate-[0-9a-f]{16}")
#: A registry larger than this is not read (it holds one short line per live or unswept block).
_MAX_BYTES = 1 << 20


def sweep_source(has_dev_shm: bool) -> str:
    """Where the sweep finds this user's blocks: ``"listing"`` (of ``/dev/shm``) where that folder exists,
    ``"registry"`` elsewhere."""
    return "listing" if has_dev_shm else "registry"


#: This system's choice.
SOURCE = sweep_source(os.path.isdir(SHM_DIR))


class Registry:
    """The names of the blocks this user's servers made, in ``folder`` (``Registry.open`` checks it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.file = folder / "blocks"
        # Appends and the rewrite of a sweep exclude each other across processes.
        self._lock = filelock.FileLock(str(folder / "blocks.lock"), mode=0o600, thread_local=False)

    @classmethod
    def open(cls, folder: Path | None = None) -> Registry | None:
        """The registry in ``folder`` (default: this user's), made if missing; ``None`` (and a warning) if
        the folder cannot be trusted or made."""
        if folder is None:
            folder = Path(tempfile.gettempdir()) / f"sharedstate-{os.geteuid()}"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            trusted = private_folder(os.lstat(folder))
        except OSError as exc:
            log.warning("cannot keep the names of shared memory blocks in %s: %s", folder, exc.strerror or exc)
            return None
        if not trusted:
            log.warning(
                "%s is not a folder of this user's alone: the shared memory blocks of killed servers are not swept",
                folder,
            )
            return None
        return cls(folder)

    def add(self, name: str) -> None:
        """Record ``name`` (before the block is made, so a server killed right after leaves no block
        unrecorded)."""
        with self._lock:
            names = self._read()
            if name not in names:
                self._write([*names, name])

    def names(self) -> list[str]:
        """The names recorded (those that look like a block name of ours)."""
        with self._lock:
            return self._read()

    def forget(self, gone: Iterable[str]) -> None:
        """Drop the names in ``gone`` (their blocks were removed)."""
        gone = set(gone)
        if gone:
            with self._lock:
                self._write([name for name in self._read() if name not in gone])

    def _write(self, names: list[str]) -> None:
        # Never fatal: a block left unrecorded is only a block the sweep cannot find.
        try:
            write_atomic(self.file, [name + "\n" for name in names], backup=False)
        except (OSError, SnapshotError) as exc:
            log.warning("cannot record the names of shared memory blocks in %s: %s", self.file, exc)

    def _read(self) -> list[str]:
        try:
            raw = read_regular(self.file, _MAX_BYTES)
        except SnapshotError as exc:  # not a regular file (a symbolic link, a device): not ours, ignored
            log.warning("ignoring %s: %s", self.file, exc)
            return []
        if raw is None:
            return []
        return [line for line in raw.decode("ascii", "replace").splitlines() if _NAME.fullmatch(line)]


def listed(uid: int) -> list[str]:
    """The names of the blocks of user ``uid`` that ``/dev/shm`` lists."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    names = []
    for entry in entries:
        if not _NAME.fullmatch("/" + entry):
            continue
        try:
            if os.stat(os.path.join(SHM_DIR, entry)).st_uid != uid:
                continue
        except OSError:
            continue
        names.append("/" + entry)
    return names


__all__ = ["SOURCE", "Registry", "listed", "sweep_source"]
