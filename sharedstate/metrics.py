"""Prometheus metrics of a state's ``stats()``: a collector an app registers, and the HTTP endpoint of
``sharedstate serve --metrics-port``. Needs the ``prometheus`` extra (``prometheus_client``); ``import
sharedstate`` never imports this module.

    from prometheus_client import REGISTRY
    from sharedstate.metrics import StateCollector

    REGISTRY.register(StateCollector(state))

Every scrape calls ``state.stats()`` once (one round trip). The metric names are in
docs/observability.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError:
    raise ImportError(
        "sharedstate.metrics needs prometheus_client, an optional extra of sharedstate: "
        "pip install 'sharedstate[prometheus]'"
    ) from None

from sharedstate._state import State
from sharedstate.backends.local import LocalBackend

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["StateCollector", "start_metrics_server"]

log = logging.getLogger(__name__)

#: How long a scrape of ``serve_metrics_of``'s endpoint waits for the server's figures: a server that
#: stopped answering (SIGSTOP, a hang) is reported as ``up 0`` well within Prometheus' default scrape
#: timeout of 10 s, rather than the scrape itself timing out.
SCRAPE_TIMEOUT_S = 5.0

#: (stats key, metric name without the prefix, help) of the figures exported as gauges.
_GAUGES = (
    ("names", "names", "Names stored"),
    ("clients", "clients", "Open client connections"),
    ("rss_bytes", "rss_bytes", "Resident memory of the server process"),
    ("uptime_s", "uptime_seconds", "Seconds since the server process started"),
    ("locks_held", "locks_held", "Locks held"),
    ("lock_waiters", "lock_waiters", "Calls waiting for a lock"),
    ("last_save_at", "last_save_timestamp_seconds", "When the last successful save began (Unix time)"),
    ("last_save_s", "last_save_duration_seconds", "How long the last successful save took"),
    ("journal_bytes", "journal_bytes", "Size of the current journal file"),
    ("cache_entries", "client_cache_entries", "Entries of this process' client cache"),
)
#: The same for figures that only grow (exported with the suffix ``_total``).
_COUNTERS = (
    ("ops", "ops", "Operations on the state served since the server started"),
    ("lock_recoveries", "lock_recoveries", "Locks freed because their holder died, disconnected or lost its lease"),
    ("cache_hits", "client_cache_hits", "Reads this process' client cache answered"),
    ("cache_misses", "client_cache_misses", "Reads of this process that went to the server"),
)


class StateCollector(Collector):
    """A Prometheus collector of ``state.stats()``, named ``PREFIX_...`` (default ``sharedstate_``).
    A scrape that cannot reach the server exports only ``PREFIX_up 0`` (and logs why, at debug level)."""

    def __init__(self, state: State, prefix: str = "sharedstate") -> None:
        if not isinstance(prefix, str) or not prefix.isidentifier():
            raise ValueError(f"prefix must be a metric name prefix such as 'sharedstate', not {prefix!r}")
        self.state = state
        self.prefix = prefix

    def describe(self) -> list[Metric]:
        # Nothing to describe ahead: registering must not reach for the server.
        return []

    def collect(self) -> Iterator[Metric]:
        prefix = self.prefix
        up = GaugeMetricFamily(f"{prefix}_up", "1 when the last scrape could read the server's figures")
        try:
            stats = self.state.stats()
        except Exception as exc:  # a scrape must answer; the reason is in the log
            log.debug("metrics: no figures from %s: %s", self.state.address, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for key, name, text in _GAUGES:
            yield from _one(GaugeMetricFamily, f"{prefix}_{name}", text, stats.get(key))
        for key, name, text in _COUNTERS:
            yield from _one(CounterMetricFamily, f"{prefix}_{name}", text, stats.get(key))
        failed = GaugeMetricFamily(f"{prefix}_last_save_failed", "1 when the last save failed")
        failed.add_metric([], 1 if stats.get("last_save_error") else 0)
        yield failed
        calls = CounterMetricFamily(f"{prefix}_calls", "Calls served since the server started", labels=["call"])
        for call, count in sorted((stats.get("calls") or {}).items()):
            calls.add_metric([call], count)
        yield calls
        waits = GaugeMetricFamily(
            f"{prefix}_lock_wait_seconds", "Lock wait percentiles over the recent acquires", labels=["quantile"]
        )
        for quantile, key in (("0.5", "lock_wait_p50_s"), ("0.99", "lock_wait_p99_s")):
            if stats.get(key) is not None:
                waits.add_metric([quantile], stats[key])
        yield waits


def _one(family: Any, name: str, text: str, value: Any) -> Iterator[Metric]:
    """One unlabelled metric; none when the figure is unknown (``None``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    metric = family(name, text)
    metric.add_metric([], value)
    yield metric


def start_metrics_server(state: State, port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``state``'s metrics at ``http://HOST:PORT/metrics`` from a daemon thread of this process (in
    a registry of their own, so the process' own metrics are not mixed in). Returns the HTTP server:
    ``server_port`` is the port (``port=0`` takes a free one), ``shutdown()`` stops it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(state))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


def serve_metrics_of(address: Any, authkey: bytes, port: int, host: str = "127.0.0.1") -> tuple[Any, str]:
    """``sharedstate serve --metrics-port``: ``start_metrics_server`` for the server at ``address``, run by
    this very process; returns the HTTP server and the endpoint's URL. Its handle connects at the first
    scrape (the server answers only once it runs), and gives up on a call after ``SCRAPE_TIMEOUT_S``."""
    state = State(LocalBackend(address, authkey, cache=False, timeout=SCRAPE_TIMEOUT_S))
    try:
        http = start_metrics_server(state, port, host)
    except OSError as exc:  # the port is taken, say: name it
        raise OSError(exc.errno, f"cannot serve metrics on port {port} of {host}: {exc.strerror}") from None
    shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
    return http, f"http://{shown}:{http.server_port}/metrics"
