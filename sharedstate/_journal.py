"""The journal (``durability="journal"``): every change is appended to ``PATH.journal`` before its call
returns, and replayed after the snapshot when a server starts.

A journal file holds a header line and one record a line, each ``CRC32 JSON``. Its header names its
generation. A save of the server's own file starts a new generation in ``PATH.journal.GEN`` while it
holds the store's mutex, writes the snapshot with that generation in its header, then renames the new
journal over ``PATH.journal``. At start, the records of every journal whose generation is not older than
the snapshot's are replayed, in order, so a crash at any point of a save replays each change exactly once.

A torn last line (a crash mid-write) is dropped; a bad line before the last is an error.
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

from ._codec import encode, object_hook
from ._errors import SnapshotError
from ._files import fsync_dir

log = logging.getLogger("sharedstate")

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


def read_journal(path: Path) -> tuple[int, list[list[Any]]]:
    """The generation and records of one journal file. Raises ``SnapshotError`` if a line other than the
    last is damaged; a damaged or unfinished last line is dropped with a warning."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline; else an unfinished record
    if tail:
        log.warning("%s: dropped an unfinished last record (%d bytes) left by a crash", path, len(tail))
    if not lines:
        raise SnapshotError(f"{path} is not a valid journal: no header", str(path))
    header = _parse_line(lines[0])
    if not isinstance(header, dict) or header.get("format") != FORMAT or type(header.get("generation")) is not int:
        raise SnapshotError(f"{path} is not a valid journal: bad header", str(path))
    records = []
    for number, line in enumerate(lines[1:], start=2):
        record = _parse_line(line)
        if not isinstance(record, list) or not record:
            if number == len(lines):
                log.warning("%s: dropped a damaged last record (line %d) left by a crash", path, number)
                break
            raise SnapshotError(f"{path} is not a valid journal: line {number} is damaged", str(path))
        records.append(record)
    return header["generation"], records


def journal_files(snapshot: Path) -> list[tuple[int, Path]]:
    """Every journal file of ``snapshot`` that has a readable header, by generation."""
    base = journal_path(snapshot)
    pattern = re.compile(re.escape(base.name) + r"(\.\d+)?")
    found = []
    try:
        candidates = list(base.parent.iterdir())
    except OSError:
        return []
    for candidate in candidates:
        if pattern.fullmatch(candidate.name):
            try:
                with open(candidate, "rb") as f:
                    header = _parse_line(f.readline().rstrip(b"\n"))
            except OSError:
                continue
            if isinstance(header, dict) and type(header.get("generation")) is int:
                found.append((header["generation"], candidate))
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
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o600)
        header = _line({"format": FORMAT, "generation": generation})
        os.write(fd, header)
        os.fsync(fd)
        with self._sync_lock:
            old = self._fd
            if old is not None:
                os.fsync(old)
                os.close(old)
            self._synced = self._written
            self._fd, self._file, self.generation = fd, name, generation
        fsync_dir(self.base.parent)

    # -- durability ---------------------------------------------------------------------------------
    def commit(self, number: int) -> None:
        """Return once record ``number`` is on the disk (``"always"``); no-op for ``"everysec"``."""
        if self.always and number > self._synced:
            self._sync()

    def _sync(self) -> None:
        with self._sync_lock:
            target = self._written
            if self._fd is not None and target > self._synced:
                os.fsync(self._fd)
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
        """The snapshot of ``generation`` is on the disk: older journals are no longer needed."""
        if self._file is not None and self._file != self.base and self.generation == generation:
            os.replace(self._file, self.base)
            self._file = self.base
        for older, path in journal_files(self.snapshot):
            if older < generation and path != self._file:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        fsync_dir(self.base.parent)

    def close(self, remove: bool) -> None:
        """Stop; with ``remove`` (the final snapshot holds everything) delete every journal file."""
        self._stop.set()
        with self._sync_lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
        if remove:
            for _, path in journal_files(self.snapshot):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
