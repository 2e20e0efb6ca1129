"""``LocalFileStorage``: durable key-value storage in a folder, no server (the Quix SDK's storage API).

Each key is one file, written atomically (temporary file, fsync, rename, fsync of the folder) before
``set`` returns. File names never come from the key's text as such, so no key can escape the folder or
collide with another one that differs only in case: a key's UTF-8 bytes in hex (``k-….json``), or, for
long keys, a SHA-256 of them (``h-….json``), with the key itself kept inside the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import filelock

from sharedstate._errors import SnapshotError
from sharedstate._values import check_text, check_value
from sharedstate.persistence.codec import encode, object_hook
from sharedstate.persistence.files import fsync_dir, remove_stray_temp_files, write_atomic

#: Longest hex-encoded key kept in a file name (name limits are 255 bytes on common file systems).
_MAX_HEX = 200
_ENTRY = re.compile(r"([kh])-([0-9a-f]*)\.json")


def _file_name(key: str) -> str:
    raw = key.encode("utf-8")
    hexed = raw.hex()
    if len(hexed) <= _MAX_HEX:
        return f"k-{hexed}.json"
    return f"h-{hashlib.sha256(raw).hexdigest()}.json"


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a storage key must be a str, not {type(key).__name__}: {key!r}")
    return check_text(str.__str__(key), "a storage key")


class LocalFileStorage:
    """Durable key-value storage in ``storage_directory`` (default ``./state``), shared safely by any
    number of processes, with no server.

    >>> storage = sharedstate.LocalFileStorage()            # doctest: +SKIP
    >>> storage.set("price", 1.5); storage.get("price")
    1.5

    Values are those a ``State`` stores, and come back with their exact types. Every ``set`` and
    ``remove`` is on the disk before it returns, so it survives ``kill -9`` right after.
    """

    def __init__(self, storage_directory: str | os.PathLike[str] | None = None, auto_create_dir: bool = True):
        if storage_directory is None:
            storage_directory = "state"
        if not isinstance(storage_directory, (str, os.PathLike)):
            raise TypeError(f"storage_directory must be a str or os.PathLike, not {type(storage_directory).__name__}")
        self.directory = Path(os.fspath(storage_directory)).absolute()
        if not self.directory.is_dir():
            if not auto_create_dir:
                raise FileNotFoundError(f"storage directory {self.directory} does not exist (auto_create_dir=False)")
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        #: Serialises changes between processes (and threads): each set/remove/clear is atomic.
        self._lock = filelock.FileLock(str(self.directory / ".lock"), mode=0o600, thread_local=False)
        with self._lock:
            remove_stray_temp_files(self.directory, ".k-")
            remove_stray_temp_files(self.directory, ".h-")

    def __repr__(self) -> str:
        return f"<sharedstate.LocalFileStorage {self.directory}>"

    # -- the Quix calls -----------------------------------------------------------------------------
    def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``; on the disk before it returns. Raises ``TypeError`` for a key
        that is not a ``str`` or a value that cannot be stored (nothing is written then)."""
        key = _check_key(key)
        check_value(key, value)
        text = json.dumps({"key": key, "value": encode(value)}, ensure_ascii=False, allow_nan=False)
        with self._lock:
            write_atomic(self.directory / _file_name(key), [text], backup=False)

    def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default``. A damaged entry raises ``SnapshotError`` naming the
        key and its file."""
        key = _check_key(key)
        path = self.directory / _file_name(key)
        entry = self._read(path)
        if entry is None:
            return default
        if entry[0] != key:
            raise SnapshotError(f"{path} holds key {entry[0]!r}, not {key!r}", str(path))
        return entry[1]

    def remove(self, key: str) -> None:
        """Remove ``key`` (nothing happens if it is not there); on the disk before it returns."""
        key = _check_key(key)
        with self._lock:
            try:
                os.unlink(self.directory / _file_name(key))
            except FileNotFoundError:
                return
            fsync_dir(self.directory)

    def contains_key(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        return (self.directory / _file_name(_check_key(key))).exists()

    containsKey = contains_key  # noqa: N815 (the Quix spelling)

    def get_all_keys(self) -> set[str]:
        """Every stored key, as a set."""
        keys = set()
        for path in self.directory.iterdir():
            match = _ENTRY.fullmatch(path.name)
            if match is None:
                continue
            if match.group(1) == "k":
                try:
                    keys.add(bytes.fromhex(match.group(2)).decode("utf-8"))
                except ValueError:  # not a name this class writes: someone else's file
                    continue
            else:
                entry = self._read(path)
                if entry is not None:
                    keys.add(entry[0])
        return keys

    getAllKeys = get_all_keys  # noqa: N815 (the Quix spelling)

    def clear(self) -> None:
        """Remove every key."""
        with self._lock:
            for path in self.directory.iterdir():
                if _ENTRY.fullmatch(path.name):
                    try:
                        path.unlink()
                    except FileNotFoundError:
                        pass
            fsync_dir(self.directory)

    # -- internals ----------------------------------------------------------------------------------
    def _read(self, path: Path) -> tuple[str, Any] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw.decode("utf-8"), object_hook=object_hook)
            if not isinstance(doc, dict) or not isinstance(doc.get("key"), str) or "value" not in doc:
                raise ValueError("not a storage entry")
        except (ValueError, RecursionError) as exc:
            raise SnapshotError(f"the storage entry {path} is damaged: {exc}", str(path)) from None
        return doc["key"], doc["value"]
