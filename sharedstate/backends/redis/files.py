"""The calls of ``RedisBackend`` that write many names at once: ``save`` and ``restore`` (which read and
write snapshot files in the calling process), and the ``MULTI`` block ``restore`` installs
names with."""

from __future__ import annotations

import json
from pathlib import Path

from sharedstate._rules import check_restored, passed_among, past, select_saved
from sharedstate.backends.redis.connection import operation
from sharedstate.backends.redis.connection import text as _text
from sharedstate.backends.redis.scripts import PURGE_BATCH, SCRIPTS
from sharedstate.backends.redis.steps import Command, Operation, Pipeline, Script
from sharedstate.backends.redis.stored import dumps, loads, seconds
from sharedstate.persistence.snapshot import read_snapshot, write_snapshot

#: Fields per HSET inside one MULTI block when many names are written at once.
WRITE_CHUNK = 10_000


def _path(path: str | None, verb: str) -> Path:
    if path is None:
        raise ValueError(
            f"{verb}() on a Redis state needs a path: it has no snapshot file of its own "
            "(Redis' own persistence keeps its data)"
        )
    return Path(path)


class FileCalls:
    """``save``, ``restore`` and ``_write`` of ``RedisBackend``, whose keys they use."""

    _keys: list[str]
    _data_key: str
    _scopes_key: str
    _deadlines_key: str

    @operation
    def save(
        self, path: str | None, include: list[str] | None, exclude: list[str] | None, scopes: tuple[str, ...]
    ) -> Operation:
        """Written in the calling process, in the local server's format (so either backend restores it);
        ``ValueError`` without a path: a Redis state has no file of its own."""
        target = _path(path, "save")
        clock, raw_data, raw_deadlines, raw_scopes = yield Pipeline(
            [*self._everything(), Command("hgetall", (self._scopes_key,))]
        )
        now = seconds(clock)
        deadlines = {_text(name): float(at) for name, at in raw_deadlines}
        stored_scopes = {_text(name): tuple(json.loads(value)) for name, value in raw_scopes.items()}
        stored = {_text(name): raw for name, raw in raw_data.items()}
        stored = {name: raw for name, raw in stored.items() if not past(deadlines.get(name), now)}
        selected = select_saved(stored, stored_scopes, include, exclude, scopes)
        data = {name: loads(raw) for name, raw in selected.items()}
        write_snapshot(target, data, stored_scopes, ours=False, deadlines=deadlines)  # a path the caller chose
        return target

    def _everything(self) -> list[Command]:
        """The commands of a ``MULTI`` block that reads Redis' clock, every name's text and every deadline."""
        return [
            Command("time"),
            Command("hgetall", (self._data_key,)),
            Command("zrange", (self._deadlines_key, 0, -1), {"withscores": True}),
        ]

    @operation
    def restore(self, path: str | None, merge: bool) -> Operation:
        """Read in the calling process; installed in one ``MULTI`` block (``merge=False``: in place of
        everything), without the names whose deadline has passed by Redis' clock. ``ValueError`` without
        a path."""
        target = _path(path, "restore")
        snapshot = read_snapshot(target)
        if snapshot is None:
            return 0
        check_restored(snapshot.data, snapshot.foreign, str(target))
        now = seconds((yield Command("time")))
        passed = passed_among(snapshot.deadlines, now)
        deadlines = {name: at for name, at in (snapshot.deadlines or {}).items() if name not in passed}
        encoded = {name: dumps(value) for name, value in snapshot.data.items() if name not in passed}
        scopes = {name: json.dumps(list(scope)) for name, scope in snapshot.scopes.items() if name in encoded}
        yield Script("purge", self._keys, [PURGE_BATCH])
        # A note every watcher skips, which fails where the block's own note would (a key of another type
        # under the stream's name): before anything is written, as the block would go on past it.
        yield Script("note_many", self._keys, ["w"])
        yield Pipeline(self._write(encoded, scopes, deadlines, merge=merge))
        return len(encoded)

    def _write(
        self, encoded: dict[str, str], scopes: dict[str, str], deadlines: dict[str, float], merge: bool
    ) -> list[Command]:
        """The commands that note a ``"restored"`` change for watchers, then store ``encoded`` values with
        ``scopes`` and ``deadlines`` (names without any lose theirs); with ``merge=False`` everything else
        goes first. ``MULTI`` does not stop at an error: ``restore`` checks beforehand that a note can be
        written."""
        keys = self._keys
        commands = [Command("eval", (SCRIPTS["note_many"], len(keys), *keys, "R"))]
        if not merge:
            commands.append(Command("delete", (self._data_key, self._scopes_key, self._deadlines_key)))
        names = list(encoded)
        for start in range(0, len(names), WRITE_CHUNK):
            chunk = names[start : start + WRITE_CHUNK]
            commands.append(Command("hset", (self._data_key,), {"mapping": {n: encoded[n] for n in chunk}}))
            if merge:
                commands.append(Command("hdel", (self._scopes_key, *chunk)))
                commands.append(Command("zrem", (self._deadlines_key, *chunk)))
        items = list(scopes.items())
        for start in range(0, len(items), WRITE_CHUNK):
            commands.append(Command("hset", (self._scopes_key,), {"mapping": dict(items[start : start + WRITE_CHUNK])}))
        items = list(deadlines.items())
        for start in range(0, len(items), WRITE_CHUNK):
            commands.append(Command("zadd", (self._deadlines_key, dict(items[start : start + WRITE_CHUNK]))))
        return commands
