"""The serving side of the server process: ``multiprocessing.managers.Server`` with the store at a
fixed id, admission of new connections, a lean serving loop, and the keepalives a caller waiting for a
lock is sent."""

from __future__ import annotations

import functools
import logging
import os
import pickle
import select
import socket
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import connection as mpc
from multiprocessing import managers
from typing import Any

from sharedstate._sentinels import HANDED
from sharedstate.server.admission import Admission, raise_fd_limit
from sharedstate.server.service import StateService, current_client
from sharedstate.wire.addresses import STORE_ID, Address
from sharedstate.wire.answers import Duplicate, answer_of, current_request
from sharedstate.wire.framing import MessageReader, frame, write_message, write_raw

log = logging.getLogger(__name__)

#: Connections that may wait to be accepted.
LISTEN_BACKLOG = 1024
#: Answers are plain data and exceptions, read by ``pickle.loads`` on the other side.
_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: The answer to a lock_acquire that was handed the lock, framed.
_GRANTED = frame(pickle.dumps(("#RETURN", True), _PROTOCOL))


_WAITS = StateService.WAITS

#: A keepalive: an empty message, which no answer is (an answer is a pickle).
_KEEPALIVE = frame(b"")


def _readable_within(
    fd: int, keepalive: float | None = None, buffered: Callable[[], bool] | None = None
) -> Callable[..., bool]:
    """``readable(seconds, wake=None)``: whether ``fd`` has something to read within that long (``True``
    at once when ``buffered()``: the serving loop read a request past the one that waits, such as the
    request that ends a cancelled wait); ``False`` at once too when the descriptor ``wake`` has (a
    watch's pipe: ``server.changes``). With ``keepalive`` (seconds), a waiting caller is sent an empty
    message at least that often meanwhile, so that its receive timeout tells a long wait from a server
    that stopped answering."""
    if buffered is None:
        buffered = bool
    poller = select.poll()
    poller.register(fd, select.POLLIN)

    def polled(milliseconds: float, wake: int | None) -> bool | None:
        """``True``: ``fd`` is readable; ``False``: ``wake`` is; ``None``: neither, in that long."""
        if wake is None:
            return True if poller.poll(milliseconds) else None
        poller.register(wake, select.POLLIN)
        try:
            events = poller.poll(milliseconds)
        finally:
            poller.unregister(wake)
        if not events:
            return None
        return any(ready == fd for ready, _ in events)

    if keepalive is None:

        def readable(seconds: float, wake: int | None = None) -> bool:
            return buffered() or bool(polled(seconds * 1000, wake))

        return readable

    interval = max(keepalive, 0.001)
    # When the last keepalive went out (or the wait began), and when the last call of a wait returned: a
    # lock wait calls this again and again, so a longer pause means a new wait, whose caller heard from
    # the server just now (its request went out): a wait shorter than the interval costs no keepalive.
    last = [0.0]
    returned = [0.0]

    def readable_with_keepalives(seconds: float, wake: int | None = None) -> bool:
        if buffered():
            return True
        now = time.monotonic()
        if now - returned[0] > interval:
            last[0] = now
        try:
            return _poll_with_keepalives(now + seconds, wake)
        finally:
            returned[0] = time.monotonic()

    def _poll_with_keepalives(end: float, wake: int | None) -> bool:
        while True:
            now = time.monotonic()
            if now - last[0] >= interval:
                # One small write: it never splits a hand-over's answer written by another thread. A
                # keepalive that lands after that answer is skipped by the client before its next one.
                try:
                    write_raw(fd, _KEEPALIVE)
                except OSError:
                    return True  # the caller is gone: its wait ends
                last[0] = now
            span = min(end, last[0] + interval) - now
            ready = polled(max(0.0, span) * 1000, wake)
            if ready is not None:
                return ready
            if time.monotonic() >= end:
                return False

    return readable_with_keepalives


class ManagerServer(managers.Server):
    """``managers.Server`` with the store at a fixed id, client tracking, and a stoppable accept loop."""

    def __init__(self, service: StateService, address: Address, authkey: bytes) -> None:
        super().__init__({}, address, authkey, "pickle")
        # The manager listens with a backlog of 16 (Python < 3.13): a pool of processes connecting at
        # once would overflow it. listen() again raises the backlog of the same socket.
        sock = self.listening_socket
        sock.listen(LISTEN_BACKLOG)
        self.admission = Admission(sock, raise_fd_limit())
        self.service = service
        self.id_to_obj[STORE_ID] = (service, frozenset(service.EXPOSED), None)
        #: What a request may call, bound once: the serving loop looks a method up in one dict.
        self.methods: dict[str, Callable[..., Any]] = {name: getattr(service, name) for name in service.EXPOSED}
        self.stop_event = threading.Event()

    @property
    def listening_socket(self) -> socket.socket:
        """The socket the server listens on. ``multiprocessing.connection.Listener`` offers no accessor:
        this is the one place that reaches into it."""
        return self.listener._listener._socket

    def stop_listening(self) -> None:
        """Accept no new connection (this also unlinks a Unix socket)."""
        try:
            self.listener.close()
        except OSError:
            pass

    def accept_connection(self, c: mpc.Connection, hello: Any) -> None:  # type: ignore[override]
        if not isinstance(hello, dict) or "pid" not in hello or "scope" not in hello:
            raise TypeError("not a sharedstate client")
        client = self.service.connected(hello)
        current = current_client
        current.client = client
        current.notify = functools.partial(write_raw, c.fileno(), _GRANTED)
        current.fd = c.fileno()
        keepalive = hello.get("keepalive")
        reader = MessageReader(c.fileno())
        current.readable = _readable_within(
            c.fileno(), keepalive if type(keepalive) in (int, float) and keepalive > 0 else None, reader.buffered
        )
        try:
            c.send(("#RETURN", self.service.info()))
            writer = hello.get("client")
            self.serve(c, writer if type(writer) is str else None, reader)
        finally:
            if current.waiting is not None:
                current.waiting.close()
            current.client = current.notify = current.readable = current.waiting = None
            current.fd = -1
            self.service.disconnected(client)
        # Returning normally would make the manager send one more ('#RETURN', None), which a client
        # waiting for an answer would take as a success.
        raise SystemExit(0)

    def serve(self, conn: mpc.Connection, client: str | None = None, reader: MessageReader | None = None) -> None:
        """Answer one client's requests until it goes away or the server stops: the stdlib's
        ``serve_client`` loop with the same requests and answers, made leaner (one read and one write
        per call, the plain pickler, methods bound once). A method's exception is answered with
        ``('#ERROR', exception)``; a request that is not a call of an exposed method with
        ``('#TRACEBACK', text)``; an answer that cannot be pickled with ``('#UNSERIALIZABLE', text)``.

        A write names the store by its request id instead: its sequence number (the client is the one
        the connection introduced as, ``client``), or ``(client, sequence)`` (``wire.answers``)."""
        reader = MessageReader(conn.fileno()) if reader is None else reader
        calls = self.service.calls
        counts = calls.open()  # this thread's own: counting takes no lock
        try:
            self._serve(reader, counts, client)
        finally:
            calls.retire(counts)

    def _serve(self, reader: MessageReader, counts: dict[str, int], client: str | None) -> None:
        read, fd, buffered = reader.read, reader.fd, reader.buffered
        queued: list[bytes] = []  # answers not written yet, while more requests are buffered
        methods = self.methods
        answers = self.service.answers.table
        request_now = current_request
        stopping = self.stop_event.is_set
        loads, dumps = pickle.loads, pickle.dumps
        while True:
            if stopping():
                if queued:  # answers of requests served already (writes among them, applied): sent
                    try:
                        write_raw(fd, b"".join(queued))
                    except OSError:
                        pass  # the client is gone
                return
            try:
                request = read()
            except (EOFError, OSError):
                return  # the client closed its connection (or it broke)
            try:
                ident, name, args, kwds = loads(request)
                writer = None
                if ident != STORE_ID:
                    # A write: its request id in place of the store's id (``wire.answers``).
                    if type(ident) is int and client is not None:
                        writer, sequence = client, ident
                    elif type(ident) is tuple and len(ident) == 2 and type(ident[0]) is str and type(ident[1]) is int:
                        writer, sequence = ident
                    else:
                        raise KeyError(f"no object with id {ident!r}")
                function = methods[name]
                counts[name] += 1
                if queued and name in _WAITS:  # it may wait: what was answered goes out first
                    write_raw(fd, b"".join(queued))
                    queued.clear()
            except Exception:
                reply: tuple[str, Any] = ("#TRACEBACK", traceback.format_exc())
            else:
                try:
                    if writer is None:
                        result = function(*args, **kwds) if kwds else function(*args)
                    else:
                        # Inline: this is on the path of every write. If the id was applied already
                        # (before a crash, say), the answer it had then is the answer.
                        entry = answers.get(writer)
                        if entry is not None and entry[0] == sequence:
                            result = answer_of(entry[1])
                        else:
                            request_now.rid = (writer, sequence)
                            try:
                                result = function(*args, **kwds) if kwds else function(*args)
                            except Duplicate as duplicate:  # the same id twice at once: checked under the mutex
                                result = duplicate.answer
                            finally:
                                request_now.rid = None
                except Exception as exc:
                    # Without its traceback: the reply, kept until the next request, would otherwise hold
                    # this frame through it (a cycle only the garbage collector frees).
                    reply = ("#ERROR", exc.with_traceback(None))
                else:
                    if result is HANDED:
                        continue  # a lock handed over: its answer is written already
                    reply = ("#RETURN", result)
            try:
                try:
                    payload = dumps(reply, _PROTOCOL)
                except Exception:
                    payload = dumps(("#UNSERIALIZABLE", traceback.format_exc()), _PROTOCOL)
                if buffered():  # requests sent in a row (a pipelining client): answered in one write
                    queued.append(frame(payload))
                elif queued:
                    queued.append(frame(payload))
                    write_raw(fd, b"".join(queued))
                    queued.clear()
                else:
                    write_message(fd, payload)
            except Exception:
                return  # the client is gone

    def accepter(self) -> None:
        admission = self.admission
        while not self.stop_event.is_set():
            try:
                fd = admission.accept()
            except OSError:
                if self.stop_event.is_set():
                    return
                time.sleep(0.01)  # do not spin on a failing accept
                continue
            if fd is None:
                continue
            try:
                threading.Thread(target=self.handle_request, args=(fd,), daemon=True).start()
            except RuntimeError:  # no thread to spare: the connection goes, the server stays
                admission.admitted(fd)
                os.close(fd)

    def handle_request(self, fd: int) -> None:  # type: ignore[override]
        """Serve one connection: the challenge both ways, then one request of the manager protocol
        (usually accept_connection, which serves the client until it leaves).

        Until the peer has proved it knows the key it is sent nothing but the challenge and its fixed
        failure message: a failed or garbled challenge closes the connection without a word (the
        stdlib's server would answer with a traceback, which names the server's files)."""
        c = mpc.Connection(fd)
        try:
            try:
                mpc.deliver_challenge(c, self.authkey)
                mpc.answer_challenge(c, self.authkey)
            except Exception:  # a wrong key, garbage, a timeout or a peer that left: just close
                return
            finally:
                self.admission.admitted(fd)
            self._serve_request(c)
        except SystemExit:
            pass  # accept_connection and the stdlib's serve_client end with it
        finally:
            c.close()

    def _serve_request(self, c: mpc.Connection) -> None:
        """The stdlib's handling of an authenticated connection's first request."""
        try:
            request = c.recv()
            ignore, funcname, args, kwds = request
            if funcname not in self.public:
                raise ValueError(f"{funcname!r} unrecognized")
            func = getattr(self, funcname)
        except Exception:
            msg: tuple[str, Any] = ("#TRACEBACK", traceback.format_exc())
        else:
            try:
                msg = ("#RETURN", func(c, *args, **kwds))
            except Exception:
                msg = ("#TRACEBACK", traceback.format_exc())
        try:
            c.send(msg)
        except Exception:
            pass  # the client is gone
