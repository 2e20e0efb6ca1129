"""Framing: messages as ``multiprocessing.connection`` frames them (a 4-byte big-endian length, then the
payload), read and written with one system call each way where the stdlib's ``Connection`` makes two
reads per message."""

from __future__ import annotations

import os
import struct

#: multiprocessing's frame header: a signed big-endian length; -1 announces an 8-byte length after it
#: (messages of 2 GiB or more).
HEADER = struct.Struct("!i")
LONG_HEADER = struct.Struct("!Q")
_LONG = 0x7FFFFFFF
#: Bytes asked for by one read: a request or an answer of up to this size costs one system call.
READ_SIZE = 65536
#: Payloads up to this size are copied behind their header and written in one call (as the stdlib does).
_JOIN_MAX = 16384


def write_message(fd: int, payload: bytes) -> None:
    """Write one framed message, whole (a write may take less than it was given)."""
    n = len(payload)
    if n <= _JOIN_MAX:
        write_raw(fd, HEADER.pack(n) + payload)
        return
    write_raw(fd, HEADER.pack(n) if n <= _LONG else HEADER.pack(-1) + LONG_HEADER.pack(n))
    write_raw(fd, payload)


def frame(payload: bytes) -> bytes:
    """A framed message, header and payload."""
    n = len(payload)
    return (HEADER.pack(n) if n <= _LONG else HEADER.pack(-1) + LONG_HEADER.pack(n)) + payload


def write_raw(fd: int, data: bytes) -> None:
    """Write bytes that are already framed, whole (a write may take less than it was given)."""
    written = os.write(fd, data)
    if written != len(data):
        with memoryview(data) as view:
            while written < len(data):
                written += os.write(fd, view[written:])


class MessageReader:
    """Reads framed messages from a file descriptor, as few system calls as it takes: usually one read
    of up to ``READ_SIZE`` bytes per message. Bytes read past the end of a message (a peer that sends
    two messages at once) are kept for the next ``read``. End of file raises ``EOFError``."""

    __slots__ = ("fd", "_buffer")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def buffered(self) -> bool:
        """Whether bytes of another message were read already (a peer that sent requests in a row)."""
        return bool(self._buffer)

    def read(self) -> bytes | bytearray:
        """The payload of the next message."""
        if not self._buffer:
            data = os.read(self.fd, READ_SIZE)
            if len(data) >= 4 and HEADER.unpack_from(data)[0] == len(data) - 4:
                return data[4:]  # the usual case: exactly one whole message
            if not data:
                raise EOFError("end of file")
            self._buffer = data
        return self._read_slowly()

    def _read_slowly(self) -> bytes | bytearray:
        buffer = bytearray(self._buffer)
        self._buffer = b""
        self._fill(buffer, 4)
        (size,) = HEADER.unpack_from(buffer)
        start = 4
        if size == -1:
            self._fill(buffer, 12)
            (size,) = LONG_HEADER.unpack_from(buffer, 4)
            start = 12
        elif size < 0:
            raise OSError(f"invalid message length {size}")
        end = start + size
        if len(buffer) >= end:
            self._buffer = bytes(buffer[end:])
            return bytes(buffer[start:end])
        # The rest of a large message: read straight into its place, never past its end.
        payload = bytearray(size)
        have = len(buffer) - start
        payload[:have] = buffer[start:]
        with memoryview(payload) as view:
            while have < size:
                got = os.readv(self.fd, [view[have:]])
                if not got:
                    raise EOFError("end of file inside a message")
                have += got
        return payload

    def _fill(self, buffer: bytearray, size: int) -> None:
        while len(buffer) < size:
            data = os.read(self.fd, READ_SIZE)
            if not data:
                raise EOFError("end of file inside a message")
            buffer += data
