"""The WSGI app gunicorn serves: the same status, headers and body as apps.Hello.

A module of its own, importing nothing, so gunicorn's workers load no more than they
need (apps.py imports http.server for the socketserver handlers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

BODY = b"Hello, world!\n"  # as examples/hello_http.py
_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", _HEADERS)
    return [BODY]
