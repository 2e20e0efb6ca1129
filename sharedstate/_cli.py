"""The ``sharedstate`` command: a standalone server, a server around a command, and client calls."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from sharedstate._connect import connect
from sharedstate._errors import SharedStateError
from sharedstate._options import port, save_every
from sharedstate._owner import StateServer, standalone_config
from sharedstate._sentinels import MISSING
from sharedstate._top import add_arguments as add_top_arguments
from sharedstate._top import run_top
from sharedstate._version import version
from sharedstate.persistence.codec import encode, object_hook
from sharedstate.persistence.files import write_atomic
from sharedstate.persistence.snapshot import read_snapshot
from sharedstate.server.logrelay import PLAIN_FORMAT
from sharedstate.wire.addresses import (
    ENV_ADDRESS,
    ENV_AUTHKEY,
    format_address,
    key_file_for,
    parse_address,
    read_trusted_key,
)

PROG = "sharedstate"


class UserError(Exception):
    """A mistake of the user's: one line on stderr, exit status 1 (or ``code``)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


#: Exit statuses, as a shell reports them: a usage error, a command that cannot run or is not found, a
#: name ``get`` did not find, and a reader that went away (SIGPIPE).
EXIT_USAGE, EXIT_CANNOT_RUN, EXIT_NOT_FOUND, EXIT_MISSING_NAME, EXIT_BROKEN_PIPE = 2, 126, 127, 3, 128 + 13


#: The options of the servers ``serve`` and ``run`` start: (flag, argparse keywords).
SERVER_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--path",
        {
            "dest": "server_path",
            "default": None,
            "help": "the snapshot file: restored at start, saved on the schedule and at exit",
        },
    ),
    (
        "--save-every",
        {
            "dest": "save_every",
            "type": save_every,
            "default": "@hourly",
            "help": 'when to save: seconds, a cron expression ("*/5 * * * *") or none (default @hourly)',
        },
    ),
    (
        "--durability",
        {
            "dest": "durability",
            "choices": ("snapshot", "journal"),
            "default": "snapshot",
            "help": "snapshot: changes are saved on the schedule; journal: each change is also appended to "
            "PATH.journal before its call returns (default snapshot)",
        },
    ),
    (
        "--journal-fsync",
        {
            "dest": "journal_fsync",
            "choices": ("everysec", "always"),
            "default": "everysec",
            "help": "with --durability journal: fsync the journal once a second, or before each call returns "
            "(default everysec)",
        },
    ),
)
ADDRESS_HELP = (
    f"the server's address: a Unix socket path, HOST:PORT or a redis:// URL (default: ${ENV_ADDRESS}); for "
    "serve and run, where to listen (default: a private socket)"
)


def _add_options(parser: argparse.ArgumentParser, server: bool, top: bool = False) -> None:
    """``--address``, and the server options when ``server``. They go before the command (on the top
    parser, with their defaults) or after it (on the command's parser, where a default would overwrite a
    value given before: so there, none is set)."""
    options = (("--address", {"default": None, "help": ADDRESS_HELP}),) + (SERVER_OPTIONS if server else ())
    for flag, keywords in options:
        parser.add_argument(flag, **({**keywords, "default": argparse.SUPPRESS} if not top else keywords))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="One dictionary shared by many processes. Options go before or after the command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    _add_options(parser, server=True, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run a standalone server until SIGTERM/SIGINT")
    _add_options(serve, server=True)
    serve.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow an --address other machines can reach (HOST:PORT not on loopback); needs --authkey-file",
    )
    serve.add_argument(
        "--authkey-file",
        metavar="FILE",
        help="the key clients must know, in hex, in a file of this user that nobody else may read or write",
    )
    serve.add_argument(
        "--metrics-port",
        type=port,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, unauthenticated (0: a free port; needs the "
        "prometheus extra)",
    )
    serve.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="the interface of --metrics-port (default 127.0.0.1: this machine only, whatever --allow-remote says)",
    )
    run = commands.add_parser("run", help="run COMMAND with a server around it (run [options] -- COMMAND ...)")
    _add_options(run, server=True)
    run.add_argument(
        "--address-file", metavar="FILE", help="write the server's address to FILE (removed when run ends)"
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")

    def client(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        _add_options(sub, server=False)
        return sub

    get = client("get", f"print a value as JSON (exit status {EXIT_MISSING_NAME} if there is no such name)")
    get.add_argument("name")
    get.add_argument("--default", metavar="JSON", help="print this instead when there is no such name (exit 0)")
    set_ = client("set", "set a value given as JSON")
    set_.add_argument("name")
    set_.add_argument("json", help="the value, as JSON (- reads it from stdin)")
    set_.add_argument("--scope", action="append", help="a scope (repeat for several)")
    client("remove", "remove a name, print its value").add_argument("name")
    client("names", "print the sorted names").add_argument("pattern", nargs="?", help="a regular expression")
    incr = client("incr", "add to a number, print the new value")
    incr.add_argument("name")
    incr.add_argument("by", nargs="?", default="1", help="the amount, a JSON number (default 1; - reads stdin)")
    client("save", "save a snapshot now, print its path").add_argument("path", nargs="?", help="default: the server's")
    client("restore", "restore a snapshot, print how many names it held").add_argument("path", help="the file")
    client("stats", "print the server's figures")
    client("dump", "print the live state as JSON (the names and values, encoded as show does)")
    add_top_arguments(client("top", "a live view of the server's figures (one line per interval when piped)"))
    show = commands.add_parser("show", help="print a snapshot file (no server needed)")
    show.add_argument("file", help="the snapshot file")
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command not in ("serve", "run"):
        for flag, keywords in SERVER_OPTIONS:
            if (
                getattr(args, keywords["dest"] if "dest" in keywords else flag[2:].replace("-", "_"))
                != keywords["default"]
            ):
                parser.error(f"{flag} is an option of serve and run, not of {args.command}")
    return args


def _json_out(value: Any) -> None:
    print(json.dumps(encode(value), ensure_ascii=False, allow_nan=False))


def _json_in(text: str) -> Any:
    """A JSON value given on the command line, or read from stdin when it is ``-``."""
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text, object_hook=object_hook)
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise UserError(f"not valid JSON: {text[:80]!r} ({exc})") from None


def _number(text: str) -> Any:
    value = _json_in(text)
    if type(value) not in (int, float):
        raise UserError(f"not a number: {text!r}")
    return value


def _server_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "path": args.server_path,
        "save_every": args.save_every,
        "address": args.address,
        "durability": args.durability,
        "journal_fsync": args.journal_fsync,
    }


def _serve(args: argparse.Namespace) -> int:
    """A standalone server in this very process: no owner to watch, stops with a final save."""
    from sharedstate.server.process import ServerProcess

    logging.getLogger("sharedstate").setLevel(logging.INFO)
    serve_metrics = None
    if args.metrics_port is not None:  # imported first: without the extra, nothing is created
        from sharedstate.metrics import serve_metrics_of as serve_metrics
    options = _server_kwargs(args)
    if args.authkey_file is not None:
        key = read_trusted_key(Path(args.authkey_file), args.address or "this server")
        if key is None:
            raise UserError(f"no such file: {args.authkey_file}")
        options["authkey"] = key
    with standalone_config(allow_remote=args.allow_remote, **options) as config:  # checked as StateServer does
        logging.basicConfig(level=logging.INFO, format=PLAIN_FORMAT)
        process = ServerProcess(config)
        bound = process.open()
        metrics = None
        # Before "serving at": whoever waits for that line must not see it, then a failure.
        if serve_metrics is not None:
            try:
                _, metrics = serve_metrics(bound, config.authkey, args.metrics_port, args.metrics_host)
            except BaseException:
                process.close()  # nothing was served: the socket, its key file and the path's lock go
                raise
        text = format_address(bound)
        key_file = key_file_for(bound)
        print(f"sharedstate: serving at {text} (pid {os.getpid()})", flush=True)
        if key_file is not None:
            print(f"sharedstate: key file {key_file}", flush=True)
        print(f"export {ENV_ADDRESS}={text}", flush=True)
        if args.authkey_file is not None:  # the clients read the key where the server did
            print(f"export {ENV_AUTHKEY}=$(cat {shlex.quote(args.authkey_file)})", flush=True)
        elif key_file is None:  # TCP: no key file, so the clients need the key itself
            print(f"export {ENV_AUTHKEY}={config.authkey.hex()}", flush=True)
        if metrics is not None:
            print(f"{PROG}: metrics at {metrics}", flush=True)
        code = process.run()
        if process.final_error is not None:  # logged too; the exit status is what a supervisor sees
            print(f"{PROG}: error: {process.final_error}", file=sys.stderr)
            return 1
        return code


def _run(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UserError("run needs a command: sharedstate run [options] -- COMMAND ...", EXIT_USAGE)
    logging.basicConfig(format=PLAIN_FORMAT)  # the server's records are handled here: plain, on stderr
    server = StateServer(**_server_kwargs(args)).start()
    address_file = None if args.address_file is None else Path(args.address_file)
    written = False
    try:
        # Where a second shell finds it (the command itself finds it in the environment).
        print(f"{PROG}: serving at {server.address} (pid {server.pid})", file=sys.stderr, flush=True)
        if address_file is not None:
            write_atomic(address_file, [server.address + "\n"], backup=False, ours=False)
            written = True
        try:
            child = subprocess.Popen(argv)
        except FileNotFoundError as exc:
            raise UserError(f"cannot run {argv[0]!r}: {exc.strerror}", EXIT_NOT_FOUND) from None
        except OSError as exc:
            raise UserError(f"cannot run {argv[0]!r}: {exc.strerror}", EXIT_CANNOT_RUN) from None

        def forward(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and _terminal_signals_our_group():
                return  # a Ctrl-C: the terminal sent it to the command too
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        code = child.wait()
    finally:
        if written:  # only the file this run wrote: never what a refused path named
            address_file.unlink(missing_ok=True)  # type: ignore[union-attr]
        server.shutdown()
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def _terminal_signals_our_group() -> bool:
    """Whether this process group is a terminal's foreground group (so a Ctrl-C reaches every member)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def _client(args: argparse.Namespace) -> int:
    command = args.command
    # Read the user's input before reaching for the server: a typo is reported as such.
    value = _json_in(args.json) if command == "set" else None
    default = _json_in(args.default) if command == "get" and args.default is not None else None
    by = _number(args.by) if command == "incr" else None
    if command == "restore" and not os.path.lexists(args.path):
        # The library restores nothing from a missing file (Pode's rule); a command line names one on purpose.
        raise UserError(f"no such file: {args.path}")
    address: Any | None = None if args.address is None else parse_address(args.address)
    state = connect(address)
    if command == "get":
        found = state.get(args.name, MISSING)  # a stored null is a value like any other
        if found is MISSING:
            if args.default is None:
                raise UserError(f"no such name: {args.name!r}", EXIT_MISSING_NAME)
            found = default
        _json_out(found)
    elif command == "set":
        state.set(args.name, value, scope=args.scope)
    elif command == "remove":
        _json_out(state.remove(args.name))
    elif command == "names":
        _json_out(state.names(args.pattern))
    elif command == "incr":
        _json_out(state.incr(args.name, by))
    elif command == "save":
        print(state.save(args.path))
    elif command == "restore":
        print(state.restore(args.path))
    elif command == "stats":
        _json_out(state.stats())
    elif command == "top":
        return run_top(state, args.interval, args.count)
    elif command == "dump":
        print(json.dumps(encode({"names": state.snapshot()}), ensure_ascii=False, indent=2, allow_nan=False))
    return 0


def _show(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.exists():
        raise UserError(f"no such file: {path}")
    snapshot = read_snapshot(path)
    data, scopes = (snapshot.data, snapshot.scopes) if snapshot is not None else ({}, {})
    doc = {"names": data, "scopes": {name: list(scope) for name, scope in scopes.items()}}
    if snapshot is not None and snapshot.deadlines:
        doc["deadlines"] = snapshot.deadlines  # absolute UTC seconds, as saved (some may have passed since)
    print(json.dumps(encode(doc), ensure_ascii=False, indent=2, allow_nan=False))
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``sharedstate`` and ``python -m sharedstate``."""
    args = _parse(argv)
    handlers = {"serve": _serve, "run": _run, "show": _show}
    try:
        code = handlers.get(args.command, _client)(args)
        sys.stdout.flush()  # here, where a reader that went away is this function's to handle
    except BrokenPipeError:
        # The reader went away (``show big.json | head``): stop quietly, as a tool killed by SIGPIPE would.
        # Python would flush stdout again at exit and complain: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    except (
        UserError,
        SharedStateError,
        OSError,
        TypeError,
        ValueError,
        RecursionError,
        ImportError,
        NotImplementedError,
    ) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        code = exc.code if isinstance(exc, UserError) else 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
