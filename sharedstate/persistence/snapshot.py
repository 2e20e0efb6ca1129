"""Snapshot files: atomic writes with a backup, reading (ours and Pode's), and ownership.

A save writes a temporary file in the same folder (mode 0600), flushes and fsyncs it, hard-links the
current file to ``NAME.bak`` (so a good snapshot stays in place at every instant), renames the temporary
file over the snapshot, and fsyncs the folder. A crash at any moment leaves the old or the new file.

The header (the file's first line) carries ``"sha256"``: the SHA-256 of the whole file as written with
those 64 digits all ``0``. It is written as that placeholder, the digest is taken while the rest of the
file streams out, then filled in. So the checksum covers the header's other fields and every section
after it, whatever sections a later version adds. Version 1 files (no checksum) are still read.
"""

from __future__ import annotations

import codecs
import datetime
import decimal
import hashlib
import json
import math
import os
import re
import stat
import time
from pathlib import Path
from typing import Any, NamedTuple

import filelock

from sharedstate._errors import SnapshotError, StateFileBusy
from sharedstate._values import MAX_TTL_S
from sharedstate.persistence import pode as _pode
from sharedstate.persistence.codec import encode, iter_json_object, object_hook
from sharedstate.persistence.files import backup_path, check_slot, read_regular, remove_stray_temp_files, write_atomic

FORMAT = "sharedstate"
#: 2: the header carries a checksum. 1 (read, never written): no checksum.
VERSION = 2
_READABLE_VERSIONS = (1, 2)
_CHECKSUM_KEY = "sha256"
_PLACEHOLDER = "0" * 64


class Snapshot(NamedTuple):
    """What a snapshot file holds."""

    data: dict[str, Any]
    scopes: dict[str, tuple[str, ...]]
    #: The journal generation the snapshot covers (0 when not written by a journaling server).
    generation: int = 0
    #: Read from another program's format (Pode's): its values are checked before they are stored.
    foreign: bool = False
    #: The format version of one of our files.
    version: int = VERSION
    #: The server's last answer to each client's last write (``wire.answers``), in its own snapshots only.
    answers: dict[str, Any] | None = None
    #: When names expire, as absolute UTC seconds (``State.set(ttl=)``), for the names that do.
    deadlines: dict[str, float] | None = None


#: Where the header is: the first line, which Pode's files never fill (``{`` alone, or their metadata).
_HEADER_SPAN = 4096
#: Either mark makes a file ours: a damaged bit can spoil only one of them, so a damaged header of ours
#: is never taken for a Pode file. Both are anchored to the header object as written: the format first
#: at offset 0, the checksum last at the end of the first line (before the comma that ends it). A Pode
#: file written on one line (``Save-PodeState -Compress``) may hold ``"sha256": "<64 hex digits>"`` in a
#: value, never there.
_MARKS = (
    re.compile(rb'\A\{\s*"format"\s*:\s*"sharedstate"'),
    re.compile(rb'"%s"\s*:\s*"[0-9a-f]{64}"\s*,?\s*\Z' % _CHECKSUM_KEY.encode()),
)
_CHECKSUM = re.compile(rb'"%s"\s*:\s*"([0-9a-f]{64})"\s*,?\s*\Z' % _CHECKSUM_KEY.encode())


def _first_line(raw: bytes) -> bytes:
    return raw[:_HEADER_SPAN].split(b"\n", 1)[0]


def has_our_header(raw: bytes) -> bool:
    """Whether ``raw`` starts with a sharedstate header, even a damaged one."""
    line = _first_line(raw)
    return any(mark.search(line) for mark in _MARKS)


def check_checksum(raw: bytes) -> bool | None:
    """``None`` if the header has no checksum, else whether the checksum matches the content."""
    match = _CHECKSUM.search(_first_line(raw))
    if match is None:
        return None
    start, end = match.span(1)
    digest = hashlib.sha256()
    digest.update(raw[:start])
    digest.update(_PLACEHOLDER.encode())
    digest.update(raw[end:])
    return digest.hexdigest() == match.group(1).decode()


class _Sealer:
    """Hashes a snapshot's text as it streams out, then fills the digest into the header."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.offset = -1  # of the placeholder, in bytes from the start of the file

    def pieces(self, pieces: Any) -> Any:
        for number, piece in enumerate(pieces):
            if number == 0:
                self.offset = len(piece.encode("utf-8")) - len(_PLACEHOLDER) - 1  # the header ends in 0..0"
            self.digest.update(piece.encode("utf-8"))
            yield piece

    def finish(self, fd: int) -> None:
        assert self.offset > 0
        os.pwrite(fd, self.digest.hexdigest().encode(), self.offset)


def snapshot_pieces(
    data: dict[str, Any],
    scopes: dict[str, tuple[str, ...]],
    generation: int = 0,
    answers: dict[str, Any] | None = None,
    deadlines: dict[str, float] | None = None,
) -> Any:
    """The text of a snapshot file, in pieces: the header (its first line, the checksum placeholder
    last), the scopes, the server's last answers (in its own snapshots), then one name per line."""
    saved_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "saved_at": saved_at, "count": len(data)}
    if generation:
        header["journal"] = generation
    header[_CHECKSUM_KEY] = _PLACEHOLDER
    yield json.dumps(header)[:-1]
    scope_lists = {name: list(scope) for name, scope in scopes.items() if name in data}
    yield ',\n"scopes": ' + json.dumps(encode(scope_lists), ensure_ascii=False)
    if deadlines:
        kept = {name: deadline for name, deadline in deadlines.items() if name in data}
        yield ',\n"deadlines": ' + json.dumps(kept, ensure_ascii=False, allow_nan=False)
    if answers:
        yield ',\n"answers": ' + json.dumps(encode(answers), ensure_ascii=False, allow_nan=False)
    yield ',\n"names": '
    yield from iter_json_object(data)
    yield "}\n"


def write_snapshot(
    path: Path,
    data: dict[str, Any],
    scopes: dict[str, tuple[str, ...]],
    generation: int = 0,
    answers: dict[str, Any] | None = None,
    ours: bool = True,
    deadlines: dict[str, float] | None = None,
) -> None:
    """``ours``: ``path`` is the server's own file, which must be a file of this user (a path a caller
    named may be another user's file, which the caller chose)."""
    sealer = _Sealer()
    pieces = sealer.pieces(snapshot_pieces(data, scopes, generation, answers, deadlines))
    write_atomic(path, pieces, finish=sealer.finish, ours=ours)


def _decode_text(raw: bytes, path: Path) -> str:
    if raw.startswith(codecs.BOM_UTF8):
        encoding, raw = "utf-8", raw[len(codecs.BOM_UTF8) :]
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"  # what Windows PowerShell 5.1's Out-File writes
    else:
        encoding = "utf-8"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise SnapshotError(f"{path} is not a valid snapshot: not {encoding} text ({exc.reason})", str(path)) from None


def read_snapshot(path: Path) -> Snapshot | None:
    """The values and scopes in ``path``; ``None`` for a missing file or one that is empty or only white
    space. Raises ``SnapshotError`` naming the file and the reason for anything else that is not valid.
    """
    raw = read_regular(path)
    if raw is None:
        return None
    ours = has_our_header(raw)
    if ours:
        valid = check_checksum(raw)
        if valid is False:
            raise SnapshotError(f"{path} is not a valid snapshot: its checksum does not match its content", str(path))
    text = _decode_text(raw, path)
    if not text.strip():
        return None
    try:
        if ours:
            snapshot = _ours(json.loads(text, object_hook=object_hook))
            if valid is None and snapshot.version != 1:
                raise ValueError(f"the header has no {_CHECKSUM_KEY!r} checksum")
            return snapshot
        return parse_snapshot(text)
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:  # any shape of bad data
        reason = f"invalid JSON ({exc})" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise SnapshotError(f"{path} is not a valid snapshot: {reason}", str(path)) from None


def parse_snapshot(text: str) -> Snapshot:
    """A file without our header on its first line: Pode's, or one of ours laid out anew (by hand)."""
    doc = json.loads(text, parse_float=decimal.Decimal)
    if isinstance(doc, dict) and doc.get("format") == FORMAT:
        snapshot = _ours(json.loads(text, object_hook=object_hook))
        if snapshot.version != 1:
            raise ValueError("the header is not on the first line, as written: its checksum cannot be checked")
        return snapshot
    if _pode.is_pode_v2(doc):
        return Snapshot(*_pode.read_v2(doc), foreign=True)
    if isinstance(doc, dict):
        return Snapshot(*_pode.read_legacy(doc), foreign=True)
    raise ValueError(f"expected a JSON object, found {type(doc).__name__}")


def _ours(doc: Any) -> Snapshot:
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object")
    if doc.get("format") != FORMAT:
        raise ValueError(f"the header does not name the {FORMAT!r} format")
    version = doc.get("version")
    if type(version) is not int or version not in _READABLE_VERSIONS:
        raise ValueError(f"unsupported {FORMAT} format version {version!r} (this is version {VERSION})")
    data = doc.get("names")
    scopes = doc.get("scopes", {})
    if not isinstance(data, dict) or not isinstance(scopes, dict):
        raise ValueError("'names' and 'scopes' must be objects")
    checked: dict[str, tuple[str, ...]] = {}
    for name, scope in scopes.items():
        if not isinstance(scope, list) or not all(isinstance(s, str) for s in scope):
            raise ValueError(f"the scopes of {name!r} are not a list of strings")
        if name in data and scope:
            checked[name] = tuple(scope)
    generation = doc.get("journal", 0)
    if type(generation) is not int or generation < 0:
        raise ValueError(f"bad journal generation {generation!r}")
    answers = doc.get("answers", {})
    if not isinstance(answers, dict):
        raise ValueError("'answers' must be an object")
    deadlines = doc.get("deadlines", {})
    if not isinstance(deadlines, dict):
        raise ValueError("'deadlines' must be an object")
    latest = time.time() + MAX_TTL_S
    for name, deadline in deadlines.items():
        if type(deadline) not in (int, float) or not 0 < deadline < math.inf:
            raise ValueError(f"the deadline of {name!r} is not a number of seconds: {deadline!r}")
        # An int of any size is compared exactly: one too large for a float is refused here, never converted.
        if deadline > latest:
            raise ValueError(
                f"the deadline of {name!r} is further than the longest ttl ({MAX_TTL_S:g} s) from now: {deadline!r}"
            )
    kept = {name: float(deadline) for name, deadline in deadlines.items() if name in data}
    return Snapshot(data, checked, generation, version=version, answers=answers, deadlines=kept)


class FileOwnership:
    """A server's claim on its snapshot file for its whole life: a ``filelock`` lock beside it, and the
    owner's pid in ``NAME.owner`` (the lock file itself is truncated by every attempt to take it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lock_file, self._owner_file = self.files(path)
        self._lock = filelock.FileLock(str(lock_file), timeout=0, mode=0o600)

    @staticmethod
    def files(path: Path) -> tuple[Path, Path]:
        """The lock file and the owner file beside ``path`` (filelock opens the lock file with
        ``O_TRUNC``, following links: its place is checked before it is taken)."""
        return path.with_name(path.name + ".lock"), path.with_name(path.name + ".owner")

    def acquire(self) -> None:
        self._claim_lock_file()
        try:
            self._lock.acquire()
        except filelock.Timeout:
            pid: int | None
            try:
                pid = int(read_regular(self._owner_file, 64) or b"")  # never blocks on a FIFO put there
            except (OSError, ValueError):  # SnapshotError is a ValueError
                pid = None
            raise StateFileBusy(
                f"{self.path} is in use by another sharedstate server (pid {pid if pid else 'unknown'})",
                str(self.path),
                pid,
            ) from None
        remove_stray_temp_files(self.path.parent, f".{self.path.name}.")
        try:
            write_atomic(self._owner_file, [f"{os.getpid()}\n"], backup=False)
        except OSError:
            pass  # only for the error message of a second server

    def _claim_lock_file(self) -> None:
        """Create the lock file (or open the one there) without following a link, and check it is a
        regular file of this user, before filelock opens it with ``O_TRUNC``: a check of a missing file
        followed by filelock's own open would leave a moment in which another user could plant a symbolic
        link there. Once the file exists, nobody else can swap it in a sticky folder such as /tmp."""
        lock_file = Path(self._lock.lock_file)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(lock_file, flags, 0o600)
        except OSError as exc:
            raise SnapshotError(f"cannot use {lock_file}: {exc.strerror}", str(lock_file)) from None
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            check_slot(lock_file)  # names what is wrong
            raise SnapshotError(f"cannot use {lock_file}: it is not a regular file of this user", str(lock_file))

    def release(self) -> None:
        try:
            if (read_regular(self._owner_file, 64) or b"").strip() == str(os.getpid()).encode():
                self._owner_file.unlink()
        except (OSError, SnapshotError):  # a FIFO or link put there is refused, never read: left alone
            pass
        self._lock.release(force=True)


__all__ = ["FileOwnership", "Snapshot", "backup_path", "read_snapshot", "write_snapshot"]
