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
#: so a list referenced twice counts twice) in the values of one call. A value that reuses one list at
#: each level is small in memory but doubles with each level when written out: 40 levels would be 2**40
#: parts, which no save could finish; the count is made with a memo, so such a value is refused at once
#: whatever the budget. The budget itself is set by what a save of real data costs: measured on 2 cores,
#: a table of 1M rows of 9 ints (10M parts) saves in 3 s to a 73 MB snapshot and loads in 2 s; 5M such
#: rows (50M parts) save in 25 s to 405 MB and load in 16 s, with 4.8 GB in the client. 50M keeps tables
#: of a few million rows storable while no one call can make a save write more than that.
MAX_PARTS = 50_000_000
#: Items that need no check at all (str is checked for UTF-8; Decimal for a signalling NaN).
_LEAF_TYPES = SCALAR_TYPES - {str, decimal.Decimal}
#: Containers of fewer parts than this are counted again at each reference instead of being remembered:
#: a memo entry costs more than counting a few parts again. The count stays linear in the value's size in
#: memory: a container that is not remembered costs less than this much to walk, at each reference from a
#: container that is walked only once.
_MEMO_FROM = 64
_STR_ONLY = frozenset({str})
_DECIMAL_ONLY = frozenset({decimal.Decimal})
#: Items with nothing inside them.
_SIMPLE_TYPES = _LEAF_TYPES | {str, decimal.Decimal}


class PartBudget:
    """The parts counted so far for one call (an ``update`` of many names shares one), and the memo
    of containers already counted, by ``id``: the caller holds the values alive meanwhile."""

    __slots__ = ("used", "memo")

    def __init__(self) -> None:
        self.used = 0
        self.memo: dict[int, tuple[int, int]] = {}


class _Refused(Exception):
    """Raised inside the walk, where paths are not built (most values are fine, and a label for each
    item would cost more than checking it); each container on the way out adds the label of the item
    that was refused."""

    def __init__(self, error: type[Exception], message: str) -> None:
        super().__init__(message)
        self.error, self.message, self.labels = error, message, []


def check_text(text: str, where: str) -> str:
    """Refuse a string that cannot be written as UTF-8 (a lone surrogate, as ``os.fsdecode`` makes of
    bytes that are not UTF-8): no snapshot, journal or storage file could hold it."""
    problem = _text_problem(text)
    if problem:
        raise ValueError(f"{where}: {problem}")
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


def check_ttl(ttl: object) -> float:
    """A time to live in seconds: an ``int`` or ``float`` greater than 0 (and finite)."""
    if type(ttl) not in (int, float):  # bool is refused too: ``ttl=True`` is a mistake
        raise TypeError(f"ttl must be a number of seconds, not {type(ttl).__name__}")
    if not 0 < ttl < MAX_TTL_S:  # also refuses NaN and infinity
        raise ValueError(f"ttl must be a positive number of seconds (at most {MAX_TTL_S:g}), not {ttl!r}")
    return float(ttl)


#: About 300 years: longer than any use, and every deadline stays a date that a clock and Redis can hold
#: (a snapshot's deadlines are held to it too: ``persistence.snapshot``).
MAX_TTL_S = 1e10


def check_value(name: str, value: object, budget: PartBudget | None = None) -> None:
    """Raise ``TypeError`` (or ``ValueError`` for nesting deeper than ``MAX_DEPTH``, more than
    ``MAX_PARTS`` parts written out, or a signalling NaN) unless ``value`` may be stored. The message
    names the name and the path to the offending part, e.g.
    ``'cfg'['users'][2]: object is not a storable type``. The values of one call share one ``budget``."""
    kind = type(value)
    if budget is None:
        budget = PartBudget()
    limit = MAX_PARTS - budget.used
    error = None
    try:
        if kind in CONTAINER_TYPES:
            known = budget.memo.get(id(value))
            parts = _walk(value, kind, 0, budget.memo, limit)[0] if known is None else known[0]
        else:
            if kind not in _LEAF_TYPES:
                _check_leaf(value, kind)
            parts = 1
    except _Refused as refused:
        error = refused.error(f"{_where(name, refused.labels[::-1])}: {refused.message}")
    if error is not None:
        raise error  # outside the handler: the error keeps no context holding the walk's frames
    budget.used += parts
    if budget.used > MAX_PARTS:
        raise ValueError(
            f"{name!r}: {'the value has' if parts == budget.used else 'the values of this call have'} more than "
            f"{MAX_PARTS:,} parts when written out (a container referenced from several places counts each time)"
        )


def _check_leaf(value: Any, kind: type) -> None:
    if kind is str:
        problem = _text_problem(value)
        if problem:
            raise _Refused(ValueError, problem)
    elif kind is decimal.Decimal:
        if value.is_snan():
            # A signalling NaN raises InvalidOperation on any comparison or arithmetic, even == itself.
            raise _Refused(ValueError, "Decimal('sNaN') cannot be stored or compared")
    elif kind in SCALAR_TYPES:
        return
    elif kind in TZ_TYPES:
        tz = value.tzinfo
        if tz is None or type(tz) is datetime.timezone:
            return
        if type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
            return
        raise _Refused(
            TypeError,
            f"{kind.__name__} with tzinfo {type(tz).__name__} is not storable "
            "(use datetime.timezone or zoneinfo.ZoneInfo)",
        )
    else:
        raise _Refused(TypeError, f"{kind.__name__} is not a storable type")


def _text_problem(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"text {text!r} cannot be stored: {exc.reason} at {exc.start}"
    return None


def _walk(value: Any, kind: type, depth: int, memo: dict[int, tuple[int, int]], limit: int) -> tuple[int, int]:
    """Check a container; return its parts when written out and its height, and remember both in
    ``memo`` (see ``_MEMO_FROM``). Stops counting once past ``limit`` (the caller then refuses the value)."""
    if depth >= MAX_DEPTH:
        raise _Refused(ValueError, f"nested deeper than {MAX_DEPTH} levels (does it contain itself?)")
    depth += 1
    size = len(value)
    if kind is dict:
        if not _plain_keys(value):
            for key in value:
                if type(key) is not str:
                    raise _Refused(TypeError, f"dict key {key!r} is {type(key).__name__}, but keys must be str")
                problem = _text_problem(key)
                if problem:
                    raise _Refused(ValueError, problem)
        items = value.values()
    else:
        items = value
    parts = 1 + size
    # The usual container holds items of one or two types: a scan in C tells, and is all the check
    # that numbers, text and Decimals need.
    types = set(map(type, items))
    if types <= _LEAF_TYPES or (types <= _SIMPLE_TYPES and _simple_items_pass(items, types)):
        if parts >= _MEMO_FROM:
            memo[id(value)] = (parts, 1)
        return parts, 1
    height = 1
    try:
        for item in items:
            item_kind = type(item)
            if item_kind in _LEAF_TYPES:
                continue
            if item_kind in CONTAINER_TYPES:
                # A short list or tuple of leaves (a row, a pair) is checked here, without a call.
                if item_kind is not dict and len(item) < _MEMO_FROM and depth < MAX_DEPTH:
                    inner = set(map(type, item))
                    if inner <= _LEAF_TYPES or (inner <= _SIMPLE_TYPES and _simple_items_pass(item, inner)):
                        parts += len(item)
                        if height == 1:
                            height = 2
                        continue
                known = memo.get(id(item))
                if known is None:
                    known = _walk(item, item_kind, depth, memo, limit - parts)
                elif depth + known[1] > MAX_DEPTH:
                    raise _Refused(ValueError, f"nested deeper than {MAX_DEPTH} levels (does it contain itself?)")
                parts += known[0] - 1  # the item itself is counted in the size already
                if known[1] >= height:
                    height = known[1] + 1
                if parts > limit:
                    break  # the caller refuses the value; no need to walk the rest
            elif item_kind is str:
                if not item.isascii():
                    _check_leaf(item, item_kind)
            elif item_kind is decimal.Decimal:
                if item.is_snan():
                    _check_leaf(item, item_kind)
            else:
                _check_leaf(item, item_kind)
    except _Refused as refused:
        refused.labels.append(_label(value, kind, item))
        raise
    if parts >= _MEMO_FROM:
        memo[id(value)] = (parts, height)
    return parts, height


def _plain_keys(mapping: dict) -> bool:
    """Whether every key is a ``str`` of ASCII text (true of almost every dict; the others are looked at
    key by key)."""
    return _STR_ONLY.issuperset(map(type, mapping)) and all(map(str.isascii, mapping))


def _simple_items_pass(items: Any, types: set[type]) -> bool:
    """Whether none of ``items`` (all of ``_SIMPLE_TYPES``, those in ``types``) is text that is not
    UTF-8 or a signalling NaN."""
    if types == _STR_ONLY and all(map(str.isascii, items)):
        return True
    if types == _DECIMAL_ONLY:
        return not any(map(decimal.Decimal.is_snan, items))
    for item in items:
        kind = type(item)
        if kind is str:
            if not item.isascii() and _text_problem(item):
                return False
        elif kind is decimal.Decimal and item.is_snan():
            return False
    return True


def _label(container: Any, kind: type, item: Any) -> str:
    """The path step from ``container`` to ``item`` (found again by identity: only on errors)."""
    if kind is dict:
        return next(f"[{key!r}]" for key, found in container.items() if found is item)
    if kind is list or kind is tuple:
        return next(f"[{index}]" for index, found in enumerate(container) if found is item)
    return f"{{{item!r}}}"


def _where(name: str, path: Iterable[str]) -> str:
    return repr(name) + "".join(path)
