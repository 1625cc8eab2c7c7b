"""wsgi.input: a request's body, read from the client as the app asks for it.

It never reads past the body: the parser hands on the body's bytes only (by
Content-Length or chunked framing), and what follows on the connection is the next
request's. The whole body is never held unless the app reads it all at once.
``Expect: 100-continue`` is answered when the app first asks for bytes that have not
arrived: a client waiting for it sends the body only then, and an app that answers
without reading it (a 401, a 413) never makes the client send it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .parser import Request

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Body:
    """The file-like object PEP 3333 asks for: read, readline, readlines, iteration.

    ``fill``: read more from the client into the request's body; False at the end of
    the stream. ``send``: the connection's sendall, for the 100 Continue."""

    def __init__(self, request: Request, fill: Callable[[], bool], send: Callable[[bytes], None]):
        self._request = request
        self._buffer = request.body
        self._fill = fill
        self._send = send

    def _more(self) -> bool:
        """Read more of the body; False when it is all in."""
        request = self._request
        if request.complete:
            return False
        if request.error is not None:
            raise request.error
        if request.expect_continue and not request.continue_sent:
            request.continue_sent = True
            self._send(CONTINUE)
        if not self._fill() and not request.complete:
            raise request.error or ConnectionError("the client closed before the body's end")
        return True

    def read(self, size: int | None = -1) -> bytes:
        buffer = self._buffer
        if size is None or size < 0:
            while self._more():
                pass
            size = len(buffer)
        else:
            while len(buffer) < size and self._more():
                pass
        data = bytes(buffer[:size])
        del buffer[:size]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        buffer = self._buffer
        limit = size if size is not None and size >= 0 else None
        scanned = 0
        while True:
            end = buffer.find(b"\n", scanned)
            if end >= 0:
                end += 1
                break
            if limit is not None and len(buffer) >= limit:
                end = limit
                break
            scanned = len(buffer)
            if not self._more():
                end = len(buffer)
                break
        if limit is not None:
            end = min(end, limit)
        data = bytes(buffer[:end])
        del buffer[:end]
        return data

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines, total = [], 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def unread(self) -> bool:
        """Whether the client may still be sending the body (the app did not read it)."""
        return not self._request.complete
