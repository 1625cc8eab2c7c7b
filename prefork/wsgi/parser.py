"""HTTP/1.1 requests read off a connection: llhttp (through httptools) and our limits.

llhttp is the parser of Node.js, in C, and strict by default: it refuses obs-fold, bare
CR, invalid characters in names and values, Content-Length with Transfer-Encoding, a
duplicate Content-Length, a Transfer-Encoding that does not end in chunked, and bad
chunk framing. Of gunicorn's 148 invalid request vectors it refuses 127; the rest are
limits, and the checks below. Measured against the alternatives on a browser-like
GET with 8 headers: 2.4 us a request, h11 33.8 us, the stdlib's parser 28.2 us.

What is ours, on top of it:

- **Limits** (gunicorn's names and defaults): the request target (414), the number of
  header fields and the size of each (431); and, since httptools buffers a header's
  name and value until both are complete, the bytes of a request's head in all, so that
  one endless header cannot grow the worker without bound (431).
- **Checks** RFC 9112 asks of a server and llhttp leaves to it: exactly one Host in an
  HTTP/1.1 request, a Transfer-Encoding of ``chunked`` only (other codings: 501) and
  never in an HTTP/1.0 request, a target in origin form (or absolute form, or ``*`` for
  OPTIONS only), HTTP/1.0 and 1.1 only (505); and one Content-Type at most (two could
  be read differently by a proxy and the app). CONNECT is refused (405).
- **Pipelining**: every request in the bytes read is parsed; they wait in ``pending``
  and are served in order. A broken one after good ones is answered after them.

Header names with an underscore are dropped (gunicorn does the same): in the WSGI
environ ``X-Auth_User`` and ``X-Auth-User`` would both be ``HTTP_X_AUTH_USER``, and a
proxy that strips one would let a client smuggle the other.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httptools

READ_SIZE = 65536
_OWS = (b" ", b"\t")
# The absolute form of a request target (RFC 9112 3.2.2), as a proxy sends it.
_ABSOLUTE = re.compile(rb"https?://[^/?#\s]+(?:[/?#]|$)", re.IGNORECASE)


class BadRequest(Exception):
    """A request we refuse: its status and reason, then the connection is closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Request:
    """One parsed request, its body arriving into ``body`` as it is read."""

    method: str = ""
    target: bytes = b""
    version: str = "1.1"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    keep_alive: bool = True
    chunked: bool = False
    content_length: int | None = None
    expect_continue: bool = False
    continue_sent: bool = False  # the 100 Continue it expects has been sent
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False  # the whole body is in (or it had none)
    error: BadRequest | None = None  # its body broke off (bad framing, or the client left)
    upgrade: bool = False  # asked to switch protocols: served, then the connection ends


@dataclass(frozen=True)
class Limits:
    request_line: int = 4094
    fields: int = 100
    field_size: int = 8190

    @property
    def head(self) -> int:
        """The most bytes a request's head may take, its line and fields together."""
        return self.request_line + 2 + self.fields * (self.field_size + 2) + 2


class RequestReader:
    """The requests of one connection, from the bytes fed to it (``feed``).

    httptools calls its methods as it parses (the ``on_*`` callbacks)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.pending: deque[Request | BadRequest] = deque()  # parsed, not yet served
        self.current: Request | None = None  # the one whose head or body is arriving
        self._parser = httptools.HttpRequestParser(self)
        self._head_bytes = 0  # of the request whose head is arriving
        self._in_head = False
        self._broken = False  # nothing after a refused request is parsed
        self._limit_hit: BadRequest | None = None

    # -- feeding --------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Parse ``data``; a request refused is queued as its BadRequest."""
        if self._broken:
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.head:
                self._refuse(BadRequest(431, "request header fields too large"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            last = self.pending[-1] if self.pending else None
            if isinstance(last, Request):
                last.upgrade = True
            self._broken = True  # what follows is another protocol's: not parsed
        except httptools.HttpParserCallbackError:
            self._refuse(self._limit_hit or BadRequest(400, "bad request"))
        except httptools.HttpParserInvalidURLError:
            self._refuse(BadRequest(400, "invalid request target"))
        except httptools.HttpParserInvalidMethodError:
            self._refuse(BadRequest(400, "invalid method"))
        except httptools.HttpParserError as exc:
            self._refuse(BadRequest(400, _parser_reason(exc)))

    def feed_eof(self) -> None:
        """The client closed: a request cut short in its head or body is refused."""
        if self._broken:
            return
        if self._in_head and self._head_bytes:
            self._refuse(BadRequest(400, "the request ended early"))
        elif self.current is not None and not self.current.complete:
            self._refuse(BadRequest(400, "the request body ended early"))
        self._broken = True

    @property
    def broken(self) -> bool:
        return self._broken

    def _refuse(self, error: BadRequest) -> None:
        self._broken = True
        current, self.current = self.current, None
        if current is not None and not self._in_head:
            current.error = error  # its head was in: reading its body raises this
        self._in_head = False
        self.pending.append(error)

    # -- httptools' callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.current = Request()
        self._in_head, self._head_bytes, self._limit_hit = True, 0, None

    def on_url(self, url: bytes) -> None:
        request = self.current
        assert request is not None
        request.target += url
        if len(request.target) > self.limits.request_line:
            self._limit_hit = BadRequest(414, "request target too long")
            raise self._limit_hit

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.current
        assert request is not None
        if not self._in_head:
            return  # a trailer after a chunked body: not passed on (WSGI has no place)
        if len(name) + len(value) + 2 > self.limits.field_size:
            self._limit_hit = BadRequest(431, "request header field too large")
            raise self._limit_hit
        if len(request.headers) >= self.limits.fields:
            self._limit_hit = BadRequest(431, "too many request header fields")
            raise self._limit_hit
        if value[-1:] in _OWS:  # llhttp keeps trailing whitespace: not the value's
            value = value.rstrip(b" \t")
        request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.current
        assert request is not None
        parser = self._parser
        self._in_head = False
        request.method = parser.get_method().decode("ascii")
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        try:
            _check(request)
        except BadRequest as exc:
            self._limit_hit = exc
            raise
        if not request.chunked and not request.content_length:
            request.complete = True
        self.pending.append(request)

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        if self.current is not None:
            self.current.complete = True
        self.current = None


def _check(request: Request) -> None:
    """What RFC 9112 asks of a server and llhttp does not check; also notes the framing."""
    if request.version not in ("1.1", "1.0"):
        raise BadRequest(505, "HTTP version not supported")
    hosts = content_types = 0
    kept = []
    for name, value in request.headers:
        lower = name.lower()
        if b"_" in name:
            continue  # dropped: see the module docstring
        if lower == b"host":
            hosts += 1
        elif lower == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                raise BadRequest(501, "transfer coding not implemented")
            request.chunked = True
        elif lower == b"content-length":
            request.content_length = int(value)  # llhttp checked: digits, one value
        elif lower == b"content-type":
            content_types += 1
        elif lower == b"expect" and value.lower() == b"100-continue":
            request.expect_continue = request.version == "1.1"
        kept.append((name, value))
    request.headers = kept
    if request.method == "CONNECT":
        raise BadRequest(405, "CONNECT is not served")
    if request.chunked and request.version == "1.0":
        raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")  # RFC 9112 6.1
    if content_types > 1:
        raise BadRequest(400, "more than one Content-Type header")
    target = request.target
    if target[:1] != b"/" and target != b"*" and not _ABSOLUTE.match(target):
        raise BadRequest(400, "invalid request target")
    if request.version == "1.1" and hosts != 1:
        raise BadRequest(400, "an HTTP/1.1 request needs one Host header")
    if hosts > 1:
        raise BadRequest(400, "more than one Host header")
    if request.target == b"*" and request.method != "OPTIONS":
        raise BadRequest(400, "the asterisk target is for OPTIONS only")


def _parser_reason(exc: Any) -> str:
    text = " ".join(str(exc).split())
    return text[:100] or "bad request"
