"""Echo over a Unix stream socket; the socket file is removed when the server stops.

prefork run examples.echo_unix:EchoHandler --bind unix:/tmp/prefork-echo.sock
printf 'hello\\n' | nc -q1 -U /tmp/prefork-echo.sock
"""

from __future__ import annotations

import socketserver


class EchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)
