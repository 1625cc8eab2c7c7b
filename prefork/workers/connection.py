"""How a worker accepts: the hoisted accept, and the client timeout on each connection.

``--client-timeout`` is kept by the kernel (SO_RCVTIMEO, SO_SNDTIMEO) rather than by
``socket.settimeout``: with a Python timeout every read and write first calls poll(),
five more system calls for a small HTTP request (strace: 9 -> 14 per request), where the
kernel's costs nothing per call. A TCP connection inherits it from its listener; a Unix
one does not and is given it as it is accepted (two setsockopt calls).

The kernel reports an expired timeout as EAGAIN on a blocking socket, which buffered
readers (``rfile``) take for "no data" and so for the end of the stream, and which a
handler's ``recv`` raises as BlockingIOError. Connections with a client timeout are
therefore ``TimedConnection``s, which raise TimeoutError instead, exactly as a socket
with ``settimeout`` does: ``readline`` fails rather than returning half a line, and
socketserver code that handles timeouts (http.server does) handles this one.
"""

from __future__ import annotations

import socket
import socketserver
from collections.abc import Callable
from typing import Any

from ..listeners import set_client_timeout, timeval

Accept = Callable[[], tuple[socket.socket, Any]]


class TimedConnection(socket.socket):
    """A connection whose reads and writes the kernel bounds: outwaiting the bound
    raises TimeoutError. A handler that made the socket non-blocking or gave it its own
    timeout sees what it asked for: EAGAIN is translated only in blocking mode, where
    nothing but the kernel's timeout produces it."""

    __slots__ = ()

    def recv(self, *args: Any) -> bytes:
        try:
            return _recv(self, *args)
        except BlockingIOError as exc:
            raise self._timed_out(exc) from None

    def recv_into(self, *args: Any) -> int:
        try:
            return _recv_into(self, *args)
        except BlockingIOError as exc:
            raise self._timed_out(exc) from None

    def send(self, *args: Any) -> int:
        try:
            return _send(self, *args)
        except BlockingIOError as exc:
            raise self._timed_out(exc) from None

    def sendall(self, *args: Any) -> None:
        try:
            _sendall(self, *args)
        except BlockingIOError as exc:
            raise self._timed_out(exc) from None

    def _timed_out(self, exc: BlockingIOError) -> OSError:
        """In blocking mode only the kernel's timeouts give EAGAIN: a timeout. A socket
        the handler made non-blocking gets its EAGAIN as it is."""
        return TimeoutError("timed out") if self.gettimeout() is None else exc


_recv, _recv_into = socket.socket.recv, socket.socket.recv_into
_send, _sendall = socket.socket.send, socket.socket.sendall


def prepare(server: Any) -> None:
    """At boot, once per server: how its connections are accepted. Sets instance
    attributes only (``get_request``, ``_prefork_client_timeout``); the class's own
    methods stay as they are."""
    timeout = client_timeout(server)
    server._prefork_client_timeout = timeout  # handle_error logs its expiry at debug level
    per_connection = timeout if server.socket.family == socket.AF_UNIX else None
    stock = type(server).get_request is socketserver.TCPServer.get_request
    if stock and not server.socket.gettimeout():
        server.get_request = accept_on(server.socket, timeout is not None, per_connection)
    elif timeout is not None:
        server.get_request = _timed(server.get_request, per_connection)


def client_timeout(server: Any) -> float | None:
    """--client-timeout for ``server``'s connections: stream sockets only, and only when
    the handler class sets no timeout of its own (``StreamRequestHandler.timeout`` is
    the precedent, and a handler that sets one knows its protocol: its settimeout makes
    the connection non-blocking, where the kernel's timeouts no longer apply)."""
    timeout = server.prefork_config.client_timeout
    if not timeout or server.socket.type != socket.SOCK_STREAM:
        return None
    if getattr(server.RequestHandlerClass, "timeout", None) is not None:
        return None
    return float(timeout)


def _timed(get_request: Accept, per_connection: float | None) -> Accept:
    """An overridden ``get_request``, its connections made TimedConnections (and, on a
    Unix socket, given the timeout)."""

    def get_request_timed() -> tuple[socket.socket, Any]:
        request, client_address = get_request()
        if type(request) is socket.socket:
            request.__class__ = TimedConnection  # the same object, a stricter recv
        if per_connection is not None:
            set_client_timeout(request, per_connection)
        return request, client_address

    return get_request_timed


def accept_on(listener: socket.socket, timed: bool, per_connection: float | None) -> Accept:
    """``TCPServer.get_request`` for one listening socket, with the constant part done once.

    ``socket.accept`` turns the listener's family and type into enum members and looks
    them up again for every connection; handing the kernel's numbers straight to the new
    socket is the same socket and saves about 2.5 us of a request's ~190 (measured on
    2,000 queued connections: 8.5 -> 6.1 us per accept). Its only other step, making
    the connection blocking when the listener has a timeout, does not apply to a
    listener without one (workers' are non-blocking), and the new socket follows
    ``socket.getdefaulttimeout()`` just as ``accept``'s does. ``timed``: connections
    are TimedConnections; ``per_connection``: the client timeout to give each one (a
    Unix socket's, which the kernel does not copy from the listener).
    """
    family, kind, proto = int(listener.family), int(listener.type), listener.proto
    accept = listener._accept  # type: ignore[attr-defined]
    new_socket = TimedConnection if timed else socket.socket

    def get_request() -> tuple[socket.socket, Any]:
        fd, address = accept()
        return new_socket(family, kind, proto, fileno=fd), address

    if per_connection is None:
        return get_request
    value, level = timeval(per_connection), socket.SOL_SOCKET
    receive, send = socket.SO_RCVTIMEO, socket.SO_SNDTIMEO

    def get_request_unix() -> tuple[socket.socket, Any]:
        fd, address = accept()
        connection = new_socket(family, kind, proto, fileno=fd)
        connection.setsockopt(level, receive, value)
        connection.setsockopt(level, send, value)
        return connection, address

    return get_request_unix
