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
#: Names per script (notes, or removals of expired names) when many names are written at once: each script
#: stays short, well within Redis' ``busy-reply-threshold``, past which other clients get ``BUSY``.
NOTE_CHUNK = 1000


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
        yield from self._check_note()
        yield Pipeline(self._write(encoded, scopes, deadlines, merge=merge))
        return len(encoded)

    def write_many(self, encoded: dict[str, str]) -> Operation:
        """``update``: the names among ``encoded`` past their deadline removed (noted ``expired``) by short
        scripts, ``WRITE_CHUNK`` names each, then one ``MULTI`` block that notes a ``"set"`` for each and
        stores them without scopes or expiry. A name whose deadline passes between the two is replaced
        without an ``expired`` note."""
        names = list(encoded)
        if not names:
            return
        for start in range(0, len(names), NOTE_CHUNK):
            yield Script("fresh", self._keys, names[start : start + NOTE_CHUNK])
        yield from self._check_note()
        yield Pipeline(self._write(encoded, {}, {}, merge=True, kind="s"))

    def _check_note(self) -> Operation:
        """A note every watcher skips, which fails where the block's own notes would (a key of another type
        under the stream's name, an id out of order): before anything is written, as the block would go on
        past it (it can still fail for a key changed in between: ``MULTI`` cannot undo)."""
        yield Script("note_many", self._keys, ["w"])

    def _write(
        self, encoded: dict[str, str], scopes: dict[str, str], deadlines: dict[str, float], merge: bool, kind: str = "R"
    ) -> list[Command]:
        """The commands that note the change for watchers (``kind`` ``"R"``: one ``"restored"``; ``"s"``: a
        ``"set"`` for each name, by scripts of ``NOTE_CHUNK`` notes), then store ``encoded`` values with
        ``scopes`` and ``deadlines`` (names without any lose theirs); with ``merge=False`` everything else
        goes first. ``MULTI`` does not stop at an error: the callers check beforehand that a note can be
        written (``_check_note``)."""
        keys = self._keys
        note = SCRIPTS["note_many"]
        if kind == "R":
            commands = [Command("eval", (note, len(keys), *keys, "R"))]
        else:
            pairs = [item for name, value in encoded.items() for item in (name, value)]
            commands = [
                Command("eval", (note, len(keys), *keys, kind, *pairs[start : start + 2 * NOTE_CHUNK]))
                for start in range(0, len(pairs), 2 * NOTE_CHUNK)
            ]
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
