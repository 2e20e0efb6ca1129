"""The semantics every backend shares, written once: what ``incr``, ``append`` and ``compare_and_set``
make of the stored value, which names a filtered ``save`` keeps, and which restored snapshots are
accepted.

The local server's store (``server/store.py``) and the Redis backend (``backends/redis``) both call
these functions, so the two cannot drift: the same arithmetic, the same errors with the same words.
A backend calls them where its atomicity lives (under the store's mutex; in Python between a read and
a compare-and-swap on Redis); they only compute, and raise ``TypeError``/``ValueError`` before anything
changes.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from sharedstate._errors import SnapshotError
from sharedstate._sentinels import MISSING
from sharedstate._values import check_name, check_value

__all__ = [
    "DECIMAL_CONTEXT",
    "NUMBER_TYPES",
    "add",
    "appended",
    "check_increment",
    "check_restored",
    "matches",
    "scoped",
    "select_saved",
]

#: What ``incr`` adds to and with (exact types: a ``bool`` is not a number here).
NUMBER_TYPES = (int, float, decimal.Decimal)

#: The context of every ``incr`` that involves a ``Decimal``: the one a fresh Python process starts with
#: (``decimal.DefaultContext`` as shipped), spelt out so that neither the calling thread's context nor a
#: program that changed ``DefaultContext`` changes what is stored. A journal replayed in another process
#: therefore adds exactly as the call did, and both backends answer the same for the same values.
DECIMAL_CONTEXT = decimal.Context(
    prec=28,
    rounding=decimal.ROUND_HALF_EVEN,
    Emin=-999999,
    Emax=999999,
    capitals=1,
    clamp=0,
    flags=[],
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)

_V = TypeVar("_V")


# -- incr -----------------------------------------------------------------------------------------------
def check_increment(name: str, by: object) -> None:
    """Refuse an ``incr`` argument that is not a number: ``TypeError`` unless an ``int``, ``float`` or
    ``Decimal`` (exactly those types), ``ValueError`` for a signalling NaN."""
    kind = type(by)
    if kind not in NUMBER_TYPES:
        raise TypeError(f"cannot incr {name!r} by {kind.__name__}: by must be an int, float or Decimal")
    if kind is decimal.Decimal:
        check_value(name, by)  # a signalling NaN: ValueError


def add(name: str, current: Any, by: Any) -> Any:
    """The value ``incr(name, by)`` stores when ``name`` holds ``current`` (``MISSING``: counts as 0).

    Python's ``+`` on the two, with ``DECIMAL_CONTEXT`` when a ``Decimal`` takes part. ``TypeError`` if
    ``current`` is not a number or cannot be added to ``by`` (a float and a Decimal); ``ValueError`` if the
    sum overflows the context or is undefined (``Decimal('Infinity')`` plus its negative)."""
    if current is MISSING:
        current = 0
    if type(current) not in NUMBER_TYPES:
        raise TypeError(f"cannot incr {name!r}: it holds {type(current).__name__}, not a number")
    try:
        if type(current) is decimal.Decimal or type(by) is decimal.Decimal:
            with decimal.localcontext(DECIMAL_CONTEXT):
                return current + by
        return current + by
    except TypeError:
        raise TypeError(f"cannot incr {name!r}: cannot add {type(by).__name__} to {type(current).__name__}") from None
    except decimal.DecimalException as exc:  # an overflow, or an undefined sum (the context traps both)
        raise ValueError(f"cannot incr {name!r} by {by!r}: {type(exc).__name__}") from None


# -- append and compare_and_set -------------------------------------------------------------------------
def appended(name: str, current: Any, item: Any) -> list[Any]:
    """The list ``append(name, item)`` stores when ``name`` holds ``current`` (``MISSING``: a new list):
    always a new list, so a stored value is never changed in place. ``TypeError`` unless a list."""
    if current is MISSING:
        return [item]
    if type(current) is not list:
        raise TypeError(f"cannot append to {name!r}: it holds {type(current).__name__}, not a list")
    return [*current, item]


def matches(current: Any, expected: Any) -> bool:
    """Whether ``compare_and_set`` stores its new value when the name holds ``current``: a missing name
    matches only ``expected=None``; else Python's ``==`` decides (``1 == 1.0 == True``; a NaN matches
    nothing, not even a NaN)."""
    if current is MISSING:
        return expected is None
    return bool(current == expected)


# -- scopes and save filters ----------------------------------------------------------------------------
def scoped(scopes: Mapping[str, Iterable[str]], wanted: Iterable[str]) -> list[str]:
    """The names, of those ``scopes`` lists with their scopes, that have any of ``wanted`` (a scope filter
    that is not empty): the filter of ``names(scope=)`` and of a scoped ``save``."""
    chosen = set(wanted)
    return [name for name, scope in scopes.items() if not chosen.isdisjoint(scope)]


def select_saved(
    data: Mapping[str, _V],
    scopes: Mapping[str, tuple[str, ...]],
    include: list[str] | None,
    exclude: list[str] | None,
    scope: tuple[str, ...],
) -> dict[str, _V]:
    """The entries of ``data`` a filtered ``save`` writes, in Pode's order: ``scope`` keeps the names
    having any of those scopes, then ``include`` keeps only the names it lists, then ``exclude`` drops
    names (so ``exclude`` has the last word). Empty filters (``None``, ``[]``, ``()``) filter nothing.

    ``data`` may map names to anything (values, or their stored text); ``scopes`` lists the scopes of
    the names that have some."""
    selected: dict[str, _V]
    if scope:
        selected = {n: data[n] for n in scoped(scopes, scope) if n in data}
    else:
        selected = dict(data)
    if include:
        selected = {n: selected[n] for n in include if n in selected}
    if exclude:
        for name in exclude:
            selected.pop(name, None)
    return selected


# -- restored snapshots ---------------------------------------------------------------------------------
def check_restored(data: Mapping[str, Any], foreign: bool, path: str) -> None:
    """Refuse a snapshot read from ``path`` whose names or values could not have been stored: every
    name must be text a snapshot can hold, and the values of a foreign (Pode) file, whose JSON may hold
    any shape, must pass ``check_value``. Our own files hold only values that passed it when set.
    Raises ``SnapshotError`` naming the file, before anything is restored."""
    try:
        if not all(map(str.isascii, data)):  # ASCII text is always fine: only the others are looked at
            for name in data:
                check_name(name)
        if foreign:
            for name, value in data.items():
                check_value(name, value)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"{path} is not a valid snapshot: {exc}", path) from None


def past(deadline: float | None, now: float) -> bool:
    """Whether a name with ``deadline`` (``None``: none) has expired by ``now``: at its deadline it is gone."""
    return deadline is not None and deadline <= now


def passed_among(deadlines: Mapping[str, float] | None, now: float) -> set[str]:
    """The names of ``deadlines`` (a snapshot's) that passed by ``now``: a restore leaves them out."""
    return {name for name, deadline in (deadlines or {}).items() if past(deadline, now)}
