"""A WSGI response on the wire: start_response, the status line and headers, framing.

The head goes out with the first piece of the body, in one send. Framing, in order:
the app's Content-Length; for a body given as a one-piece list (most apps' "hello"),
its length; chunked for an HTTP/1.1 client; else the end of the connection. No body
is sent for HEAD, 1xx, 204 and 304 (the app's body is not iterated then). A body
longer than its Content-Length is cut there, a shorter one ends the connection: the
client could not tell where the next response begins.

Header names and values are checked for CR, LF and NUL (response splitting); the app's
``Connection: close`` closes the connection after the response.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from stat import S_ISREG
from typing import Any

from .parser import Request

_NO_BODY_STATUS = frozenset({204, 304})
_FORBIDDEN = frozenset("\r\n\0")
_date_cache: list[Any] = [0, b""]


def http_date() -> bytes:
    """The Date header's value, made once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True).encode("ascii")
    return _date_cache[1]  # type: ignore[no-any-return]


class ResponseError(Exception):
    """The app broke the WSGI contract (a bad status or header): answered with a 500."""


class Response:
    """One response: what start_response was given, and how much of it has been sent."""

    def __init__(
        self, send: Callable[[bytes], None], request: Request, keep_alive: bool, stopping: Any
    ) -> None:
        self._send = send
        self._request = request
        self._stopping = stopping  # the worker's stop event: set, the connection ends
        self.head_only = request.method == "HEAD"
        self.http11 = request.version == "1.1"
        self.keep_alive = keep_alive  # may become False: the app's wish, or the framing
        self.status: str | None = None
        self.code = 0
        self.headers: list[tuple[str, str]] = []
        self.headers_sent = False
        self.chunked = False
        self.length: int | None = None  # the Content-Length, once known
        self.sent = 0  # body bytes sent
        self.no_body = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise ResponseError("start_response called a second time without exc_info")
        if not isinstance(status, str) or len(status) < 4 or status[3] != " ":
            raise ResponseError(f"bad status {status!r}: expected '200 OK' and the like")
        if not status[:3].isdigit() or not _FORBIDDEN.isdisjoint(status):
            raise ResponseError(f"bad status {status!r}")
        for name, value in headers:
            if not (isinstance(name, str) and isinstance(value, str)):
                raise ResponseError(f"header {name!r}: names and values must be str")
            if not _FORBIDDEN.isdisjoint(name) or not _FORBIDDEN.isdisjoint(value):
                raise ResponseError(f"header {name!r}: CR, LF or NUL in a response header")
        self.status, self.headers, self.code = status, list(headers), int(status[:3])
        return self.write

    def _head(self, known_length: int | None) -> bytes:
        code = self.code
        self.no_body = self.head_only or code < 200 or code in _NO_BODY_STATUS
        lines = [f"HTTP/1.1 {self.status}\r\n"]
        for name, value in self.headers:
            lower = name.lower()
            if lower == "content-length":
                self.length = int(value) if value.strip().isdigit() else None
            elif lower == "connection" and "close" in value.lower():
                self.keep_alive = False
                continue  # said again below
            elif lower in ("transfer-encoding", "keep-alive"):
                continue  # the server's to decide
            lines.append(f"{name}: {value}\r\n")
        has_body = not (code < 200 or code in _NO_BODY_STATUS)
        if self.length is None and known_length is not None and has_body:
            self.length = known_length  # HEAD too: the length a GET would have
            lines.append(f"Content-Length: {known_length}\r\n")
        elif self.length is None and not self.no_body:
            if self.http11:
                self.chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False  # the end of the connection ends the body
        request = self._request
        if request.expect_continue and not request.continue_sent and not request.complete:
            self.keep_alive = False  # the client waits to send a body we will not ask for
        if self._stopping is not None and self._stopping.is_set():
            self.keep_alive = False
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        elif not self.http11:
            lines.append("Connection: keep-alive\r\n")
        lines.append(f"Date: {http_date().decode()}\r\n\r\n")
        self.headers_sent = True
        return "".join(lines).encode("latin-1")

    def write(self, data: bytes, known_length: int | None = None) -> None:
        """Send ``data``, the head first if it has not gone yet."""
        if self.status is None:
            raise ResponseError("the app wrote its body before calling start_response")
        head = b"" if self.headers_sent else self._head(known_length)
        if self.no_body or not data:
            if head:
                self._send(head)
            return
        if self.length is not None:
            room = self.length - self.sent
            if len(data) > room:
                data = data[:room]  # past its Content-Length: cut, and the connection ends
                self.keep_alive = False
        self.sent += len(data)
        if self.chunked:
            self._send(b"".join((head, b"%x\r\n" % len(data), data, b"\r\n")))
        else:
            self._send(head + data if head else data)

    def finish(self) -> None:
        """The app's body is all written: the head if it has not gone, the last chunk."""
        if not self.headers_sent:  # an empty body (of unknown length, for HEAD)
            self.write(b"", known_length=None if self.head_only else 0)
        if self.chunked:
            self._send(b"0\r\n\r\n")
        elif self.length is not None and self.sent < self.length and not self.no_body:
            self.keep_alive = False  # shorter than it said: the client cannot tell the end


class FileWrapper:
    """wsgi.file_wrapper: a file the server sends with os.sendfile when it can (a real
    file's descriptor), else in ``block_size`` pieces."""

    def __init__(self, filelike: Any, block_size: int = 65536) -> None:
        self.filelike = filelike
        self.block_size = block_size
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        read = self.filelike.read
        while data := read(self.block_size):
            yield data

    def sendable(self) -> tuple[int, int] | None:
        """(offset, count) to send with sendfile, or None when it cannot be."""
        try:
            fd = self.filelike.fileno()
            stat = os.fstat(fd)
            offset = self.filelike.tell()
        except (AttributeError, OSError, ValueError):
            return None
        if not S_ISREG(stat.st_mode):
            return None
        return offset, max(0, stat.st_size - offset)
