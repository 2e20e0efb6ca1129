"""Where the sweep of shared memory blocks finds this user's blocks: by listing ``/dev/shm`` (Linux), or,
where shared memory cannot be listed (macOS), in a registry of the names this user's servers made.

The registry is the file ``blocks`` in a folder of this user's alone, ``sharedstate-UID`` in the
temporary folder (which macOS makes per user already): one name a line, appended before the block is
made, and the names of blocks that are gone dropped by each sweep (checked again under the registry's
lock, which a server holds from recording its name until its block is made). A folder that is a
symbolic link, belongs to someone else or that others may write is not used (a warning says so): no
name is recorded there and none is read, so no other user can make a sweep retire blocks that are not
this user's; the blocks of killed servers then stay until the machine restarts.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock

from sharedstate._errors import SnapshotError
from sharedstate.persistence.files import private_folder, read_regular, write_atomic

try:
    import _posixshmem
except ImportError:  # no POSIX shared memory here (Windows): no blocks, nothing to sweep
    _posixshmem = None

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

    def add(self, name: str) -> bool:
        """Record ``name``; return whether it was not recorded yet."""
        with self._lock:
            names = self._read()
            if name in names:
                return False
            self._write([*names, name])
            return True

    @contextmanager
    def recording(self, name: str) -> Iterator[None]:
        """Record ``name`` for the block the ``with`` body makes, holding the registry's lock throughout.

        Recorded first: a server killed right after it made its block leaves its name for the next sweep
        (in the other order, a crash between the two would leave a block that no sweep ever finds; a name
        whose block was never made is only dropped by the next sweep). The lock held until the block
        exists keeps a sweep's ``forget`` from seeing the name without its block. If the body fails, the
        name is dropped again when this call recorded it: no block of ours has it (``EEXIST``: another
        user's block, which no sweep of ours would ever remove, nor its name)."""
        with self._lock:
            added = self.add(name)
            try:
                yield
            except BaseException:
                if added:
                    self._write([other for other in self._read() if other != name])
                raise

    def names(self) -> list[str]:
        """The names recorded (those that look like a block name of ours)."""
        with self._lock:
            return self._read()

    def forget(self, gone: Iterable[str]) -> None:
        """Drop the names in ``gone`` whose block is still missing (checked under the lock: a server may
        have made a block of that name since the caller found it gone)."""
        gone = set(gone)
        if gone:
            with self._lock:
                names = self._read()
                kept = [name for name in names if name not in gone or block_exists(name)]
                if kept != names:
                    self._write(kept)

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


def block_exists(name: str) -> bool:
    """Whether a shared memory block ``name`` exists (this user's or another's)."""
    if _posixshmem is None:
        return False
    try:
        fd = _posixshmem.shm_open(name, os.O_RDONLY, mode=0o600)
    except FileNotFoundError:
        return False
    except OSError:  # there, but not ours to open
        return True
    os.close(fd)
    return True


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


__all__ = ["SOURCE", "Registry", "block_exists", "listed", "sweep_source"]
