"""Admission of new connections: what a peer may hold of the server before it proves it knows the key.

Every accepted connection costs a descriptor and a thread. A peer that never authenticates would keep
both forever, and enough of them would leave no descriptor for a save. So a connection gets
``HANDSHAKE_TIMEOUT`` seconds to finish the challenge, at most ``MAX_PENDING`` connections handshake at
once (a new one pushes out the oldest: a real client needs a millisecond, an idle one is the likelier
culprit), and a connection that would leave fewer than ``FD_RESERVE`` free descriptors is closed at
once, so that saves, the journal and ``stats()`` always find one.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import socket
import threading
import time

log = logging.getLogger(__name__)

#: Seconds a connection may take to finish the challenge both ways.
HANDSHAKE_TIMEOUT = 5.0
#: Connections that may be in the challenge at once.
MAX_PENDING = 64
#: Descriptors kept free for the server's own files (snapshot, its temp file and folder, the journal,
#: /proc for stats).
FD_RESERVE = 32
#: The longest the accept loop sleeps, so that it notices a stop.
_TICK = 0.5


def raise_fd_limit() -> int:
    """Raise this process' soft limit of open files to its hard limit; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)
    return soft


def _shut(fd: int) -> None:
    """Wake the thread reading ``fd`` with an end of file; the descriptor stays open (that thread
    closes it), so its number cannot be reused under that thread."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


class Admission:
    """Accepts connections on a listening socket and watches those still in the challenge."""

    def __init__(self, listening: socket.socket, fd_limit: int) -> None:
        self.listening = listening
        listening.setblocking(False)
        self.tcp = listening.family in (socket.AF_INET, socket.AF_INET6)
        #: Accepted descriptors at or above this number would eat into the reserve.
        self.fd_ceiling = fd_limit - FD_RESERVE
        #: Descriptors in the challenge and their deadlines, oldest first (the deadlines are in order).
        self._pending: dict[int, float] = {}
        self._mutex = threading.Lock()
        self._spare: int | None = self._open_spare()
        self._poller = select.poll()
        self._poller.register(listening.fileno(), select.POLLIN)

    @staticmethod
    def _open_spare() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY)
        except OSError:
            return None

    def accept(self) -> int | None:
        """Wait (up to a tick) for a connection; return its blocking descriptor, now in the challenge,
        or ``None``. Closes the connections whose challenge ran out of time on the way."""
        timeout = self._expire()
        if not self._poller.poll(timeout * 1000):
            return None
        try:
            sock, _ = self.listening.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._shed()
                return None
            raise
        fd = sock.fileno()
        if fd >= self.fd_ceiling:
            sock.close()
            return None
        sock.setblocking(True)
        if self.tcp:
            # Answers of more than one write (a large value) must not wait for a delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._mutex:
            if len(self._pending) >= MAX_PENDING:
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                _shut(oldest)
            self._pending[fd] = time.monotonic() + HANDSHAKE_TIMEOUT
        return sock.detach()

    def admitted(self, fd: int) -> None:
        """The challenge on ``fd`` is over (passed or failed): it is no longer watched. Call before the
        descriptor is closed."""
        with self._mutex:
            self._pending.pop(fd, None)

    def _expire(self) -> float:
        """Shut the connections past their deadline; return the seconds until the next deadline."""
        now = time.monotonic()
        with self._mutex:
            pending = self._pending
            while pending:
                fd, deadline = next(iter(pending.items()))
                if deadline > now:
                    return min(_TICK, deadline - now)
                del pending[fd]
                _shut(fd)
        return _TICK

    def _shed(self) -> None:
        """Out of descriptors while a connection waits: free the spare to accept it and close it at
        once (else it would wake every poll), then take the spare back."""
        if self._spare is None:
            time.sleep(0.01)
            self._spare = self._open_spare()
            return
        os.close(self._spare)
        self._spare = None
        try:
            sock, _ = self.listening.accept()
            sock.close()
        except OSError:
            pass
        self._spare = self._open_spare()
