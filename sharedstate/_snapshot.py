"""Snapshot files: atomic writes with a backup, reading (ours and Pode's), and ownership.

A save writes a temporary file in the same folder (mode 0600), flushes and fsyncs it, hard-links the
current file to ``NAME.bak`` (so a good snapshot stays in place at every instant), renames the temporary
file over the snapshot, and fsyncs the folder. A crash at any moment leaves the old or the new file.
"""

from __future__ import annotations

import codecs
import datetime
import decimal
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import filelock

from . import _pode
from ._codec import encode, iter_json_object, object_hook
from ._errors import SnapshotError, StateFileBusy
from ._files import backup_path, remove_stray_temp_files, write_atomic

log = logging.getLogger("sharedstate")

FORMAT = "sharedstate"
VERSION = 1


class Snapshot(NamedTuple):
    """What a snapshot file holds."""

    data: dict[str, Any]
    scopes: dict[str, tuple[str, ...]]
    #: The journal generation the snapshot covers (0 when not written by a journaling server).
    generation: int = 0
    #: Read from another program's format (Pode's): its values are checked before they are stored.
    foreign: bool = False
    #: The server's last answer to each client's last write (``_answers``), in its own snapshots only.
    answers: dict[str, Any] | None = None


_OURS = re.compile(r'\s*\{\s*"format"\s*:\s*"sharedstate"')


def snapshot_pieces(
    data: dict[str, Any],
    scopes: dict[str, tuple[str, ...]],
    generation: int = 0,
    answers: dict[str, Any] | None = None,
) -> Any:
    """The text of a snapshot file, in pieces: the header, the scopes, the server's last answers (in
    its own snapshots), then one name per line."""
    saved_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "saved_at": saved_at, "count": len(data)}
    if generation:
        header["journal"] = generation
    yield json.dumps(header)[:-1]
    scope_lists = {name: list(scope) for name, scope in scopes.items() if name in data}
    yield ',\n"scopes": ' + json.dumps(encode(scope_lists), ensure_ascii=False)
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
) -> None:
    write_atomic(path, snapshot_pieces(data, scopes, generation, answers))


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
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise SnapshotError(f"{path} is not a valid snapshot: it is a directory", str(path)) from None
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc.strerror}", str(path)) from None
    text = _decode_text(raw, path)
    if not text.strip():
        return None
    try:
        return parse_snapshot(text)
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:  # any shape of bad data
        reason = f"invalid JSON ({exc})" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise SnapshotError(f"{path} is not a valid snapshot: {reason}", str(path)) from None


def parse_snapshot(text: str) -> Snapshot:
    if _OURS.match(text):
        return _ours(json.loads(text, object_hook=object_hook))
    doc = json.loads(text, parse_float=decimal.Decimal)
    if isinstance(doc, dict) and doc.get("format") == FORMAT:  # ours, but not as we write it
        return _ours(json.loads(text, object_hook=object_hook))
    if _pode.is_pode_v2(doc):
        return Snapshot(*_pode.read_v2(doc), foreign=True)
    if isinstance(doc, dict):
        return Snapshot(*_pode.read_legacy(doc), foreign=True)
    raise ValueError(f"expected a JSON object, found {type(doc).__name__}")


def _ours(doc: Any) -> Snapshot:
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object")
    version = doc.get("version")
    if version != VERSION:
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
    return Snapshot(data, checked, generation, answers=answers)


class FileOwnership:
    """A server's claim on its snapshot file for its whole life: a ``filelock`` lock beside it, and the
    owner's pid in ``NAME.owner`` (the lock file itself is truncated by every attempt to take it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = filelock.FileLock(str(path) + ".lock", timeout=0, mode=0o600)
        self._owner_file = path.with_name(path.name + ".owner")

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except filelock.Timeout:
            pid: int | None
            try:
                pid = int(self._owner_file.read_text().strip())
            except (OSError, ValueError):
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

    def release(self) -> None:
        try:
            if self._owner_file.read_text().strip() == str(os.getpid()):
                self._owner_file.unlink()
        except OSError:
            pass
        self._lock.release(force=True)


__all__ = ["FileOwnership", "Snapshot", "backup_path", "read_snapshot", "write_snapshot"]
