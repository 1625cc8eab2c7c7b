"""The handlers every server in the benchmark serves, so that they all send the same bytes.

- ``Hello``: examples/hello_http.py's handler (``http.server``, HTTP/1.1: keep-alive
  unless the client says ``Connection: close``). Body ``Hello, world!\\n``.
- ``Echo``: one line in, the same line out, then the connection closes.
- ``Crunch``: echo after a CPU-bound step (``CRUNCH_ROUNDS`` of SHA-256, about a
  millisecond here), to show whether a server uses more than one core.

gunicorn serves ``benchmarks/wsgi_app.py``: the same status, headers and body as ``Hello``.
"""

from __future__ import annotations

import hashlib
import socketserver

from examples.hello_http import HelloHandler

Hello = HelloHandler
CRUNCH_ROUNDS = 2000


class Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


def crunch(data: bytes) -> bytes:
    digest = data
    for _ in range(CRUNCH_ROUNDS):
        digest = hashlib.sha256(digest).digest()
    return digest


class Crunch(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        crunch(line)
        self.wfile.write(line)


HANDLERS: dict[str, type[socketserver.BaseRequestHandler]] = {
    "hello": Hello,
    "echo": Echo,
    "crunch": Crunch,
}
