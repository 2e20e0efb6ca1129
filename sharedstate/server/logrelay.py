"""The log records of a server process travel to the process that owns it, and are handled there by the
owner's own logging: its handlers, filters, formats and levels apply, as if the server's modules had
logged in the owner (the record keeps its logger name, ``sharedstate.server.locktable`` say, and the
server's pid in ``process``).

In the server, ``RelayHandler`` (a ``QueueHandler``) puts each record on a bounded in-process queue, and
one thread sends them down a pipe to the owner; a log call never waits for the owner. When the queue is
full (an owner that does not read: stopped, or busy), records are dropped and counted, and a warning
says how many once the owner reads again (or, when the server stops before that, on its stderr). When
the owner is gone, the records go to the server's own stderr (inherited from the owner), in the plain
format of ``sharedstate serve``.

In the owner, ``LogListener`` reads the pipe on a thread of its own and hands each record to
``logging.getLogger(record.name)`` when that logger is enabled for its level. One pipe, one listener per
server process: a server process started again after a crash gets its own. The pipe's ends are closed in
every child the owner forks (``open_log_pipe``), so that only the owner keeps the pipe open.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import pickle
import queue
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import Any

from sharedstate._fork import after_fork_in_child, no_fork

log = logging.getLogger(__name__)

#: The format of the server's records where no owner takes them (``sharedstate serve``, an owner gone).
PLAIN_FORMAT = "sharedstate[%(process)d] %(levelname)s: %(message)s"
#: Records that may wait in the server for an owner that does not read; more are dropped and counted.
MAX_QUEUED = 1000
#: How long a stopping server waits for its last records to reach an owner that does not read them; and
#: how long a stopping owner waits for one record to be handled (an app's handler that blocks).
DRAIN_S = 2.0
#: The root of the package's loggers; the server logs through its descendants.
ROOT = "sharedstate"

_STOP = object()


def owner_level() -> int:
    """The level the server process logs at: the lowest level any ``sharedstate`` logger of this process
    is enabled for (the owner filters each record again by its own logger's level on arrival)."""
    manager = logging.Logger.manager
    levels = [logging.getLogger(ROOT).getEffectiveLevel()]
    for name, logger in list(manager.loggerDict.items()):
        if name.startswith(ROOT + ".") and isinstance(logger, logging.Logger):
            levels.append(logger.getEffectiveLevel())
    return min(levels)


class RelayHandler(logging.handlers.QueueHandler):
    """The server's side: records go to the owner through the pipe ``fd``, never blocking the caller."""

    def __init__(self, fd: int, capacity: int = MAX_QUEUED) -> None:
        super().__init__(queue.Queue(capacity))
        #: Records dropped because the queue was full (the owner did not read), or lost at the end.
        self.dropped = 0
        self._reported = 0
        self._counting = threading.Lock()
        #: What the sender is sending now: a record (1), or the warning about ``n`` dropped ones (-n); a
        #: sender stuck on it at ``close`` has lost it.
        self._sending = 0
        self._conn: Connection | None = Connection(fd, readable=False)
        #: Where records go once the owner is gone.
        self._fallback: logging.Handler | None = None
        self._sender = threading.Thread(target=self._send_all, name="sharedstate-log-relay", daemon=True)
        self._sender.start()

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._counting:
                self.dropped += 1

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # QueueHandler.prepare folds the arguments and any traceback into the message, so the record
        # pickles whatever it was logged with.
        record = super().prepare(record)
        record.processName = "sharedstate-server"
        return record

    def _send_all(self) -> None:
        while True:
            record = self.queue.get()
            if record is not _STOP:
                self._sending = 1
                self._send(record)
            lost = self._unreported()
            if lost:  # said once the owner reads again (or as the server stops)
                self._sending = -lost
                self._send(self._drop_report(lost))
            self._sending = 0
            if record is _STOP:
                return

    def _unreported(self, more: int = 0) -> int:
        """Count ``more`` records as dropped; return how many dropped records no warning has named yet,
        which the caller reports (each drop is reported once: by the sender, or by ``close``)."""
        with self._counting:
            self.dropped += more
            lost = self.dropped - self._reported
            self._reported = self.dropped
            return lost

    def _drop_report(self, lost: int) -> logging.LogRecord:
        message = (
            f"{lost} log record(s) of the server process were dropped: its owner process did not read them in time"
        )
        fields = {"name": __name__, "levelno": logging.WARNING, "levelname": "WARNING", "msg": message}
        return self.prepare(logging.makeLogRecord(fields))

    def _send(self, record: logging.LogRecord) -> None:
        if self._conn is not None:
            try:
                data = pickle.dumps(record.__dict__)
            except Exception:  # an ``extra`` value that does not pickle: the text still travels
                data = pickle.dumps(
                    {
                        k: v if isinstance(v, (str, int, float, type(None))) else repr(v)
                        for k, v in record.__dict__.items()
                    }
                )
            try:
                self._conn.send_bytes(data)
                return
            except OSError:  # the owner is gone (EPIPE): nobody reads the pipe any more
                self._conn.close()
                self._conn = None
                self._fallback = _plain_stderr()
        if self._fallback is not None:
            self._fallback.handle(record)

    def close(self) -> None:
        """Send what is queued (waiting at most ``DRAIN_S`` for an owner that does not read), then stop;
        how many records could not be sent is said on stderr."""
        deadline = time.monotonic() + DRAIN_S
        try:
            self.queue.put(_STOP, timeout=DRAIN_S)
            stop_queued = 1
        except queue.Full:
            stop_queued = 0
        self._sender.join(max(0.0, deadline - time.monotonic()))
        if self._sender.is_alive():
            # The owner reads nothing (the sender waits on a full pipe): what is left is lost. The pipe
            # cannot carry the warning, so it goes where the records of a server with no owner go.
            stuck = self._sending
            lost = self._unreported(max(0, self.queue.qsize() - stop_queued) + max(stuck, 0)) - min(stuck, 0)
            if lost:
                _plain_stderr().handle(self._drop_report(lost))
        elif self._conn is not None:
            self._conn.close()
        super().close()


def _plain_stderr() -> logging.Handler:
    """Where the server's records go when its owner cannot take them: its stderr, in the plain format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    return handler


def relay_to_owner(fd: int) -> RelayHandler:
    """Send every record of the server process' ``sharedstate`` loggers to its owner through ``fd``."""
    handler = RelayHandler(fd)
    logger = logging.getLogger(ROOT)
    logger.addHandler(handler)
    logger.propagate = False  # the server's root logger has no handler: it must not fall back to stderr
    return handler


#: The ends of log pipes open in the owner, which a forked child closes (``_close_in_child``): a child's
#: copy of a read end would keep the pipe open once the owner is gone (the server's records then fill it
#: instead of going to the server's stderr), and a copy of a write end would keep a listener from seeing
#: the server's end of file.
_pipe_ends: set[int] = set()


def open_log_pipe() -> tuple[int, int]:
    """A pipe for the records of a server process (read end, write end), recorded for closing in every
    child forked from now on: no fork can come between its making and its recording."""
    with no_fork():
        ends = os.pipe()
        _pipe_ends.update(ends)
    return ends


def close_log_pipe_end(fd: int) -> None:
    """Close an end of ``open_log_pipe()`` that no ``LogListener`` took."""
    with no_fork():  # forgotten and closed in one step: a child never closes the number reused meanwhile
        _pipe_ends.discard(fd)
        os.close(fd)


class LogListener:
    """The owner's side: hands the records arriving on the pipe ``fd`` (a read end of ``open_log_pipe()``,
    which it takes over) to this process' loggers."""

    #: The listeners of this process, whose pipes a forked child closes (``_close_in_child``).
    _running: weakref.WeakSet[LogListener] = weakref.WeakSet()

    def __init__(self, fd: int) -> None:
        with no_fork():  # a child sees the end either as this listener's or as a bare recorded one
            self._conn = Connection(fd, writable=False)
            self._running.add(self)
            _pipe_ends.discard(fd)
        #: Records taken off the pipe so far (``finish`` waits while this grows).
        self.handled = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sharedstate-server-logs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = self._conn
        try:
            while True:
                # Polled, so that a copy of the pipe's other end in a process forked meanwhile (it never
                # writes) cannot keep this thread waiting for an end of file once the server is gone.
                if not conn.poll(0.2):
                    if self._closing.is_set():
                        return
                    continue
                self._handle(conn.recv_bytes())
                self.handled += 1
        except (EOFError, OSError):  # the server process exited and everything it sent was handled
            return
        finally:
            with no_fork():
                self._running.discard(self)
                conn.close()

    @staticmethod
    def _handle(data: bytes) -> None:
        try:
            fields: dict[str, Any] = pickle.loads(data)
            record = logging.makeLogRecord(fields)
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        except Exception:  # a record that does not load, or an app's filter that raises: the next still comes
            pass

    def finish(self, stall: float = DRAIN_S) -> None:
        """Called once the server process has exited: handle what it left in the pipe, then stop. Waits as
        long as records keep being handled, however slowly; only a handler that takes more than
        ``stall`` seconds over one record (one that blocks) is not waited for, so that it cannot hang
        the owner's shutdown: the records left are then handled on the listener's thread, as it can."""
        self._closing.set()
        if self._thread is threading.current_thread():
            return
        seen = -1
        while self.handled != seen and self._thread.is_alive():
            seen = self.handled
            self._thread.join(stall)


@after_fork_in_child
def _close_in_child() -> None:
    # A forked child has no listener thread: its copy of a pipe would keep the server's records unread
    # once the owner is gone, instead of the server seeing the pipe broken.
    for listener in list(LogListener._running):
        try:
            listener._conn.close()
        except OSError:
            pass
    LogListener._running.clear()
    for fd in _pipe_ends:
        try:
            os.close(fd)
        except OSError:
            pass
    _pipe_ends.clear()


__all__ = [
    "PLAIN_FORMAT",
    "LogListener",
    "RelayHandler",
    "close_log_pipe_end",
    "open_log_pipe",
    "owner_level",
    "relay_to_owner",
]
