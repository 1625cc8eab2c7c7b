"""The request handler that serves a WSGI app over HTTP/1.1, in any worker class.

``handler_for(app)`` makes the socketserver handler class prefork serves ``app`` with:
each connection is one ``handle()``, a loop over its requests.

- **Keep-alive** in thread and fork workers: after a response the connection waits up
  to ``--keep-alive`` seconds for the next request. A sync worker serves one request
  per connection and answers ``Connection: close`` (as gunicorn's sync worker): one
  idle client would otherwise hold the whole worker.
- **Stopping** (TERM, a reload retiring the worker): the request being served is
  answered with ``Connection: close``, and a connection waiting for its next request is
  woken and closed at once (``stopping.py``'s shut_if_idle: only one with nothing
  received), so a stop never waits for idle clients.
- **Refused requests** (parser.py) get their status and ``Connection: close``; the app
  is never called for them. An app that raises before its response has started gets a
  500; after, the connection is closed (the client sees a cut response, as it must).
- A request body the app did not read is read and dropped before the next request (up
  to DRAIN_MAX bytes; past that, or while a 100 Continue was never sent, the
  connection is closed instead).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socketserver
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..escape import printable
from .body import Body
from .environ import ErrorStream, ServerEnviron
from .parser import READ_SIZE, BadRequest, Limits, Request, RequestReader
from .response import FileWrapper, Response, ResponseError

log = logging.getLogger("prefork.wsgi")
app_errors = logging.getLogger("prefork.wsgi.errors")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
DRAIN_MAX = 1 << 20  # bytes of an unread request body dropped to keep the connection
_REASONS = {
    400: "Bad Request", 405: "Method Not Allowed", 413: "Content Too Large",
    414: "URI Too Long", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 505: "HTTP Version Not Supported",
}  # fmt: skip


def is_wsgi_app(obj: Any) -> bool:
    """A callable that is not a class: a function, a bound method, an instance with
    ``__call__`` (Flask's app, Django's WSGIHandler)."""
    return callable(obj) and not isinstance(obj, type)


def handler_for(app: WSGIApp) -> type[WSGIRequestHandler]:
    """The handler class that serves ``app``; a class of its own, so that each app (and
    each reload's import of it) has one."""
    name = getattr(app, "__name__", type(app).__name__)
    return type(f"WSGI[{name}]", (WSGIRequestHandler,), {"application": staticmethod(app)})


class _PerServer:
    """What a server's connections share, made at its first connection in the worker."""

    def __init__(self, server: Any) -> None:
        config = server.prefork_config
        self.limits = Limits(
            config.limit_request_line, config.limit_request_fields, config.limit_request_field_size
        )
        multithread = isinstance(server, socketserver.ThreadingMixIn)
        self.idle = float(config.keep_alive)
        concurrent = multithread or isinstance(server, socketserver.ForkingMixIn)
        self.keep_alive = concurrent and self.idle > 0  # --keep-alive 0: close each
        self.access = server.__dict__.get("prefork_access")  # the worker's, when logging
        self.environ = ServerEnviron(server, ErrorStream(app_errors), FileWrapper, multithread)


class WSGIRequestHandler(socketserver.BaseRequestHandler):
    """Serves one connection's requests to ``application`` (module docstring)."""

    application: WSGIApp
    stops_with_worker = True  # stopping.py hands it ``stopping`` (the worker's Stopping)
    logs_requests = True  # the worker hands it the access log: a line per request
    stopping: Any = None

    def handle(self) -> None:
        server, sock = self.server, self.request
        if isinstance(sock, tuple):  # a datagram (a bind a HUP added): not HTTP
            log.debug(
                "a WSGI app does not serve datagrams; dropped one from %s", self.client_address
            )
            return
        shared = server.__dict__.get("_prefork_wsgi")
        if shared is None:
            shared = server.__dict__["_prefork_wsgi"] = _PerServer(server)
        self.shared: _PerServer = shared
        self.reader = RequestReader(shared.limits)
        self.send = sock.sendall
        stopping = self.stopping
        self.stop_event = event = stopping.event if stopping is not None else None
        first = True
        while True:
            request = self._next_request(first)
            if request is None:
                return
            first = False
            if isinstance(request, BadRequest):
                self._refuse(request)
                return
            keep_alive = shared.keep_alive and request.keep_alive and not request.upgrade
            if event is not None and event.is_set():
                keep_alive = False
            if not self._serve(request, keep_alive) or not self._drained(request):
                return

    # -- reading --------------------------------------------------------------------------
    def _fill(self) -> bool:
        """Read what the client sent next into the parser; False at the end of stream."""
        data = self.request.recv(READ_SIZE)
        if not data:
            self.reader.feed_eof()
            return False
        self.reader.feed(data)
        return True

    def _next_request(self, first: bool) -> Request | BadRequest | None:
        """The next request, its head complete; None when the connection is done with
        (the client closed, kept it idle too long, or the worker is stopping)."""
        reader = self.reader
        while not reader.pending:
            if reader.broken:
                return None
            if not first and not reader.current and not self._wait_idle():
                return None
            try:
                if not self._fill() and not reader.pending:
                    return None
            except (TimeoutError, ConnectionError):
                return None
            first = True  # bytes of this request have come: no more idle waiting
        return reader.pending.popleft()

    def _wait_idle(self) -> bool:
        """Between requests: wait up to --keep-alive for the next one; False when it
        does not come (or the worker stops, which shuts reading: readable at once)."""
        sock = self.request
        stopping = self.stopping
        if stopping is not None:
            if stopping.event.is_set():
                return False
            stopping.waiting.add(sock)
        try:
            readable = select.select([sock], [], [], self.shared.idle)[0]
        finally:
            if stopping is not None:
                stopping.waiting.discard(sock)
        return bool(readable)

    def _drained(self, request: Request) -> bool:
        """Whether the connection can serve another request: the body the app left
        unread is read and dropped (up to DRAIN_MAX)."""
        if request.complete:
            return True
        if request.expect_continue and not request.continue_sent:
            return False  # the client waits for a 100 Continue that will never come
        dropped = 0
        try:
            while not request.complete and request.error is None and dropped < DRAIN_MAX:
                dropped += len(request.body)
                request.body.clear()
                if not self._fill():
                    return False
        except (TimeoutError, ConnectionError):
            return False
        return request.complete and request.error is None

    # -- serving --------------------------------------------------------------------------
    def _serve(self, request: Request, keep_alive: bool) -> bool:
        """Run the app for ``request``; whether the connection may be kept."""
        response = Response(self.send, request, keep_alive, self.stop_event)
        body = Body(request, self._fill, self.send)
        environ = self.shared.environ.make(request, self.client_address, body)
        access = self.shared.access
        started = time.monotonic() if access is not None else 0.0
        result: Any = None
        try:
            result = self.application(environ, response.start_response)
            self._write_body(response, result)
            response.finish()
        except (TimeoutError, ConnectionError, BrokenPipeError):
            return False  # the client is gone, or too slow: nothing more to say to it
        except BadRequest as exc:  # its body was refused as the app read it
            if not response.headers_sent:
                self._refuse(exc)
            return False
        except Exception as exc:
            self._app_failed(environ, response, exc)
            return False
        finally:
            if hasattr(result, "close"):
                try:
                    result.close()
                except Exception:
                    log.exception("the app's response close() failed")
            if access is not None:
                status = response.status if response.headers_sent else "500"
                access.record_http((time.time(), time.monotonic() - started, environ,
                                    status or "500", response.sent, response.headers))  # fmt: skip
        return response.keep_alive

    def _write_body(self, response: Response, result: Any) -> None:
        if isinstance(result, FileWrapper) and (place := result.sendable()) is not None:
            self._send_file(response, result, *place)
            return
        if isinstance(result, (list, tuple)) and len(result) == 1 and not response.headers_sent:
            data = result[0]
            response.write(data, known_length=len(data))  # its length is known: framed by it
            return
        for data in result:  # a generator may call start_response as it starts
            if data:
                response.write(data)
                if response.no_body:
                    break  # HEAD, 204, 304: the rest would not be sent

    def _send_file(self, response: Response, wrapper: FileWrapper, offset: int, count: int) -> None:
        """wsgi.file_wrapper over a real file: the head, then os.sendfile."""
        response.write(b"", known_length=count)
        if response.no_body:
            return
        length = response.length if response.length is not None else count
        count = min(count, length)
        sent = self.request.sendfile(wrapper.filelike, offset, count) if count else 0
        response.sent += sent
        if sent < length:
            response.keep_alive = False

    def _app_failed(self, environ: dict[str, Any], response: Response, exc: Exception) -> None:
        where = printable(f"{environ.get('REQUEST_METHOD')} {environ.get('RAW_URI')}")
        if isinstance(exc, ResponseError):
            log.error("the app broke the WSGI contract on %s: %s", where, printable(str(exc)))
        else:
            log.exception("the app failed on %s", where)
        if not response.headers_sent:
            self._refuse(BadRequest(500, "internal server error"))

    def _refuse(self, error: BadRequest) -> None:
        status = error.status
        reason = _REASONS.get(status, "Error")
        body = f"{status} {reason}\n".encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        if status != 500:
            log.debug("refused a request from %s: %s", self.client_address, error.reason)
            access = self.shared.access
            if access is not None:
                client = self.client_address
                environ = {"REMOTE_ADDR": str(client[0]) if isinstance(client, tuple) else ""}
                access.record_http((time.time(), 0.0, environ, str(status), 0, []))
        with contextlib.suppress(OSError):
            self.send(head + body)

    def finish(self) -> None:
        """Drop what the connection holds for the next request."""
        self.reader = None  # type: ignore[assignment]
