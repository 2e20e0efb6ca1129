"""The client's connection: a ``multiprocessing`` connection whose calls take one read and one write
(``framing``), and the socket timeouts that bound each read and write."""

from __future__ import annotations

import os
import socket
import struct
from multiprocessing import connection as mpc

from sharedstate.wire.framing import MessageReader, write_message


class Connection(mpc.Connection):
    """A ``multiprocessing`` connection with a lean request/answer path (``request``); every stdlib method
    still works for the handshake."""

    def __init__(self, handle: int) -> None:
        super().__init__(handle)
        self._reader = MessageReader(handle)

    def request(self, payload: bytes) -> bytes | bytearray:
        """Send one framed request and return the payload of its answer. Empty messages are the
        keepalives of a server while the call waits for a lock: skipped (each one restarts the receive
        timeout). Raises ``BlockingIOError`` when nothing came within the connection's timeout."""
        reader = self._reader
        write_message(reader.fd, payload)
        answer = reader.read()
        while not answer:
            answer = reader.read()
        return answer

    def set_timeout(self, seconds: float | None) -> None:
        """Give up a read or a write that makes no progress for ``seconds`` (``BlockingIOError``);
        ``None``: a read may wait as long as it takes (a call that waits for a lock)."""
        sock = socket.socket(fileno=os.dup(self.fileno()))
        try:
            if seconds is None:
                set_recv_timeout(sock, 0)
            else:
                _set_timeouts(sock, seconds)
        finally:
            sock.close()

    def detach(self) -> int:
        """Give up the descriptor without closing it (the asyncio client carries on with it) and return it."""
        fd = self.fileno()
        self._handle = None  # what the stdlib's Connection checks to know it is closed
        self._reader.fd = -1
        return fd

    def close(self) -> None:
        self._reader.fd = -1  # never reach a descriptor number that another file reuses
        super().close()


_TIMEVAL = "@ll"


def set_recv_timeout(sock: socket.socket, seconds: float) -> None:
    """The receive timeout of a blocking socket (0: none)."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack(_TIMEVAL, whole, int((seconds - whole) * 1e6)))


def _set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Receive and send timeouts of a blocking socket (so a read or write of a stopped peer ends)."""
    whole = int(seconds)
    micros = int((seconds - whole) * 1e6)
    if not whole and not micros:
        micros = 1  # a zero timeval would mean no timeout at all
    value = struct.pack(_TIMEVAL, whole, micros)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
