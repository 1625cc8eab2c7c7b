"""A socketserver handler that imports nothing, for the start-up row only.

apps.Hello is built on http.server, whose import (email, http.client, ssl: 25-40 ms
here) lies on the path to the first answer; gunicorn's app (wsgi_app.py) imports
nothing and gunicorn parses HTTP with code its master imported already. This handler
answers one request per connection with the same bytes as wsgi_app, so that the
start-up row can compare the servers' own costs with equal apps beside the
http.server row.
"""

from __future__ import annotations

import socketserver

BODY = b"Hello, world!\n"  # as examples/hello_http.py
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(BODY), BODY)
)


class Hello(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # the request line and headers: all this app needs of them
        self.wfile.write(RESPONSE)
