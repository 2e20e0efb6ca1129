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
#: Most parts (containers and the items in them, counted as a snapshot or the journal writes them out,
#: so a list referenced twice counts twice) in one value. A value that reuses one list at each level
#: is small in memory but doubles with each level when written out: 40 levels would be 2**40 parts,
#: which no save could finish. Ten million parts is ten times a list of a million numbers, and
#: about as many seconds of JSON encoding and hundreds of MB of snapshot, more than one value should hold.
MAX_PARTS = 10_000_000
#: Items of a container that need no walk of their own (str is checked for UTF-8; Decimal for sNaN).
_LEAF_TYPES = SCALAR_TYPES - {str, decimal.Decimal}


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
    """Raise ``TypeError`` (or ``ValueError`` for nesting deeper than ``MAX_DEPTH``, more than
    ``MAX_PARTS`` parts written out, or a signalling NaN) unless ``value`` may be stored. The message
    names the name and the path to the offending part, e.g.
    ``'cfg'['users'][2]: object is not a storable type``."""
    kind = type(value)
    if kind in CONTAINER_TYPES:
        parts, _ = _check_container(value, kind, name, (), 0, {})
        if parts > MAX_PARTS:
            raise ValueError(
                f"{name!r}: the value has {parts:,} parts when written out, more than {MAX_PARTS:,} "
                "(a container referenced from several places counts each time)"
            )
    else:
        _check_leaf(value, kind, name, ())


def _check_leaf(value: Any, kind: type, name: str, path: tuple[str, ...]) -> None:
    if kind is str:
        check_text(value, _where(name, path))
    elif kind is decimal.Decimal:
        if value.is_snan():
            # A signalling NaN raises InvalidOperation on any comparison or arithmetic, even == itself.
            raise ValueError(f"{_where(name, path)}: Decimal('sNaN') cannot be stored or compared")
    elif kind in SCALAR_TYPES:
        return
    elif kind in TZ_TYPES:
        tz = value.tzinfo
        if tz is None or type(tz) is datetime.timezone:
            return
        if type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
            return
        raise TypeError(
            f"{_where(name, path)}: {kind.__name__} with tzinfo {type(tz).__name__} is not storable "
            "(use datetime.timezone or zoneinfo.ZoneInfo)"
        )
    else:
        raise TypeError(f"{_where(name, path)}: {kind.__name__} is not a storable type")


def _check_container(
    value: Any, kind: type, name: str, path: tuple[str, ...], depth: int, seen: dict[int, tuple[int, int]]
) -> tuple[int, int]:
    """Check a container; return its parts when written out and its height. ``seen`` memoizes both by
    ``id`` (the value holds every container alive meanwhile), so a container referenced many times is
    walked once and the count stays linear in the value's size in memory."""
    if depth >= MAX_DEPTH:
        raise ValueError(f"{_where(name, path)}: nested deeper than {MAX_DEPTH} levels (does it contain itself?)")
    parts, height = 1 + len(value), 1
    depth += 1
    if kind is dict:
        for key in value:
            if type(key) is not str:
                raise TypeError(f"{_where(name, path)}: dict key {key!r} is {type(key).__name__}, but keys must be str")
            check_text(key, _where(name, path))
        pairs: Any = value.items()
    elif kind is list or kind is tuple:
        pairs = enumerate(value)
    else:  # set, frozenset
        pairs = ((item, item) for item in value)
    for key, item in pairs:
        item_kind = type(item)
        if item_kind in _LEAF_TYPES:
            continue
        label = f"[{key}]" if kind is list or kind is tuple else f"[{key!r}]" if kind is dict else f"{{{key!r}}}"
        if item_kind not in CONTAINER_TYPES:
            _check_leaf(item, item_kind, name, (*path, label))
            continue
        known = seen.get(id(item))
        if known is None:
            known = _check_container(item, item_kind, name, (*path, label), depth, seen)
        elif depth + known[1] > MAX_DEPTH:
            raise ValueError(
                f"{_where(name, (*path, label))}: nested deeper than {MAX_DEPTH} levels (does it contain itself?)"
            )
        parts += known[0] - 1  # the item itself is counted in len(value) already
        if known[1] >= height:
            height = known[1] + 1
        if parts > MAX_PARTS:
            break  # the caller reports it; no need to walk the rest
    seen[id(value)] = (parts, height)
    return parts, height


def _where(name: str, path: tuple[str, ...]) -> str:
    return repr(name) + "".join(path)
