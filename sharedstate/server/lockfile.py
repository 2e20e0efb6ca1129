"""The server's lock file: who holds which lock, so a server process restarted after a crash rebuilds its
lock table instead of handing a held lock to a second process.

Every change of a holder (taken, taken again, released once, freed) appends one JSON line with the
lock's state after it; the last line about a lock wins. A release of a holder's last count is its own
line (``"r"``): it frees the lock and records, per holder, the request that released it, so a release
sent again after a crash (its answer lost) is told apart from a lock the restart lost (``_lock``). A
holder line may record such a request too (two more fields, the calling thread and the request: the
semaphores record every applied call so), in the same line: a crash cuts a line short, and a line cut
short is dropped whole, so the file never has the request without the count it led to, or the reverse.

The file is mapped in memory (``MAP_SHARED``), so an append is a copy into the kernel's page cache with
no system call, and no fsync: the file must survive a crash of the server process, which the page cache
does, not one of the host (after which no holder is alive anyway). The mapped file has a fixed size;
what follows the last line is zero bytes. When it is full it is rewritten with only the held locks and
the holders' last releases (as at each start), in a file at least ``MIN_BYTES`` large.

The file lives in the server's private folder (made by its owner, mode 0700). It is created with
``O_EXCL``/``O_NOFOLLOW``, mode 0600, and read only when it is a regular file of this user that nobody
else may write; anything else is logged and ignored, never a failed start.
"""

from __future__ import annotations

import itertools
import json
import logging
import mmap
import os
import stat
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]

from sharedstate.persistence.files import private_folder

log = logging.getLogger(__name__)

#: The size of a new lock file (or four times what it holds, if more): appends fill it, then it is
#: rewritten with only the held locks.
MIN_BYTES = 256 * 1024
#: A lock file larger than this is not read (it cannot hold that many locks of a live server).
MAX_READ_BYTES = 64 * 1024 * 1024

_OPEN_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass
class Holder:
    """A held lock as the file recorded it."""

    key: str | None
    #: The holding client: ``(scope, pid, create_time)``, as the server keys its clients.
    client: tuple[str, int, float | None]
    thread: Hashable
    count: int
    lease: float | None


def _persistable(thread: Hashable) -> bool:
    # Thread idents (int) and asyncio task tokens (str): what the clients send. Anything else is not
    # written, and a restart then loses that lock (its holder gets LockLost).
    return type(thread) in (int, str)


# The lines are JSON, put together by hand: json.dumps of the whole record costs several microseconds,
# paid on every acquire and release.
_quote = encode_basestring_ascii
#: The encoded form of each client tuple seen lately (few clients, many lock calls each).
_clients: dict[tuple, str] = {}


def _json(value: object) -> str:
    if value is None:
        return "null"
    if type(value) is str:
        return _quote(value)
    return repr(value)  # int, float: their repr is valid JSON (a lease is finite)


#: ``(calling thread, request)``: a call a holder line records as applied (beside the count it led to).
Done = tuple[Hashable, int]


def _line(
    key: str | None, client: tuple, thread: Hashable, count: int, lease: float | None, done: Done | None = None
) -> bytes:
    encoded = _clients.get(client)
    if encoded is None:
        if len(_clients) > 4096:
            _clients.clear()
        encoded = _clients[client] = _client_json(client)
    request = "" if done is None else f",{_json(done[0])},{done[1]}"
    return f'["h",{_json(key)},{encoded},{_json(thread)},{count},{_json(lease)}{request}]\n'.encode()


def _free_line(key: str | None) -> bytes:
    return f'["f",{_json(key)}]\n'.encode()


def _client_json(client: tuple) -> str:
    scope, pid, ctime = client
    return f"{_quote(scope)},{pid},{json.dumps(ctime)}"


def _released_line(key: str | None, client: tuple, thread: Hashable, request: int) -> bytes:
    encoded = _clients.get(client)
    if encoded is None:
        encoded = _client_json(client)
    return f'["r",{_json(key)},{encoded},{_json(thread)},{request}]\n'.encode()


#: ``(client, thread)`` -> ``(key, request)``: the last lock each holder released itself, and the
#: request id of that release.
Released = dict[tuple[tuple, Hashable], tuple[str | None, int]]


def _released_lines(released: Released) -> Iterable[bytes]:
    for (client, thread), (key, request) in released.items():
        if _persistable(thread):
            yield _released_line(key, client, thread, request)


class LockFile:
    """Appends the lock table's changes to one file (see the module's docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        #: Where the next line goes.
        self._end = 0
        self._failed = False
        #: The folder is not private to this user: no lock file is read or written there.
        self._unsafe = False
        #: The releases ``load`` found (what the lock table needs to answer a release sent again).
        self.released: Released = {}

    # -- start --------------------------------------------------------------------------------------
    def load(self) -> list[Holder]:
        """The locks held when the last server process stopped; ``[]`` when there is no usable file.
        Never raises: a damaged file is logged and read as far as it can be trusted."""
        folder = os.path.dirname(self.path) or "."
        try:
            info = os.lstat(folder)
            private = private_folder(info)
        except OSError:
            private = False
        if not private:
            self._unsafe = True
            log.error("the folder of the lock file %s is not this user's alone: no lock survives a crash", self.path)
            return []
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK)
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("lock file %s cannot be opened (%s): locks held before the restart are lost", self.path, exc)
            return []
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                log.error("lock file %s is not a regular file: ignored, locks held before are lost", self.path)
                return []
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                log.error("lock file %s belongs to another user or others may write it: ignored", self.path)
                return []
            if info.st_size > MAX_READ_BYTES:
                log.error("lock file %s is %d bytes, too large to be ours: ignored", self.path, info.st_size)
                return []
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        except OSError as exc:
            log.error("lock file %s cannot be read (%s): locks held before the restart are lost", self.path, exc)
            return []
        finally:
            os.close(fd)
        lines, _, rest = b"".join(chunks).partition(b"\0")
        if rest.strip(b"\0"):
            log.error("lock file %s has data after its end: that part is damaged and skipped", self.path)
        return self._parse(lines)

    def _parse(self, data: bytes) -> list[Holder]:
        holders: dict[str | None, Holder] = {}
        released: Released = self.released
        released.clear()
        lines = data.split(b"\n")
        torn = lines.pop()  # the part after the last newline: empty, or a write cut short
        if torn:
            log.warning("lock file %s ends in a partial line: dropped", self.path)
        damaged = 0
        for number, raw in enumerate(lines, 1):
            try:
                record = json.loads(raw)
                if record[0] == "f" and len(record) == 2 and (record[1] is None or type(record[1]) is str):
                    holders.pop(record[1], None)
                    continue
                if record[0] == "r":
                    kind, key, scope, pid, ctime, thread, request = record
                    if not (
                        (key is None or type(key) is str)
                        and type(scope) is str
                        and type(pid) is int
                        and (ctime is None or type(ctime) in (int, float))
                        and _persistable(thread)
                        and type(request) is int
                    ):
                        raise ValueError("not a release record")
                    holders.pop(key, None)
                    owner = ((scope, pid, ctime), thread)
                    released.pop(owner, None)  # the latest release last, as the lock table keeps them
                    released[owner] = (key, request)
                    continue
                kind, key, scope, pid, ctime, thread, count, lease, *done = record
                if not (
                    len(done) in (0, 2)
                    and (not done or (_persistable(done[0]) and type(done[1]) is int))
                    and kind == "h"
                    and (key is None or type(key) is str)
                    and type(scope) is str
                    and type(pid) is int
                    and (ctime is None or type(ctime) in (int, float))
                    and _persistable(thread)
                    and type(count) is int
                    and count > 0
                    and (lease is None or (type(lease) in (int, float) and lease > 0))
                ):
                    raise ValueError("not a lock record")
                if done:
                    owner = ((scope, pid, ctime), done[0])
                    released.pop(owner, None)
                    released[owner] = (key, done[1])
            except (ValueError, TypeError, IndexError, KeyError):
                damaged += 1
                if damaged == 1:
                    log.error("lock file %s: line %d is damaged and skipped", self.path, number)
                continue
            holders[key] = Holder(key, (scope, pid, ctime), thread, count, lease)
        if damaged > 1:
            log.error("lock file %s: %d damaged lines skipped in all", self.path, damaged)
        return list(holders.values())

    def start(self, holders: Iterable[Holder], released: Released | None = None) -> None:
        """Begin a fresh file holding ``holders`` (what this server process rebuilt) and ``released``."""
        if self._unsafe:
            return
        self._rewrite(
            itertools.chain(
                _released_lines(released or {}), (_line(h.key, h.client, h.thread, h.count, h.lease) for h in holders)
            )
        )

    # -- changes (called with the lock table's mutex held) -------------------------------------------
    def held(
        self,
        key: str | None,
        client: tuple,
        thread: Hashable,
        count: int,
        lease: float | None,
        done: Done | None = None,
    ) -> bool:
        """Record a holder, and ``done`` (a call of ``client`` applied, which led to ``count``) in the same
        line; ``False`` when the file is full: ``compact`` it (with this change in it)."""
        if done is not None and not _persistable(done[0]):
            done = None
        if _persistable(thread):
            return self._append(_line(key, client, thread, count, lease, done))
        return self._append(_free_line(key))

    def freed(self, key: str | None) -> bool:
        """Record a freed lock; ``False`` when the file is full, as for ``held``."""
        return self._append(_free_line(key))

    def released_by(self, key: str | None, client: tuple, thread: Hashable, request: int) -> bool:
        """Record that the holder released its last count of ``key`` (which frees it) with the release
        ``request``; ``False`` when the file is full, as for ``held``."""
        if _persistable(thread):
            return self._append(_released_line(key, client, thread, request))
        return self._append(_free_line(key))

    def compact(
        self, held: Iterable[tuple[str | None, tuple, Hashable, int, float | None]], released: Released | None = None
    ) -> None:
        """Rewrite the file with only ``held`` (``(key, client, thread, count, lease)`` of each held lock)
        and ``released``. The releases go first: a later holder of the same lock is the one that counts."""
        self._rewrite(itertools.chain(_released_lines(released or {}), (_line(*h) for h in held if _persistable(h[2]))))

    def close(self, remove: bool) -> None:
        """Stop writing; ``remove``: the server stops cleanly, so no lock outlives it."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if remove:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    # -- internals ----------------------------------------------------------------------------------
    def _append(self, line: bytes) -> bool:
        mapped = self._map
        if mapped is None:
            return True  # no file (it could not be made): nothing to keep
        start = self._end
        end = start + len(line)
        if end >= len(mapped):  # one zero byte always ends the lines
            return False
        try:
            mapped[start:end] = line
        except ValueError:  # closed by a server that is stopping: nothing to keep any more
            return True
        self._end = end
        return True

    def _rewrite(self, lines: Iterable[bytes]) -> None:
        """Write a new file beside the old one and put it in its place: a crash at any moment leaves one
        whole file."""
        temp = self.path + ".new"
        data = b"".join(lines)
        size = max(MIN_BYTES, -(-4 * len(data) // mmap.PAGESIZE) * mmap.PAGESIZE)
        mapped = None
        try:
            try:
                os.unlink(temp)  # left by a crash during a rewrite; the folder is this user's alone
            except FileNotFoundError:
                pass
            fd = os.open(temp, _OPEN_NEW, 0o600)
            try:
                # Blocks reserved now: a full disk is an error here, not a SIGBUS at a later append.
                os.posix_fallocate(fd, 0, size)
                mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                mapped[: len(data)] = data
                os.replace(temp, self.path)
            finally:
                os.close(fd)  # the mapping stays
        except (OSError, ValueError) as exc:
            # Without a file no restart can trust, the next server process rebuilds no lock: their holders
            # get LockLost, rather than a stale file keeping locks of live processes held.
            for stale in (mapped, self._map):
                if stale is not None:
                    stale.close()
            self._map = None
            for name in (temp, self.path):
                try:
                    os.unlink(name)
                except OSError:
                    pass
            self._broken(exc)
            return
        if self._map is not None:
            self._map.close()
        self._map, self._end, self._failed = mapped, len(data), False

    def _broken(self, exc: Exception) -> None:
        if not self._failed:
            self._failed = True
            log.error(
                "cannot write the lock file %s (%s): if this server process crashes, the next one frees every "
                "lock (their holders get LockLost)",
                self.path,
                exc,
            )
