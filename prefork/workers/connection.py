"""How a worker accepts: the hoisted accept, and the client timeout on each connection.

``--client-timeout T`` bounds how long a client can keep a handler waiting. Two parts:

- The kernel bounds each read and write (SO_RCVTIMEO, SO_SNDTIMEO) rather than
  ``socket.settimeout``: with a Python timeout every read and write first calls poll(),
  five more system calls for a small HTTP request (strace: 9 -> 14 per request), where
  the kernel's cost nothing per call. A TCP connection inherits them from its listener;
  a Unix one does not and is given them as it is accepted (two setsockopt calls).
- ``TimedConnection`` bounds the waiting in all, so that a client sending a byte just
  before each T runs out (slow loris) or reading its answer as slowly (slow read) cannot
  hold a handler either. Each connection has T seconds of waiting to spend; time spent
  blocked in a read or write is taken from it, every byte moved gives back 1/MIN_RATE s
  (as Apache's mod_reqtimeout does: a client that keeps up MIN_RATE bytes a second never
  runs out), never above T; a write the client takes at once refills it (the client is
  keeping up; its next silence starts now). Running out raises ``ClientTimeout``.
  ``--client-max-wait`` bounds the waiting added up over the whole connection, which
  no byte gives back: a client that keeps just above MIN_RATE, or sends a small
  request just inside every T on a kept-alive connection (refilling the allowance with
  each prompt answer), would otherwise hold a thread worker's thread for ever.

The kernel reports an expired timeout as EAGAIN on a blocking socket, which buffered
readers (``rfile``) would take for the end of the stream: ``TimedConnection`` raises
``ClientTimeout`` (a TimeoutError) instead, exactly what a socket with ``settimeout``
raises, so ``readline`` fails rather than returning half a line, and socketserver code
that handles timeouts (http.server does) handles this one. A handler that makes the
socket non-blocking, or gives it its own timeout, gets what it asked for.

Under TCP_DEFER_ACCEPT the kernel hands over a connection before its client has sent
anything only once the deferral has run out: if the first read finds nothing, the
client has been silent for the whole deferral, and it ends there (no waiting at all).
"""

from __future__ import annotations

import os
import socket
import socketserver
import time
from collections.abc import Callable
from typing import Any

from ..listeners import set_client_timeout, timeval

Accept = Callable[[], tuple[socket.socket, Any]]
MIN_RATE = 500  # bytes a second that keep a connection's waiting allowance full
KEEPING_UP = 0.005  # seconds: a write that returns sooner took no waiting
CHUNK = 1 << 16  # a larger sendall is sent piece by piece, each piece accounted
_now = time.monotonic


class ClientTimeout(TimeoutError):
    """The client kept the handler waiting longer than ``setting`` allows."""

    def __init__(self, message: str, setting: str = "--client-timeout") -> None:
        super().__init__(message)
        self.setting = setting


class TimedConnection(socket.socket):
    """An accepted connection whose waiting on the client is bounded (module docstring).

    Class attributes, set per server by ``timed_connection``: ``LIMIT`` (the client
    timeout) and ``DEFERRED`` (the listener defers accept: a first read must not wait).
    """

    __slots__ = ("_prefork_allowance", "_prefork_fresh", "_prefork_budget")
    LIMIT = 10.0
    DEFERRED = False
    MAX_WAIT = float("inf")  # --client-max-wait (0, off: infinite)

    def start(self) -> TimedConnection:
        # accept_on's get_request_timed writes this out: keep the two in step
        self._prefork_allowance, self._prefork_fresh = self.LIMIT, self.DEFERRED
        self._prefork_budget = self.MAX_WAIT
        return self

    # Every read of a request runs recv or recv_into, so each is one frame: the
    # accounting is written out in both rather than called (send, reached only by a
    # write that could not go at once, or a handler's own send, shares _account).
    # With the flag as a plain int (_DONTWAIT) and sendall's first send not timed, the
    # client timeout costs a TCP echo request about 2k instructions in the worker
    # (callgrind: 80.5k without it, 82.6k with it; 98k before).
    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._prefork_fresh:  # deferred accept: the request is there, nothing to time
            self._prefork_fresh = False
            try:
                return _recv(self, bufsize, flags | _DONTWAIT)
            except BlockingIOError as exc:
                raise self._timed_out(exc, flags | _DONTWAIT) from None
        started = _now()
        try:
            data = _recv(self, bufsize, flags)
        except BlockingIOError as exc:
            raise self._timed_out(exc, flags) from None
        waited = _now() - started
        allowance = self._prefork_allowance - waited + len(data) / MIN_RATE
        self._prefork_budget -= waited
        if allowance < 0 or self._prefork_budget < 0:
            raise self._out_of_time(allowance)
        self._prefork_allowance = allowance if allowance < self.LIMIT else self.LIMIT
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self._prefork_fresh:  # as in recv
            self._prefork_fresh = False
            try:
                return _recv_into(self, buffer, nbytes, flags | _DONTWAIT)
            except BlockingIOError as exc:
                raise self._timed_out(exc, flags | _DONTWAIT) from None
        started = _now()
        try:
            count = _recv_into(self, buffer, nbytes, flags)
        except BlockingIOError as exc:
            raise self._timed_out(exc, flags) from None
        waited = _now() - started
        allowance = self._prefork_allowance - waited + count / MIN_RATE
        self._prefork_budget -= waited
        if allowance < 0 or self._prefork_budget < 0:
            raise self._out_of_time(allowance)
        self._prefork_allowance = allowance if allowance < self.LIMIT else self.LIMIT
        return count

    def send(self, data: Any, flags: int = 0) -> int:
        self._prefork_fresh, started = False, _now()  # the server speaks: no deferral
        try:
            count = _send(self, data, flags)
        except BlockingIOError as exc:
            raise self._timed_out(exc, 0) from None
        waited = _now() - started
        if waited < KEEPING_UP:  # the client keeps up: its next silence starts now
            self._prefork_allowance = self.LIMIT
        else:
            self._account(waited, count)
        return count

    def sendall(self, data: Any, flags: int = 0) -> None:
        # First without waiting: what fits in the send buffer (nearly every answer) goes
        # in the one send() that sendall would make, and took no waiting to account for.
        self._prefork_fresh = False
        try:
            sent = _send(self, data, flags | _DONTWAIT)
        except BlockingIOError:
            sent = 0
        size = len(data) if type(data) is bytes else memoryview(data).nbytes
        if sent == size:
            self._prefork_allowance = self.LIMIT  # the client keeps up (as in send)
            return
        # The rest waits on the client: through send, each piece of at most CHUNK
        # accounted, so that a slow reader is timed while it reads.
        with memoryview(data) as view, view.cast("B") as octets:
            while sent < size:
                sent += self.send(octets[sent : sent + CHUNK], flags)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """os.sendfile, a CHUNK at a time, each piece accounted as ``send`` accounts: the
        kernel's send timeout bounds each, the allowance all of them. A file os.sendfile
        cannot send (no descriptor) goes through ``send``. Leaves the file's position
        after what was sent, as ``socket.sendfile`` does."""
        try:
            fd = file.fileno()
        except (AttributeError, OSError, ValueError):
            return self._sendfile_use_send(file, offset, count)  # type: ignore[attr-defined,no-any-return]
        self._prefork_fresh, total, out = False, 0, self.fileno()
        while count is None or total < count:
            piece = CHUNK if count is None else min(CHUNK, count - total)
            started = _now()
            try:
                sent = os.sendfile(out, fd, offset + total, piece)
            except BlockingIOError as exc:
                raise self._timed_out(exc, 0) from None
            if not sent:
                break  # the end of the file
            total += sent
            waited = _now() - started
            if waited < KEEPING_UP:
                self._prefork_allowance = self.LIMIT
            else:
                self._account(waited, sent)
        file.seek(offset + total)
        return total

    def _account(self, waited: float, moved: int) -> None:
        """Take ``waited`` from the allowance and the budget, give back ``moved`` bytes'
        worth: recv and recv_into do the same, written out."""
        allowance = self._prefork_allowance - waited + moved / MIN_RATE
        self._prefork_budget -= waited
        if allowance < 0 or self._prefork_budget < 0:
            raise self._out_of_time(allowance)
        self._prefork_allowance = allowance if allowance < self.LIMIT else self.LIMIT

    def _out_of_time(self, allowance: float) -> ClientTimeout:
        if allowance < 0:
            return ClientTimeout(f"the client kept the handler waiting over {self.LIMIT:g}s")
        return ClientTimeout(
            f"the client kept the handler waiting over {self.MAX_WAIT:g}s in all",
            "--client-max-wait",
        )

    def _timed_out(self, exc: BlockingIOError, flags: int) -> OSError:
        """EAGAIN where the socket blocks comes only from the kernel's timeouts, or from
        our first non-waiting read: a timeout. A handler's non-blocking socket gets its
        EAGAIN as it is."""
        if flags & _DONTWAIT and self.gettimeout() is None:
            return ClientTimeout("the client sent nothing during the accept deferral")
        if self.gettimeout() is None:
            return ClientTimeout(f"the client was silent for {self.LIMIT:g}s")
        return exc


_recv, _recv_into = socket.socket.recv, socket.socket.recv_into
_send = socket.socket.send
_DONTWAIT = int(socket.MSG_DONTWAIT)  # the enum member would make "|" a Python call


def timed_connection(limit: float, deferred: bool, max_wait: float = 0.0) -> type[TimedConnection]:
    """The connection class of one server: its client timeout, whether its listener
    defers accept, and its --client-max-wait (0: none)."""
    attributes = {"LIMIT": limit, "DEFERRED": deferred, "MAX_WAIT": max_wait or float("inf")}
    return type("TimedConnection", (TimedConnection,), attributes)


def prepare(server: Any) -> None:
    """At boot, once per server: how its connections are accepted. Sets instance
    attributes only (``get_request``); the class's own methods stay as they are."""
    timeout = client_timeout(server)
    if timeout is None:
        connection_class: type[socket.socket] = socket.socket
    else:
        config = server.prefork_config
        deferred = bool(config.defer_accept) and _is_tcp(server.socket)
        connection_class = timed_connection(timeout, deferred, config.client_max_wait)
    # A Unix connection does not inherit the kernel's timeouts from its listener.
    per_connection = timeout if server.socket.family == socket.AF_UNIX else None
    stock = type(server).get_request is socketserver.TCPServer.get_request
    if stock and not server.socket.gettimeout():
        server.get_request = accept_on(server.socket, connection_class, per_connection)
    elif timeout is not None:
        server.get_request = _timed(server.get_request, connection_class, per_connection)
    if server.socket.family == socket.AF_UNIX and server.socket.type == socket.SOCK_STREAM:
        server.get_request = _with_unix_peers(server.get_request)


# What a handler sees as ``client_address`` for a stream Unix connection whose peer has
# no name (nearly all: clients rarely bind). socketserver hands on accept()'s "", which
# every handler that reads ``client_address[0]`` (http.server's address_string, wsgiref's
# REMOTE_ADDR, logging) fails on; nginx writes "unix:" for such a peer, and so do we.
UNIX_PEER = ("unix:", 0)


def unix_peer(address: Any) -> Any:
    """A stream Unix peer's address as a (host, port) pair: ("unix:", 0), or
    ("unix:PATH", 0) for a peer bound to a name. Anything else is left as it is."""
    if not address:
        return UNIX_PEER
    if isinstance(address, bytes):  # an abstract name: "\0" first, shown as "@"
        address = "@" + address[1:].decode("utf-8", "replace")
    return (f"unix:{address}", 0) if isinstance(address, str) else address


def _with_unix_peers(get_request: Accept) -> Accept:
    def get_request_named() -> tuple[socket.socket, Any]:
        request, address = get_request()
        return request, UNIX_PEER if address == "" else unix_peer(address)

    return get_request_named


def _is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM


def client_timeout(server: Any) -> float | None:
    """--client-timeout for ``server``'s connections (stream sockets), or None."""
    timeout = server.prefork_config.client_timeout
    if not timeout or server.socket.type != socket.SOCK_STREAM:
        return None
    return float(timeout)


def _timed(get_request: Accept, timed: type[Any], per_connection: float | None) -> Accept:
    """An overridden ``get_request``: its plain sockets become ``timed`` connections (the
    same descriptor; a wrapped one, an SSL socket say, is left as it is), and on a Unix
    socket are given the timeout."""

    def get_request_timed() -> tuple[socket.socket, Any]:
        request, client_address = get_request()
        if type(request) is socket.socket:
            family, kind, proto = request.family, request.type, request.proto
            request = timed(family, kind, proto, fileno=request.detach()).start()
        if per_connection is not None:
            set_client_timeout(request, per_connection)
        return request, client_address

    return get_request_timed


def accept_on(
    listener: socket.socket, connection_class: type[Any], per_connection: float | None
) -> Accept:
    """``TCPServer.get_request`` for one listening socket, with the constant part done once.

    ``socket.accept`` turns the listener's family and type into enum members and looks
    them up again for every connection; handing the kernel's numbers straight to the new
    socket is the same socket and saves about 2.5 us of a request's ~190 (measured on
    2,000 queued connections: 8.5 -> 6.1 us per accept). Its only other step, making
    the connection blocking when the listener has a timeout, does not apply to a
    listener without one (workers' are non-blocking), and the new socket follows
    ``socket.getdefaulttimeout()`` just as ``accept``'s does. ``connection_class``:
    socket.socket, or a TimedConnection class; ``per_connection``: the client timeout
    to give each connection (a Unix socket's, which the kernel does not copy).
    """
    family, kind, proto = int(listener.family), int(listener.type), listener.proto
    accept = listener._accept  # type: ignore[attr-defined]

    if connection_class is socket.socket:

        def get_request() -> tuple[socket.socket, Any]:
            fd, address = accept()
            return connection_class(family, kind, proto, fileno=fd), address

        return get_request

    if per_connection is None:
        limit, fresh, budget = (
            connection_class.LIMIT,
            connection_class.DEFERRED,
            connection_class.MAX_WAIT,
        )

        def get_request_timed() -> tuple[socket.socket, Any]:
            fd, address = accept()
            connection = connection_class(family, kind, proto, fileno=fd)
            # start(), written out: a call fewer on every connection
            connection._prefork_allowance, connection._prefork_fresh = limit, fresh
            connection._prefork_budget = budget
            return connection, address

        return get_request_timed

    value, level = timeval(per_connection), socket.SOL_SOCKET
    receive, send = socket.SO_RCVTIMEO, socket.SO_SNDTIMEO

    def get_request_unix() -> tuple[socket.socket, Any]:
        fd, address = accept()
        connection = connection_class(family, kind, proto, fileno=fd).start()
        connection.setsockopt(level, receive, value)
        connection.setsockopt(level, send, value)
        return connection, address

    return get_request_unix
