"""TCP echo, one line at a time, on a plain StreamRequestHandler.

    prefork run examples.echo_tcp:EchoHandler --bind 127.0.0.1:9000 --workers 4
    printf 'hello\\n' | nc -q1 127.0.0.1 9000

Or from code, as a mix-in composed with the stdlib's ThreadingMixIn::

    python examples/echo_tcp.py
"""

from __future__ import annotations

import socketserver

import prefork


class EchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class EchoServer(prefork.PreForkMixIn, socketserver.ThreadingMixIn, socketserver.TCPServer):
    workers = 2


if __name__ == "__main__":
    with EchoServer(("127.0.0.1", 9000), EchoHandler) as server:
        server.serve_forever()
