"""The lean framing of calls and answers reads and writes exactly what multiprocessing's connections do."""

from __future__ import annotations

import os
import socket
import threading
from multiprocessing import connection as mpc

import pytest

from sharedstate.wire.framing import MessageReader, write_message, write_raw

SIZES = [0, 1, 3, 4, 100, 16384, 16385, 65531, 65532, 65536, 200_000, 3_000_000]


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _payload(n: int) -> bytes:
    return bytes(i % 251 for i in range(min(n, 251))) * (n // 251) + bytes(range(n % 251))


def _in_thread(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args)
    thread.start()
    return thread


@pytest.mark.parametrize("size", SIZES)
def test_a_message_sent_by_multiprocessing_is_read_whole(pair, size):
    a, b = pair
    payload = _payload(size)
    assert len(payload) == size
    sender = mpc.Connection(os.dup(a.fileno()))
    writer = _in_thread(sender.send_bytes, payload)
    assert bytes(MessageReader(b.fileno()).read()) == payload
    writer.join()
    sender.close()


@pytest.mark.parametrize("size", SIZES)
def test_a_message_written_here_is_read_by_multiprocessing(pair, size):
    a, b = pair
    payload = _payload(size)
    receiver = mpc.Connection(os.dup(b.fileno()))
    writer = _in_thread(write_message, a.fileno(), payload)
    assert receiver.recv_bytes() == payload
    writer.join()
    receiver.close()


def test_messages_that_arrive_together_are_read_one_by_one(pair):
    a, b = pair
    messages = [b"first", b"", _payload(70_000), b"last"]
    data = b"".join(len(m).to_bytes(4, "big") + m for m in messages)
    writer = _in_thread(write_raw, a.fileno(), data)
    reader = MessageReader(b.fileno())
    assert [bytes(reader.read()) for _ in messages] == messages
    writer.join()


def test_a_message_that_arrives_byte_by_byte_is_read_whole(pair):
    a, b = pair
    payload = b"in small pieces"
    data = len(payload).to_bytes(4, "big") + payload

    def dribble() -> None:
        for i in range(len(data)):
            a.sendall(data[i : i + 1])

    writer = _in_thread(dribble)
    assert bytes(MessageReader(b.fileno()).read()) == payload
    writer.join()


def test_end_of_file_before_or_inside_a_message_is_eof_error(pair):
    a, b = pair
    a.sendall((100).to_bytes(4, "big") + b"only part")
    a.shutdown(socket.SHUT_WR)
    reader = MessageReader(b.fileno())
    with pytest.raises(EOFError):
        reader.read()
    with pytest.raises(EOFError):
        reader.read()
