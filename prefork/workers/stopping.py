"""How a handler learns that its worker is stopping, and keep-alive that ends with it.

``server.prefork_stopping`` is a ``threading.Event``, set the moment the worker is told
to stop (TERM: a graceful stop, a reload retiring it, --max-requests): a handler that
holds a long conversation (a log receiver, a chat) checks it between messages and ends
the conversation, so the stop does not wait for --graceful-timeout and a SIGKILL.

http.server-family handlers (BaseHTTPRequestHandler subclasses: SimpleHTTPRequestHandler,
SimpleXMLRPCRequestHandler, WSGIRequestHandler...) need nothing: the worker serves them
through a subclass of the app's own that

- answers the request it is serving with ``Connection: close`` once the event is set
  (http.server then closes the connection after the response), and
- wakes a keep-alive connection that waits for its next request: reading is shut down
  (``shutdown(SHUT_RD)``), so the wait ends at once, as if the client had closed. Only
  a connection with nothing received is shut: one whose request has begun to arrive
  (accepted while the worker drains, or whose next request is in) is served, with
  ``Connection: close``, waiting for the rest of it, a POST's body say, however it is
  split. (Shut, a connection would read what had arrived and then an end of stream
  where the rest was still on its way: the request cut.) A request sent after that
  moment finds the connection closed, as with any server that closes idle keep-alive
  connections (a client retries it).

The cost on the request path is a set insert and a set removal per request, for HTTP
handlers only.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from typing import Any


class Stopping:
    """One worker's: the event its servers share, and the connections waiting between
    requests, to wake when it is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.waiting: set[socket.socket] = set()  # add/discard are atomic: no lock

    def set(self) -> None:
        """From the worker's loop, or its TERM handler (a sync worker's loop may be inside
        a handler that waits for its client)."""
        self.event.set()
        for sock in list(self.waiting):
            shut_if_idle(sock)

    def serving(self, handler_class: Any) -> Any:
        """The class to serve ``handler_class`` with: itself, or for an http.server-family
        handler, a subclass that ends keep-alive when the worker stops. (http.server is
        not imported here: a handler of its family has imported it already.)"""
        if getattr(handler_class, "stops_with_worker", False):  # prefork's WSGI handler
            return type(handler_class.__name__, (handler_class,), {"stopping": self})
        module = sys.modules.get("http.server")
        base = getattr(module, "BaseHTTPRequestHandler", None)
        if base is None or not (
            isinstance(handler_class, type) and issubclass(handler_class, base)
        ):
            return handler_class
        return _stop_aware(handler_class, self)


_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_recv = socket.socket.recv  # _socket's: an override (connection.TimedConnection) is not used


def shut_if_idle(sock: socket.socket) -> None:
    """Shut down reading on ``sock`` unless bytes of a request are waiting in it. The
    socket module's own recv, not a connection class's: this looks, it waits for no one."""
    try:
        if _recv(sock, 1, _PEEK):
            return  # a request has begun to arrive: it is served
    except BlockingIOError:
        pass  # nothing received: the client waits for us, shut it
    except OSError:
        return  # reset, or not a stream socket: nothing to wake
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)


def _stop_aware(handler_class: type, stopping: Stopping) -> Any:
    event, waiting = stopping.event, stopping.waiting

    class StopAware(handler_class):  # type: ignore[misc]
        close_connection: bool
        connection: socket.socket

        def handle_one_request(self) -> None:
            connection = self.connection
            waiting.add(connection)  # until the request line is in (parse_request)
            try:
                if event.is_set():  # set before this connection was waiting: wake it too
                    shut_if_idle(connection)
                super().handle_one_request()
            finally:
                waiting.discard(connection)

        def parse_request(self) -> bool:
            waiting.discard(self.connection)
            return bool(super().parse_request())

        def end_headers(self) -> None:
            if event.is_set() and not self.close_connection:
                self.send_header("Connection", "close")  # which sets close_connection
            super().end_headers()

    StopAware.__name__ = handler_class.__name__
    StopAware.__qualname__ = handler_class.__qualname__
    StopAware.__module__ = handler_class.__module__
    return StopAware
