"""The command line: serve, run, the client commands and show; user mistakes are one line."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, kill, reap, start_serve

import sharedstate


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m sharedstate ARGS`` in a clean environment (plus ``env``), as another shell would."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    full["PYTHONPATH"] = str(ROOT)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sharedstate", *args], env=full, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def standalone(tmp_path):
    """``sharedstate serve`` in the background; yields (process, address, path)."""
    path = tmp_path / "state.json"
    address = str(tmp_path / "s.sock")
    proc = start_serve(path, address, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"sharedstate: serving at {address}"), first + proc.stderr.read()
        assert proc.stdout.readline().strip() == f"sharedstate: key file {address}.key"
        assert proc.stdout.readline().strip() == f"export SHAREDSTATE_ADDRESS={address}"
        yield proc, address, path
    finally:
        kill(proc.pid, signal.SIGTERM)
        reap(proc)
        proc.stdout.close()
        proc.stderr.close()


def test_serve_and_client_commands_with_only_the_address_set(standalone):
    proc, address, path = standalone
    env = {"SHAREDSTATE_ADDRESS": address}
    assert cli("set", "greeting", '"héllo"', env=env).returncode == 0
    assert json.loads(cli("get", "greeting", env=env).stdout) == "héllo"
    missing = cli("get", "missing", env=env)
    assert missing.returncode == 3 and missing.stdout == "" and "no such name: 'missing'" in missing.stderr
    assert cli("get", "missing", "--default", '{"a": 1}', env=env).stdout.strip() == '{"a": 1}'
    assert cli("set", "empty", "null", env=env).returncode == 0
    stored_null = cli("get", "empty", "--default", "5", env=env)
    assert stored_null.returncode == 0 and stored_null.stdout.strip() == "null"  # a stored null is a value
    assert cli("remove", "empty", env=env).stdout.strip() == "null"
    bad_default = cli("get", "missing", "--default", "{oops", env=env)
    assert bad_default.returncode == 1 and "not valid JSON" in bad_default.stderr
    assert (
        cli(
            "set", "cfg", '{"a": [1, 2], "b": {"$type": "bytes", "value": "AAE="}}', "--scope", "web", env=env
        ).returncode
        == 0
    )
    assert sharedstate.connect(address).get("cfg") == {"a": [1, 2], "b": b"\x00\x01"}
    assert cli("incr", "hits", env=env).stdout.strip() == "1"
    assert cli("incr", "hits", "5", env=env).stdout.strip() == "6"
    assert json.loads(cli("names", env=env).stdout) == ["cfg", "greeting", "hits"]
    assert json.loads(cli("names", "^g", env=env).stdout) == ["greeting"]
    assert json.loads(cli("remove", "greeting", env=env).stdout) == "héllo"
    stats = json.loads(cli("stats", env=env).stdout)
    assert stats["names"] == 2 and stats["pid"] == proc.pid
    other = path.parent / "other.json"
    assert cli("save", str(other), env=env).stdout.strip() == str(other)
    assert cli("save", env=env).stdout.strip() == str(path)
    assert cli("set", "hits", "0", env=env).returncode == 0
    assert cli("restore", str(other), env=env).stdout.strip() == "2"
    assert cli("get", "hits", "--address", address).stdout.strip() == "6"  # --address instead of the variable
    shown = json.loads(cli("show", str(other)).stdout)
    assert shown["names"]["hits"] == 6 and shown["scopes"] == {"cfg": ["web"]}
    assert shown["names"]["cfg"]["b"] == {"$type": "bytes", "value": "AAE="}


def test_serve_stops_on_sigterm_with_a_final_save(standalone):
    proc, address, path = standalone
    assert cli("set", "last", "42", env={"SHAREDSTATE_ADDRESS": address}).returncode == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert json.loads(path.read_text())["names"] == {"last": 42}
    assert not os.path.exists(address) and not os.path.exists(address + ".key")


@pytest.mark.parametrize(
    "args,message",
    [
        (("set", "x", "{not json"), "not valid JSON"),
        (("incr", "x", "two"), "not valid JSON"),
        (("incr", "x", '"2"'), "not a number"),
        (("get", "x"), "no sharedstate server at"),
        (("show", "/nonexistent/state.json"), "no such file"),
    ],
)
def test_user_mistakes_are_one_line_and_a_non_zero_exit(tmp_path, args, message):
    result = cli(*args, env={"SHAREDSTATE_ADDRESS": str(tmp_path / "none.sock")})
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("sharedstate: error: ") and message in result.stderr


def test_a_wrong_key_and_a_corrupt_file_are_one_line(standalone, tmp_path):
    _, address, _ = standalone
    result = cli("get", "x", env={"SHAREDSTATE_ADDRESS": address, "SHAREDSTATE_AUTHKEY": "00" * 32})
    assert result.returncode == 1 and "refused the authentication key" in result.stderr
    assert result.stderr.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    for args in (("show", str(bad)), ("restore", str(bad))):
        result = cli(*args, env={"SHAREDSTATE_ADDRESS": address})
        assert result.returncode == 1 and "is not a valid snapshot" in result.stderr
        assert result.stderr.count("\n") == 1


def test_no_address_at_all_is_one_line():
    result = cli("get", "x")
    assert result.returncode == 1 and "SHAREDSTATE_ADDRESS is not set" in result.stderr


def test_run_passes_the_exit_status_through_and_children_reach_the_server(tmp_path):
    path = tmp_path / "state.json"
    child = (
        "import sharedstate, subprocess, sys\n"
        "sharedstate.connect().incr('runs')\n"
        # a grandchild reaches it too, with no configuration
        "grandchild = 'import sharedstate; sharedstate.connect().incr(\"runs\")'\n"
        "subprocess.run([sys.executable, '-c', grandchild], check=True)\n"
        "sys.exit(3)\n"
    )
    result = cli("run", "--path", str(path), "--", sys.executable, "-c", child)
    assert result.returncode == 3, result.stderr
    assert json.loads(path.read_text())["names"] == {"runs": 2}
    assert cli("run", "--", sys.executable, "-c", "pass").returncode == 0
    killed = cli("run", "--", sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert killed.returncode == 128 + signal.SIGTERM


def test_run_without_a_command_or_with_a_missing_one_exits_as_a_shell_would(tmp_path):
    assert cli("run").returncode == 2  # a usage error
    result = cli("run", "--", str(tmp_path / "no-such-program"))
    assert result.returncode == 127 and "cannot run" in result.stderr  # not found
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    result = cli("run", "--", str(tmp_path / "not-executable"))
    assert result.returncode == 126 and "cannot run" in result.stderr  # found, cannot run


def test_version_prints_the_installed_version():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sharedstate {sharedstate.__version__}"


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path):
    """``sharedstate show big.json | head -1``: no traceback, no "Broken pipe" message; the status of a
    tool killed by SIGPIPE."""
    state_file = tmp_path / "big.json"
    with sharedstate.StateServer(path=state_file, save_every=None) as server:
        server.state.update({f"name-{i}": "x" * 100 for i in range(20_000)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharedstate", "show", str(state_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline().startswith(b"{")
        proc.stdout.close()  # the reader goes away with most of the output unread
        assert proc.wait(timeout=60) == 128 + signal.SIGPIPE
        assert proc.stderr.read() == b""
    finally:
        reap(proc)
        proc.stderr.close()


def test_bad_server_options_are_refused():
    result = cli("serve", "--save-every", "every tuesday-ish")
    assert result.returncode == 2 and "save-every" in result.stderr
    result = cli("run", "--durability", "journal", "--", "true")
    assert result.returncode == 1 and "needs a path" in result.stderr


def test_the_console_script_when_installed():
    script = Path(sys.executable).parent / "sharedstate"
    if not script.exists():
        pytest.skip("the package is not installed in this environment (CI installs it)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "serve" in result.stdout


def test_json_nested_too_deep_is_one_line(tmp_path):
    result = cli("set", "x", "[" * 5000 + "]" * 5000, env={"SHAREDSTATE_ADDRESS": str(tmp_path / "none.sock")})
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("attempt", range(3))
def test_serve_saves_on_a_sigterm_sent_as_soon_as_it_prints_its_address(tmp_path, attempt):
    """The address is printed only once a stop signal leads to the final save (a supervisor may stop
    the server the moment it has started)."""
    path = tmp_path / "state.json"
    proc = start_serve(path, str(tmp_path / "s.sock"), text=True, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("sharedstate: serving at ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        reap(proc)
        proc.stdout.close()
    from sharedstate.persistence.snapshot import read_snapshot

    assert read_snapshot(path).data == {}  # the final save ran


def test_options_go_before_or_after_the_command_and_values_may_come_from_stdin(standalone, tmp_path):
    _, address, _ = standalone
    assert cli("--address", address, "set", "greeting", '"before"').returncode == 0
    assert cli("get", "greeting", "--address", address).stdout.strip() == '"before"'
    piped = subprocess.run(
        [sys.executable, "-m", "sharedstate", "--address", address, "set", "cfg", "-"],
        input='{"from": "stdin"}',
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr
    assert sharedstate.connect(address).get("cfg") == {"from": "stdin"}
    # A server option on a client command is a usage error, not silently ignored.
    wrong = cli("--path", str(tmp_path / "x.json"), "get", "greeting", "--address", address)
    assert wrong.returncode == 2 and "--path is an option of serve and run, not of get" in wrong.stderr


def test_run_says_where_its_server_is_and_writes_it_to_an_address_file(tmp_path):
    address_file = tmp_path / "address"
    child = (
        "import os, pathlib, sys\n"
        f"text = pathlib.Path({str(address_file)!r}).read_text()\n"
        "sys.exit(0 if text == os.environ['SHAREDSTATE_ADDRESS'] + '\\n' else 5)\n"
    )
    result = cli("--durability", "journal", "--path", str(tmp_path / "s.json"), "run", "--address-file",
                 str(address_file), "--", sys.executable, "-c", child)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("sharedstate: serving at ") and "(pid " in result.stderr
    assert not address_file.exists()  # removed when run ends
    # A path that is not a regular file is refused, left as it was, and the server still stops in order.
    refused = cli("--path", str(tmp_path / "s.json"), "run", "--address-file", str(tmp_path), "--", "true")
    assert refused.returncode == 1 and "not a regular file" in refused.stderr, refused.stderr
    assert tmp_path.is_dir() and (tmp_path / "s.json").exists()  # the final save ran


def test_every_option_has_help_and_a_bad_schedule_says_what_it_is():
    for command in ("serve", "run"):
        text = " ".join(cli(command, "--help").stdout.split())
        for help_text in ("the snapshot file", "when to save", "each change is also appended",
                          "fsync the journal once a second", "the server's address"):  # fmt: skip
            assert help_text in text, (command, help_text)
    assert "the server's address" in " ".join(cli("get", "--help").stdout.split())
    bad = cli("serve", "--save-every", "bogus")
    assert bad.returncode == 2 and "'bogus' is not a schedule" in bad.stderr and "_save_every" not in bad.stderr


def test_serve_on_an_address_other_machines_reach_needs_allow_remote_and_a_trusted_key_file(tmp_path):
    key = os.urandom(32)
    key_file = tmp_path / "key"
    key_file.write_text(key.hex() + "\n")
    key_file.chmod(0o600)
    refused = cli("serve", "--address", "0.0.0.0:0", "--authkey-file", str(key_file))
    assert refused.returncode == 1 and "--allow-remote" in refused.stderr
    key_file.chmod(0o644)
    refused = cli("serve", "--address", "0.0.0.0:0", "--allow-remote", "--authkey-file", str(key_file))
    assert refused.returncode == 1 and "readable or writable by others" in refused.stderr
    key_file.chmod(0o600)
    metrics = ("--metrics-port", "0") if importlib.util.find_spec("prometheus_client") else ()
    proc = start_serve(
        tmp_path / "s.json", "0.0.0.0:0", "--allow-remote", "--authkey-file", str(key_file), *metrics, text=True
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("sharedstate: serving at 0.0.0.0:"), first + proc.stderr.read()
        port = int(first.split()[3].rsplit(":", 1)[1])
        assert proc.stdout.readline().strip() == f"export SHAREDSTATE_ADDRESS=0.0.0.0:{port}"
        assert proc.stdout.readline().strip() == f"export SHAREDSTATE_AUTHKEY=$(cat {key_file})"
        if metrics:  # unauthenticated: on this machine only, whatever --allow-remote opened for the state
            assert proc.stdout.readline().startswith("sharedstate: metrics at http://127.0.0.1:")
        state = sharedstate.connect(("127.0.0.1", port), key)
        assert state.incr("remote") == 1
        with pytest.raises(sharedstate.AccessDenied):
            sharedstate.connect(("127.0.0.1", port), os.urandom(32))
        state.close()
    finally:
        kill(proc.pid, signal.SIGTERM)
        reap(proc)
        proc.stdout.close()
        proc.stderr.close()


def test_a_tcp_server_is_reached_with_the_key_serve_printed_and_the_address_given_on_the_command_line(tmp_path):
    proc = start_serve(tmp_path / "s.json", "127.0.0.1:0", text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("sharedstate: serving at 127.0.0.1:"), first + proc.stderr.read()
        address = first.split()[3]
        assert proc.stdout.readline().strip() == f"export SHAREDSTATE_ADDRESS={address}"
        key_line = proc.stdout.readline().strip()
        assert key_line.startswith("export SHAREDSTATE_AUTHKEY=")
        env = {"SHAREDSTATE_AUTHKEY": key_line.partition("=")[2]}  # the key alone, the address as an option
        assert cli("incr", "hits", "--address", address, env=env).stdout.strip() == "1"
    finally:
        kill(proc.pid, signal.SIGTERM)
        reap(proc)
        proc.stdout.close()
        proc.stderr.close()
