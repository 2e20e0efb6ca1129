"""Redis URLs: which addresses name a Redis server, sharedstate's own options in them (``?namespace=``,
``?lease=``), and how a URL is shown without its password."""

from __future__ import annotations

import os
from typing import NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

from sharedstate._values import check_text
from sharedstate.backends import REDIS_SCHEMES
from sharedstate.wire.addresses import ENV_ADDRESS

#: The beginnings of a Redis URL (``sharedstate.backends`` sends those addresses here).
SCHEMES = tuple(f"{scheme}://" for scheme in REDIS_SCHEMES)
DEFAULT_NAMESPACE = "sharedstate"
#: Seconds a lock stays held without renewal: a dead holder's lock is free within this time.
DEFAULT_LEASE = 2.0
#: Shortest and longest leases accepted (a renewal runs every third of the lease).
MIN_LEASE, MAX_LEASE = 0.1, 3600.0
#: The query options that are sharedstate's, not redis-py's.
_OPTIONS = ("namespace", "lease")


class Target(NamedTuple):
    """Where a Redis backend keeps its state, checked."""

    #: The URL for redis-py: password included, sharedstate's options taken out.
    url: str
    namespace: str
    lease: float
    #: The URL as given, its password hidden: for messages and ``State.address``.
    address: str


def redis_url(address: object = None) -> str | None:
    """``address`` (or ``SHAREDSTATE_ADDRESS`` when it is ``None``) if it is a Redis URL, else ``None``."""
    if address is None:
        address = os.environ.get(ENV_ADDRESS)
    if isinstance(address, str) and address.startswith(SCHEMES):
        return address
    return None


def parse_target(url: str, namespace: object = None, lease: object = None) -> Target:
    """Check a Redis URL and the options given beside it; an option may be in the URL or an argument
    (not both with different values, for the namespace). ``TypeError``/``ValueError`` on bad options."""
    if not isinstance(url, str) or not url.startswith(SCHEMES):
        raise ValueError(f"not a Redis URL: {url!r} (expected redis://, rediss:// or unix://)")
    clean, options = split_options(url)
    if namespace is not None and "namespace" in options and options["namespace"] != namespace:
        raise ValueError(f"two namespaces given: {options['namespace']!r} in the URL and {namespace!r} as an argument")
    return Target(
        url=clean,
        namespace=check_namespace(namespace if namespace is not None else options.get("namespace", DEFAULT_NAMESPACE)),
        lease=check_lease(lease if lease is not None else options.get("lease", DEFAULT_LEASE)),
        address=mask(url),
    )


def split_options(url: str) -> tuple[str, dict[str, str]]:
    """The URL without sharedstate's own query options, and those options. (Rebuilt as text:
    ``urlunsplit`` would turn ``unix:///path`` into ``unix:/path``.)"""
    base, _, rest = url.partition("?")
    query, mark, fragment = rest.partition("#")
    ours: dict[str, str] = {}
    theirs = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in _OPTIONS:
            ours[key] = value
        else:
            theirs.append((key, value))
    if not ours:
        return url, ours
    return base + ("?" + urlencode(theirs) if theirs else "") + mark + fragment, ours


def mask(url: str) -> str:
    """The URL with its password, if any, hidden (for messages and ``address``)."""
    netloc = urlsplit(url).netloc
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return url.replace(netloc, f"{user}:***@{host}", 1)


def check_namespace(namespace: object) -> str:
    """A namespace: non-empty text (a ``str`` subclass counts as its text)."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, not {type(namespace).__name__}")
    if not namespace:
        raise ValueError("namespace must not be empty")
    return check_text(str.__str__(namespace), "a namespace")


def check_lease(lease: object) -> float:
    """A lease in seconds, between ``MIN_LEASE`` and ``MAX_LEASE`` (text, from a URL, is read as a number)."""
    if isinstance(lease, str):
        try:
            lease = float(lease)
        except ValueError:
            raise ValueError(f"lease must be a number of seconds, not {lease!r}") from None
    if type(lease) not in (int, float):
        raise TypeError(f"lease must be a number of seconds, not {type(lease).__name__}")
    if not MIN_LEASE <= lease <= MAX_LEASE:  # also refuses NaN
        raise ValueError(f"lease must be between {MIN_LEASE:g} and {MAX_LEASE:g} seconds, not {lease!r}")
    return float(lease)


def lease_ms(lease: float) -> int:
    """A lease as Redis' ``PX``/``PEXPIRE`` take it: whole milliseconds, at least one."""
    return max(1, round(lease * 1000))
