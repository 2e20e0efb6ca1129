"""The journal (``durability="journal"``): every change is appended to ``PATH.journal`` before its call
returns, and replayed after the snapshot when a server starts.

A journal file holds a header line and one record a line, each ``CRC32 JSON``. Its header names its
generation. A save of the server's own file starts a new generation in ``PATH.journal.GEN`` while it
holds the store's mutex, writes the snapshot with that generation in its header, then renames the new
journal over ``PATH.journal`` (the journal it replaces, which ends where the new snapshot starts, is
kept as ``PATH.journal.GEN`` of its own generation). At start, the records of every journal whose
generation is not older than the snapshot's are replayed, in order, so a crash at any point of a save
replays each change exactly once.

The snapshot's backup (``PATH.bak``, the snapshot before) is of an older generation: a save removes
only the journals older than the backup's, so a start from the backup (when the snapshot is missing)
replays the journals from its generation on, exactly once. If one of them is missing, the start is
refused rather than replaying later changes over a gap. A server starts its journal at the generation of
the snapshot it restored when there is no journal of that generation yet (after a clean stop), so the
generations beside a snapshot have no gaps.

A torn last line (a crash mid-write: no newline at its end) is dropped; any complete line that is bad
is an error, and so is a damaged header: the server then refuses to start and leaves the file as it is.
Only a header that a crash cut short (a file no longer than a header line that is empty, zeros, or the
start of a header line) marks a file that holds nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sharedstate._errors import SnapshotError
from sharedstate.persistence.codec import encode, object_hook
from sharedstate.persistence.files import check_slot, fsync_dir, fsync_file, read_regular

log = logging.getLogger(__name__)

FORMAT = "sharedstate-journal"
#: How often ``journal_fsync="everysec"`` flushes the journal to the disk.
EVERY_S = 1.0


def journal_path(snapshot: Path) -> Path:
    return snapshot.with_name(snapshot.name + ".journal")


#: Names per call of the JSON encoder when a record holds a large mapping (an ``update``).
CHUNK = 10_000


def _line(obj: Any) -> bytes:
    body = _json(obj).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _json(obj: Any) -> str:
    """``obj`` as compact JSON. A record ending in a large mapping is written in pieces of ``CHUNK``
    names: the C encoder holds the GIL for a whole call, so one call over 500,000 names would stop
    every other thread of the server for a few hundred milliseconds. The text is the same."""
    dumps = functools.partial(json.dumps, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    if type(obj) is not list or not obj or type(obj[-1]) is not dict or len(obj[-1]) <= CHUNK:
        return dumps(obj)
    items = list(obj[-1].items())
    pieces = [dumps(dict(items[start : start + CHUNK]))[1:-1] for start in range(0, len(items), CHUNK)]
    head = dumps(obj[:-1])[:-1]  # '["update"' (or '[' alone)
    return head + ("," if len(obj) > 1 else "") + "{" + ",".join(pieces) + "}]"


def encode_record(record: list[Any]) -> bytes:
    """The journal line of ``record``: the costly part of journaling, which needs no lock."""
    return _line(encode(record))


def _parse_line(line: bytes) -> Any:
    """The record of one line, or ``None`` if it is damaged."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        return json.loads(body.decode("utf-8"), object_hook=object_hook)
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None


_HEADER_START = b' {"format":"%s","generation":' % FORMAT.encode()


#: The longest header line (a generation of 20 digits): a longer file is never a torn header.
_HEADER_MAX = len(_HEADER_START) + 8 + 20 + 2


def _torn_header(raw: bytes) -> bool:
    """Whether ``raw`` (a whole file) is what a crash while writing a header leaves: nothing, zeros, or
    the start of a header line (no newline yet), and no longer than a header line. Such a file never
    held a record; a longer one did (its start may be zeroed by damage), so it is never taken for one."""
    if len(raw) > _HEADER_MAX:
        return False
    if not raw.strip(b"\0"):
        return True
    if b"\n" in raw or not re.fullmatch(rb"[0-9a-f]{0,8}", raw[:8]):
        return False
    rest = raw[8:]
    if len(rest) <= len(_HEADER_START):
        return _HEADER_START.startswith(rest)
    return rest.startswith(_HEADER_START) and re.fullmatch(rb"\d*\}?", rest[len(_HEADER_START) :]) is not None


def _header_generation(line: bytes) -> int | None:
    header = _parse_line(line)
    if not isinstance(header, dict) or header.get("format") != FORMAT or type(header.get("generation")) is not int:
        return None
    return header["generation"]


def _raw(path: Path, limit: int | None = None) -> bytes:
    raw = read_regular(path, limit)
    if raw is None:
        raise SnapshotError(f"{path}: the journal vanished while it was being read", str(path))
    return raw


def read_journal(path: Path) -> tuple[int, list[list[Any]]]:
    """The generation and records of one journal file. Raises ``SnapshotError`` if the header or any
    complete line is damaged; an unfinished last line (no newline: a crash tore it) is dropped with a
    warning."""
    raw = _raw(path)
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline; else an unfinished record
    if not lines:
        raise SnapshotError(f"{path} is not a valid journal: line 1 (the header) is unfinished", str(path))
    generation = _header_generation(lines[0])
    if generation is None:
        raise SnapshotError(f"{path} is not a valid journal: line 1 (the header) is damaged", str(path))
    if tail:
        log.warning("%s: dropped an unfinished last record (%d bytes) left by a crash", path, len(tail))
    records = []
    for number, line in enumerate(lines[1:], start=2):
        record = _parse_line(line)
        if not isinstance(record, list) or not record:
            # Even the last: a line that ends in its newline was written whole, so a crash did not tear it.
            raise SnapshotError(f"{path} is not a valid journal: line {number} is damaged", str(path))
        records.append(record)
    return generation, records


def _candidates(snapshot: Path) -> list[Path]:
    base = journal_path(snapshot)
    pattern = re.compile(re.escape(base.name) + r"(\.\d+)?")
    try:
        return [candidate for candidate in base.parent.iterdir() if pattern.fullmatch(candidate.name)]
    except OSError:
        return []


def scan_journals(snapshot: Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """At start: every journal file of ``snapshot`` by generation, and those a crash left with a torn
    header (they hold nothing). Raises ``SnapshotError`` naming the file for anything else: a damaged
    header, or a journal's name taken by something that is not our regular file."""
    found, torn = [], []
    for candidate in _candidates(snapshot):
        check_slot(candidate)
        raw = _raw(candidate, 4096)  # a header is far shorter (and longer than _HEADER_MAX: not torn)
        first, newline, _ = raw.partition(b"\n")
        generation = _header_generation(first) if newline else None
        if generation is not None:
            found.append((generation, candidate))
        elif _torn_header(raw):
            torn.append(candidate)
        else:
            raise SnapshotError(f"{candidate} is not a valid journal: line 1 (the header) is damaged", str(candidate))
    return sorted(found), torn


def journal_files(snapshot: Path) -> list[tuple[int, Path]]:
    """Every journal file of ``snapshot`` that has a readable header, by generation (for clean-ups: a
    file whose header cannot be read is never removed)."""
    found = []
    for candidate in _candidates(snapshot):
        try:
            raw = read_regular(candidate, 4096)  # never blocks on a FIFO put there
        except SnapshotError:
            continue
        generation = None if raw is None else _header_generation(raw.partition(b"\n")[0])
        if generation is not None:
            found.append((generation, candidate))
    return sorted(found)


def replay_records(
    snapshot: Path, snapshot_generation: int, files: list[tuple[int, Path]] | None = None
) -> Iterator[list[Any]]:
    """The records to replay after a snapshot of ``snapshot_generation``, oldest first (``files``: what
    ``journal_files(snapshot)`` found, if the caller has it already)."""
    for generation, path in journal_files(snapshot) if files is None else files:
        if generation >= snapshot_generation:
            _, records = read_journal(path)
            log.info("replaying %d changes from %s", len(records), path)
            yield from records


class Journal:
    """The open journal of one server."""

    def __init__(self, snapshot: Path, fsync: str) -> None:
        self.snapshot = snapshot
        self.base = journal_path(snapshot)
        self.always = fsync == "always"
        self.generation = 0
        #: The generation of the snapshot at the server's path (the next save makes it the backup): the
        #: journals from it on are kept. Set at start to that of the snapshot the server started from.
        self.saved = 0
        self._fd: int | None = None
        self._file: Path | None = None
        self._written = 0  # records written so far
        self._synced = 0  # records known to be on the disk
        self._sync_lock = threading.Lock()  # taken after the store's mutex, never before it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- writing (called with the store's mutex held) ---------------------------------------------
    def append(self, record: list[Any]) -> int:
        """Write one record; return its number, for ``commit``."""
        return self.append_line(encode_record(record))

    def append_line(self, data: bytes) -> int:
        """Write one record encoded by ``encode_record`` (maybe before the store's mutex was taken: the
        order of the lines is the order of these calls); return its number, for ``commit``."""
        assert self._fd is not None
        view = memoryview(data)
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except BaseException:
            # A record written in part (a full disk) must not stay in front of the next one.
            os.ftruncate(self._fd, start)
            raise
        self._written += 1
        return self._written

    def start_generation(self, generation: int) -> None:
        """Switch to a new journal file of ``generation`` (``PATH.journal.GEN`` until the snapshot that
        covers the old one is written). The old file is flushed to the disk first."""
        name = self.base if self._fd is None and not self.base.exists() else Path(f"{self.base}.{generation}")
        # A new file, never one that is there already (planted by someone else, or a link to one).
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(name, flags, 0o600)
        try:
            os.write(fd, _line({"format": FORMAT, "generation": generation}))
            fsync_file(fd)
        except BaseException:  # a full disk: the old journal stays the open one, this file holds nothing
            os.close(fd)
            _remove(name)
            raise
        with self._sync_lock:
            old = self._fd
            if old is not None:
                fsync_file(old)
                os.close(old)
            self._synced = self._written
            self._fd, self._file, self.generation = fd, name, generation
        fsync_dir(self.base.parent)

    def size(self) -> int | None:
        """The size in bytes of the journal file being written (``PATH.journal``, or ``PATH.journal.GEN``
        during a save and after one that failed); ``None`` when none is open."""
        with self._sync_lock:  # the file cannot be closed, or its descriptor reused, meanwhile
            return None if self._fd is None else os.fstat(self._fd).st_size

    # -- durability ---------------------------------------------------------------------------------
    def commit(self, number: int) -> None:
        """Return once record ``number`` is on the disk (``"always"``); no-op for ``"everysec"``."""
        if self.always and number > self._synced:
            self._sync()

    def _sync(self) -> None:
        with self._sync_lock:
            target = self._written
            if self._fd is not None and target > self._synced:
                fsync_file(self._fd)
                self._synced = target

    def start_flusher(self) -> None:
        if not self.always:
            self._thread = threading.Thread(target=self._flush_every_second, name="sharedstate-journal", daemon=True)
            self._thread.start()

    def _flush_every_second(self) -> None:
        while not self._stop.wait(EVERY_S):
            try:
                self._sync()
            except OSError as exc:
                log.error("flushing the journal %s failed: %s", self._file, exc)

    # -- after a save -------------------------------------------------------------------------------
    def covered(self, generation: int) -> None:
        """The snapshot of ``generation`` is on the disk, and the file it replaced (of generation
        ``self.saved``) is its backup now. The journal that ends at this snapshot is kept under its own
        generation, ``PATH.journal.GEN``, with every other journal the backup needs (from its generation
        on): a start from the backup replays them all, exactly once. Older journals are removed."""
        keep_from, self.saved = self.saved, generation
        if self._file is not None and self._file != self.base and self.generation == generation:
            for older, path in journal_files(self.snapshot):
                if path == self.base and older < generation:
                    os.replace(path, Path(f"{self.base}.{older}"))
            os.replace(self._file, self.base)
            self._file = self.base
        for older, path in journal_files(self.snapshot):
            if older < keep_from and path != self._file:
                _remove(path)
        fsync_dir(self.base.parent)

    def close(self, remove: bool) -> None:
        """Stop; with ``remove`` (the final snapshot holds everything) delete the open journal, which
        holds nothing the snapshot lacks (those the backup needs stay); of a journal never opened (a
        server without journaling that folded them into its snapshot), delete every journal file."""
        self._stop.set()
        with self._sync_lock:
            if self._fd is not None:
                fsync_file(self._fd)
                os.close(self._fd)
                self._fd = None
        if remove:
            for _, path in journal_files(self.snapshot):
                if self._file is None or path == self._file:
                    _remove(path)


def _remove(path: Path) -> None:
    """Delete a journal file that is no longer needed; one that cannot be deleted (a file another user
    put there, in a folder with the sticky bit) is left with a warning: the save that covered it
    succeeded all the same."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s, which is no longer needed: %s", path, exc.strerror or exc)
