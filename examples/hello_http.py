"""A small HTTP app on http.server.BaseHTTPRequestHandler, keep-alive included.

    prefork run examples.hello_http:HelloHandler --bind 127.0.0.1:8000
    curl -s http://127.0.0.1:8000/          # -> Hello, world!

With keep-alive clients, prefer ``--worker-class thread``: a sync worker holds one
connection at a time.
"""

from __future__ import annotations

import os
from http.server import BaseHTTPRequestHandler

BODY = b"Hello, world!\n"


class HelloHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep connections open unless the client closes

    def do_GET(self) -> None:
        body = BODY if self.path != "/pid" else f"{os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:  # the client sent "Connection: close": say we close
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request to stderr is not what a server under load wants
