"""Parsers of the command line's option values: each turns an option's text into its value, or raises
``argparse.ArgumentTypeError`` saying why it is not one (argparse then reports a usage error, exit 2)."""

from __future__ import annotations

import argparse
from typing import Any

from sharedstate.persistence.schedule import parse_schedule


def save_every(text: str) -> Any:
    """``--save-every``: seconds, a cron expression, or ``none``."""
    if text.lower() == "none":
        return None
    try:
        value: Any = float(text)
    except ValueError:
        value = text
    try:
        parse_schedule(value)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a schedule: {exc}") from None
    return value


def port(text: str) -> int:
    """``--metrics-port``: a TCP port, 0 (a free one) to 65535."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0 to 65535): {text!r}")
    return number


def positive(kind: type) -> Any:
    """A parser of numbers of ``kind`` above 0 (``top --interval`` and ``--count``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
        return value

    return parse
