"""What may be stored: names, values and scopes, checked in the calling process before anything is sent.

Stored values are limited to types that the snapshot codec writes and reads back exactly, so a scheduled
save can never fail because of a value. Types are matched exactly (not by ``isinstance``): a subclass,
such as an ``IntEnum`` or an ``OrderedDict``, would come back from a snapshot as its base type.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
import zoneinfo
from collections.abc import Iterable
from typing import Any

#: Types stored as they are, with nothing inside them to check.
SCALAR_TYPES: frozenset[type] = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        str,
        bytes,
        bytearray,
        datetime.date,
        datetime.timedelta,
        uuid.UUID,
        decimal.Decimal,
    }
)
#: Types whose ``tzinfo`` is checked too.
TZ_TYPES: frozenset[type] = frozenset({datetime.datetime, datetime.time})
#: Containers whose items are checked.
CONTAINER_TYPES: frozenset[type] = frozenset({list, tuple, dict, set, frozenset})

#: Deepest nesting accepted. Deeper values (or a value that contains itself) are refused rather than
#: risking a RecursionError in the pickler or the JSON encoder of a later save.
MAX_DEPTH = 200


def check_text(text: str, where: str) -> str:
    """Refuse a string that cannot be written as UTF-8 (a lone surrogate, as ``os.fsdecode`` makes of
    bytes that are not UTF-8): no snapshot, journal or storage file could hold it."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{where}: text {text!r} cannot be stored: {exc.reason} at {exc.start}") from None
    return text


def check_name(name: object) -> str:
    """Return ``name`` as a plain ``str``; raise ``TypeError`` if it is not a string (``ValueError`` if it
    cannot be written as UTF-8)."""
    if type(name) is str:
        return check_text(name, "a state name")
    if isinstance(name, str):
        # A str subclass (a StrEnum, say) is stored under its plain text.
        return check_text(str.__str__(name), "a state name")
    raise TypeError(f"a state name must be a str, not {type(name).__name__}: {name!r}")


def check_names(names: Iterable[object]) -> list[str]:
    """``check_name`` for each of an iterable of names (a lone ``str`` is refused: it would be read as
    its characters)."""
    if isinstance(names, (str, bytes)):
        raise TypeError(f"names must be an iterable of str, not a single {type(names).__name__}")
    return [check_name(n) for n in names]


def check_scope(scope: object) -> tuple[str, ...]:
    """Return a scope argument (``None``, a ``str`` or an iterable of ``str``) as a sorted tuple."""
    if scope is None:
        return ()
    if isinstance(scope, str):
        return (check_text(str.__str__(scope), "a scope"),)
    if not isinstance(scope, (list, tuple, set, frozenset)):
        raise TypeError(f"a scope must be a str or a list of str, not {type(scope).__name__}")
    items = []
    for item in scope:
        if not isinstance(item, str):
            raise TypeError(f"a scope must be a str or a list of str; found {type(item).__name__}: {item!r}")
        items.append(check_text(str.__str__(item), "a scope"))
    return tuple(sorted(set(items)))


def check_value(name: str, value: object) -> None:
    """Raise ``TypeError`` (or ``ValueError`` for nesting deeper than ``MAX_DEPTH``) unless ``value``
    may be stored. The message names the name and the path to the offending part, e.g.
    ``'cfg'['users'][2]: object is not a storable type``."""
    _check(value, type(value), name, (), 0)


def _check(value: Any, kind: type, name: str, path: tuple[str, ...], depth: int) -> None:
    if kind is str:
        check_text(value, _where(name, path))
        return
    if kind in SCALAR_TYPES:
        return
    if kind in TZ_TYPES:
        tz = value.tzinfo
        if tz is None or type(tz) is datetime.timezone:
            return
        if type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
            return
        raise TypeError(
            f"{_where(name, path)}: {kind.__name__} with tzinfo {type(tz).__name__} is not storable "
            "(use datetime.timezone or zoneinfo.ZoneInfo)"
        )
    if kind not in CONTAINER_TYPES:
        raise TypeError(f"{_where(name, path)}: {kind.__name__} is not a storable type")
    if depth >= MAX_DEPTH:
        raise ValueError(f"{_where(name, path)}: nested deeper than {MAX_DEPTH} levels (does it contain itself?)")
    depth += 1
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{_where(name, path)}: dict key {key!r} is {type(key).__name__}, but keys must be str")
            check_text(key, _where(name, path))
            item_kind = type(item)
            if item_kind not in SCALAR_TYPES or item_kind is str:
                _check(item, item_kind, name, (*path, f"[{key!r}]"), depth)
    elif kind is list or kind is tuple:
        for index, item in enumerate(value):
            item_kind = type(item)
            if item_kind not in SCALAR_TYPES or item_kind is str:
                _check(item, item_kind, name, (*path, f"[{index}]"), depth)
    else:  # set, frozenset
        for item in value:
            item_kind = type(item)
            if item_kind not in SCALAR_TYPES or item_kind is str:
                _check(item, item_kind, name, (*path, f"{{{item!r}}}"), depth)


def _where(name: str, path: tuple[str, ...]) -> str:
    return repr(name) + "".join(path)
