"""The regular expressions of ``names(pattern)``: checked once, here, for both backends.

Python's ``re`` backtracks and holds the GIL for a whole match, so one pattern such as ``^(a+)+$``
run in the server would stop every client for as long as it likes. The server therefore matches only
with RE2 (``google-re2``), whose time is linear in the name. RE2 is given not the user's text but a
translation of the tree Python's own parser makes of it, so a name matches under RE2 exactly when
``re.search`` finds it. What RE2 cannot decide exactly is left to the caller, who matches it with
``re.search`` in its own process, at its own cost:

- a pattern RE2 has no exact equivalent for (backreferences, lookaround, atomic groups, possessive
  repeats, ``\\B``, a local ``(?a:...)``, non-ASCII letters under ignore-case, a repeat above RE2's
  1,000, a program above its memory budget): every name;
- a pattern whose classes, word boundaries or ignore-case fold differently outside ASCII (RE2's
  ``\\d \\w \\s \\b`` are ASCII, Python's are Unicode): the names that are not ASCII;
- a ``$`` outside multi-line mode (Python's also matches before a last newline): names holding
  a newline.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

import re2

try:  # Python 3.11+
    from re import _constants as _c
    from re import _parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

_MAX_CHAR = 0x10FFFF
#: ASCII code points of Python's str categories (for ASCII text; other text is left to ``re``).
_DIGIT = frozenset(range(0x30, 0x3A))
_WORD = _DIGIT | frozenset(range(0x41, 0x5B)) | frozenset(range(0x61, 0x7B)) | {0x5F}
_SPACE_ASCII = frozenset(b" \t\n\r\f\v")
_SPACE_UNICODE = _SPACE_ASCII | frozenset(range(0x1C, 0x20))  # str.isspace() is true for \x1c-\x1f

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a pattern RE2 refuses is expected: it goes to the caller
_RE2_OPTIONS.never_capture = True  # only whether a name matches is asked


class _NoEquivalent(Exception):
    """The pattern has a part RE2 cannot match exactly as ``re`` does."""


class Pattern:
    """A checked ``names()`` pattern: ``split`` decides what RE2 can, ``filter`` decides everything."""

    __slots__ = ("text", "engine", "_re2_search", "_re_search", "_ascii_only", "_no_newline")

    def __init__(self, text: str) -> None:
        self.text = text
        self._re_search = _compile_re(text).search
        self._re2_search = None
        self._ascii_only = self._no_newline = False
        try:
            translated, self._ascii_only, self._no_newline = _translate(text)
            self._re2_search = _re2_searcher(translated)
        except (_NoEquivalent, re2.error, RecursionError):
            pass
        #: ``"re2"``, or ``"re"`` when every name is left to the caller's ``re.search``.
        self.engine = "re" if self._re2_search is None else "re2"

    def split(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """The names RE2 finds a match in, and the names it cannot decide exactly (for ``re.search``);
        never runs ``re``, so its time is linear in the names' length."""
        search = self._re2_search
        if search is None:
            return [], list(names)
        matched, undecided = [], []
        ascii_only, no_newline = self._ascii_only, self._no_newline
        for name in names:
            if (ascii_only and not name.isascii()) or (no_newline and "\n" in name):
                undecided.append(name)
            elif search(name):
                matched.append(name)
        return matched, undecided

    def search_undecided(self, names: Iterable[str]) -> list[str]:
        """``re.search`` over names ``split`` left undecided (in the caller's process: it may backtrack)."""
        search = self._re_search
        return [name for name in names if search(name) is not None]

    def filter(self, names: Iterable[str]) -> list[str]:
        """The names ``re.search`` finds a match in."""
        matched, undecided = self.split(names)
        return matched + self.search_undecided(undecided) if undecided else matched


def compile_pattern(pattern: object) -> Pattern:
    """Check a ``names()`` pattern: ``TypeError`` unless a ``str`` (a subclass counts as its text),
    ``ValueError`` naming the problem if ``re`` cannot compile it (an invalid, overflowing or too
    deeply nested pattern)."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, not {type(pattern).__name__}")
    return _compiled(str.__str__(pattern))


@functools.lru_cache(maxsize=64)
def _compiled(text: str) -> Pattern:
    return Pattern(text)


def _compile_re(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise ValueError(f"invalid pattern {_short(text)}: {exc}") from None
    except OverflowError as exc:  # a repeat count above the engine's limit: a{1,4294967296}
        raise ValueError(f"invalid pattern {_short(text)}: {exc}") from None
    except RecursionError:
        raise ValueError(f"invalid pattern {_short(text)}: groups nested too deeply") from None


def _short(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:60]) + f"... ({len(text)} characters)"


def _re2_searcher(translated: str) -> Callable[[str], bool]:
    """Whether RE2 finds ``translated`` in a name. The package's ``re``-like ``search`` builds a match
    object per call, six times the cost of the match itself on short names; its extension's ``Match``
    answers the spans alone."""
    compiled = re2.compile(translated, _RE2_OPTIONS)  # raises re2.error for what RE2 refuses
    match = getattr(getattr(compiled, "_regexp", None), "Match", None)
    anchor = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)
    if match is None or anchor is None:  # pragma: no cover - another google-re2 layout
        return lambda name: compiled.search(name) is not None

    def search(name: str) -> bool:
        data = name.encode("utf-8")
        return match(anchor, data, 0, len(data))[0][0] != -1

    return search


# -- translation of Python's parse tree to RE2 syntax ------------------------------------------------
def _translate(text: str) -> tuple[str, bool, bool]:
    """RE2 syntax for ``text``, whether names must be ASCII, and whether they must hold no newline
    for RE2's answer to be ``re``'s. Raises ``_NoEquivalent``."""
    tree = _parser.parse(text, 0)
    out = _Translation()
    body = out.sequence(tree, tree.state.flags)
    return _with_flags(tree.state.flags, 0, body), out.ascii_only, out.no_newline


def _with_flags(on: int, off: int, body: str) -> str:
    """``body`` in a group setting RE2's i/m/s flags as Python's are."""
    spec = "".join(letter for flag, letter in _RE2_FLAGS if on & flag)
    cleared = "".join(letter for flag, letter in _RE2_FLAGS if off & flag)
    if cleared:
        spec += "-" + cleared
    return f"(?{spec}:{body})"


_RE2_FLAGS = ((_c.SRE_FLAG_IGNORECASE, "i"), (_c.SRE_FLAG_MULTILINE, "m"), (_c.SRE_FLAG_DOTALL, "s"))


_TYPE_FLAGS = _c.SRE_FLAG_ASCII | _c.SRE_FLAG_UNICODE | _c.SRE_FLAG_LOCALE


def _char(code: int) -> str:
    return f"\\x{{{code:x}}}"


def _ranges(codes: frozenset[int], negate: bool) -> str:
    """A class body for the ASCII code points ``codes`` (with ``negate``: for every other code point)."""
    inside = [code in codes for code in range(0x80)]
    if negate:
        inside = [not flag for flag in inside]
    pieces: list[tuple[int, int]] = []
    for code, flag in enumerate(inside):
        if flag:
            if pieces and pieces[-1][1] == code - 1:
                pieces[-1] = (pieces[-1][0], code)
            else:
                pieces.append((code, code))
    if negate:  # every code point above ASCII too
        if pieces and pieces[-1][1] == 0x7F:
            pieces[-1] = (pieces[-1][0], _MAX_CHAR)
        else:
            pieces.append((0x80, _MAX_CHAR))
    return "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}" for lo, hi in pieces)


class _Translation:
    def __init__(self) -> None:
        self.ascii_only = False  # a part whose meaning differs between engines outside ASCII
        self.no_newline = False  # a single-line '$'

    def sequence(self, items: Any, flags: int) -> str:
        return "".join(self.node(op, av, flags) for op, av in items)

    def node(self, op: Any, av: Any, flags: int) -> str:
        ignore_case = bool(flags & _c.SRE_FLAG_IGNORECASE)
        if ignore_case:
            self.ascii_only = True  # case folding differs outside ASCII (ſ, K, İ...)
        if op is _c.LITERAL:
            if ignore_case and av > 0x7F:
                raise _NoEquivalent
            return _char(av)
        if op is _c.NOT_LITERAL:
            if ignore_case and av > 0x7F:
                raise _NoEquivalent
            return f"[^{_char(av)}]"
        if op is _c.ANY:
            return "."  # the group's s flag says whether it takes a newline, in both engines
        if op is _c.IN:
            return self.charset(av, flags)
        if op is _c.BRANCH:
            return "(?:" + "|".join(self.sequence(branch, flags) for branch in av[1]) + ")"
        if op is _c.SUBPATTERN:
            _group, on, off, items = av
            if (on | off) & _TYPE_FLAGS:
                raise _NoEquivalent  # re applies a local (?a:...) unevenly (to \s, not to [^\s])
            inner = (flags | on) & ~off
            return _with_flags(on, off, self.sequence(items, inner))
        if op is _c.MAX_REPEAT or op is _c.MIN_REPEAT:
            low, high, items = av
            count = f"{{{low},}}" if high == _c.MAXREPEAT else f"{{{low},{high}}}"
            lazy = "?" if op is _c.MIN_REPEAT else ""
            return f"(?:{self.sequence(items, flags)}){count}{lazy}"
        if op is _c.AT:
            return self.at(av, flags)
        # GROUPREF, GROUPREF_EXISTS, ASSERT, ASSERT_NOT, ATOMIC_GROUP, POSSESSIVE_REPEAT...
        raise _NoEquivalent

    def at(self, where: Any, flags: int) -> str:
        if where is _c.AT_BEGINNING:
            return "^"  # the group's m flag gives it the same meaning in both engines
        if where is _c.AT_BEGINNING_STRING:
            return "\\A"
        if where is _c.AT_END:
            if not flags & _c.SRE_FLAG_MULTILINE:
                self.no_newline = True  # re's '$' also matches before a last newline; RE2's does not
            return "$"
        if where is _c.AT_END_STRING:
            return "\\z"
        if where is _c.AT_BOUNDARY:
            self.ascii_only = True  # RE2's word characters are ASCII
            return "\\b"
        # AT_NON_BOUNDARY: re's \B never matches an empty text (before Python 3.14), RE2's does.
        raise _NoEquivalent

    def charset(self, items: Any, flags: int) -> str:
        ignore_case = bool(flags & _c.SRE_FLAG_IGNORECASE)
        negate = False
        body = []
        folded: set[int] = set()  # with ignore-case: the ASCII letters and their other case, spelt out
        for op, av in items:
            if op is _c.NEGATE:
                negate = True
            elif op is _c.LITERAL or op is _c.RANGE:
                low, high = (av, av) if op is _c.LITERAL else av
                if not ignore_case:
                    body.append(_char(low) if low == high else f"{_char(low)}-{_char(high)}")
                elif high > 0x7F:
                    raise _NoEquivalent
                else:
                    for code in range(low, high + 1):
                        folded.update((code, ord(chr(code).swapcase())))
            elif op is _c.CATEGORY:
                self.ascii_only = True  # only ASCII names get the same answer from both engines
                body.append(self.category(av, flags))
            else:
                raise _NoEquivalent
        if folded:
            body.append(_ranges(frozenset(folded), False))
        charset = "[" + ("^" if negate else "") + "".join(body) + "]"
        # RE2 would fold the class's non-ASCII ranges into ASCII letters (U+212A KELVIN SIGN into k):
        # the class is spelt out case-closed instead, and matched as it is.
        return f"(?-i:{charset})" if ignore_case else charset

    @staticmethod
    def category(code: Any, flags: int) -> str:
        space = _SPACE_ASCII if flags & _c.SRE_FLAG_ASCII else _SPACE_UNICODE
        table = {
            _c.CATEGORY_DIGIT: (_DIGIT, False),
            _c.CATEGORY_NOT_DIGIT: (_DIGIT, True),
            _c.CATEGORY_WORD: (_WORD, False),
            _c.CATEGORY_NOT_WORD: (_WORD, True),
            _c.CATEGORY_SPACE: (space, False),
            _c.CATEGORY_NOT_SPACE: (space, True),
        }
        if code not in table:
            raise _NoEquivalent
        codes, negate = table[code]
        return _ranges(codes, negate)
