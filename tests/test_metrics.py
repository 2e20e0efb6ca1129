"""Prometheus metrics (the ``prometheus`` extra): a collector an app registers, scraped over HTTP, and
``sharedstate serve --metrics-port``; ``import sharedstate`` never needs prometheus_client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from conftest import ROOT, kill, process_state, reap, start_serve, wait_until

import sharedstate

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from sharedstate.metrics import SCRAPE_TIMEOUT_S, StateCollector, serve_metrics_of, start_metrics_server  # noqa: E402

#: Prometheus' default scrape timeout: a scrape must answer within it, whatever the server does.
PROMETHEUS_SCRAPE_TIMEOUT_S = 10


def scrape(port: int, timeout: float = 30) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics``: each sample's value by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_registered_collector_is_scraped_and_its_counters_move(server):
    state = server.state
    http = start_metrics_server(state, 0)
    try:
        before = scrape(http.server_port)
        for _ in range(5):
            state.incr("hits")
        assert [state.get("hits") for _ in range(2)] == [5, 5]  # a miss, then a hit of the client cache
        with state.named_lock("jobs"):
            during = scrape(http.server_port)
        after = scrape(http.server_port)
    finally:
        http.shutdown()
        http.server_close()
    assert before[("sharedstate_up", ())] == 1
    incr = ("sharedstate_calls_total", (("call", "incr"),))
    assert before.get(incr, 0) == 0 and after[incr] == 5
    assert after[("sharedstate_ops_total", ())] >= before[("sharedstate_ops_total", ())] + 6
    assert after[("sharedstate_names", ())] == 1
    assert after[("sharedstate_rss_bytes", ())] > 0
    assert during[("sharedstate_locks_held", ())] == 1 and after[("sharedstate_locks_held", ())] == 0
    assert after[("sharedstate_lock_wait_seconds", (("quantile", "0.99"),))] >= 0
    assert after[("sharedstate_client_cache_hits_total", ())] >= 1
    assert after[("sharedstate_client_cache_misses_total", ())] >= 1
    assert after[("sharedstate_last_save_failed", ())] == 0


def test_a_scrape_of_a_server_that_is_gone_says_up_0(tmp_path):
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    with sharedstate.StateServer() as server:
        registry.register(StateCollector(server.state, prefix="myapp_state"))
        assert registry.get_sample_value("myapp_state_up") == 1
    samples = {sample.name: sample.value for family in registry.collect() for sample in family.samples}
    assert samples == {"myapp_state_up": 0}  # and nothing else: no figures to give
    with pytest.raises(ValueError, match="prefix"):
        StateCollector(server.state, prefix="not a name")


def test_serve_with_a_metrics_port_serves_metrics_that_move(tmp_path):
    address = str(tmp_path / "s.sock")
    proc = start_serve(tmp_path / "state.json", address, "--metrics-port", "0", text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(4)]
        assert lines[3].startswith("sharedstate: metrics at http://127.0.0.1:"), "".join(lines) + proc.stderr.read()
        port = int(lines[3].rsplit(":", 1)[1].split("/")[0])
        before = scrape(port)
        state = sharedstate.connect(address)
        for _ in range(3):
            state.incr("hits")
        state.set("greeting", "hello")
        after = scrape(port)
        state.close()
        kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        kill(proc.pid, signal.SIGTERM)
        reap(proc)
        proc.stdout.close()
        proc.stderr.close()
    incr = ("sharedstate_calls_total", (("call", "incr"),))
    assert before.get(incr, 0) == 0 and after[incr] == 3
    assert after[("sharedstate_names", ())] == 2
    assert after[("sharedstate_clients", ())] >= 2  # the client above, and the endpoint's own handle
    assert after[("sharedstate_ops_total", ())] > before[("sharedstate_ops_total", ())]


def test_import_sharedstate_needs_no_prometheus_client():
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"  # as if it were not installed
        "import sharedstate\n"
        "assert 'sharedstate.metrics' not in sys.modules\n"
        "try:\n"
        "    import sharedstate.metrics\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'sharedstate[prometheus]'" in done.stdout


def test_serve_on_a_metrics_port_in_use_is_one_line_and_leaves_nothing_behind(tmp_path):
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        address = tmp_path / "s.sock"
        proc = start_serve(tmp_path / "state.json", str(address), "--metrics-port", str(port), text=True)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            reap(proc)
    finally:
        taken.close()
    assert proc.returncode == 1
    last = err.splitlines()[-1]
    assert last.startswith("sharedstate: error:") and f"cannot serve metrics on port {port}" in last, err
    assert not address.exists() and not (tmp_path / "s.sock.key").exists()
    assert "serving at" not in out  # whoever waits for that line never sees it before the failure


def test_a_metrics_port_out_of_range_is_a_usage_error_before_anything_starts(tmp_path):
    address = tmp_path / "s.sock"
    proc = start_serve(tmp_path / "state.json", str(address), "--metrics-port", "70000", text=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == 2
    assert "--metrics-port" in err and "not a port number (0 to 65535): '70000'" in err, err
    assert "Traceback" not in err and out == ""
    assert not address.exists()


def test_a_scrape_of_a_stopped_server_says_up_0_within_the_scrape_timeout(monkeypatch):
    """The endpoint of ``serve --metrics-port`` gives up on the server after ``SCRAPE_TIMEOUT_S``, so a
    server that stopped answering (here SIGSTOP) is ``up 0``, not a scrape that timed out. The endpoint
    here gives up after 1 s: what is tested is what happens when its wait runs out, not its length."""
    assert SCRAPE_TIMEOUT_S < PROMETHEUS_SCRAPE_TIMEOUT_S
    monkeypatch.setattr(sharedstate.metrics, "SCRAPE_TIMEOUT_S", 1.0)
    with sharedstate.StateServer() as server:
        http, url = serve_metrics_of(server.address, server.authkey, 0)
        try:
            assert url == f"http://127.0.0.1:{http.server_port}/metrics"
            assert scrape(http.server_port)[("sharedstate_up", ())] == 1
            os.kill(server.pid, signal.SIGSTOP)
            try:
                wait_until(lambda: process_state(server.pid) == "T", 10, what="the server to stop")
                stopped = scrape(http.server_port, timeout=PROMETHEUS_SCRAPE_TIMEOUT_S)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert stopped == {("sharedstate_up", ()): 0}
            assert scrape(http.server_port)[("sharedstate_up", ())] == 1  # the figures again once it answers
        finally:
            http.shutdown()
            http.server_close()
