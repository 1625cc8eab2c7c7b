"""What a socketserver user runs today: one process, a thread or a child per connection.

python -m benchmarks.stdlib_server threading|forking HANDLER PORT
"""

from __future__ import annotations

import socket
import socketserver
import sys

from benchmarks.apps import HANDLERS


def serve(kind: str, handler_name: str, port: int) -> None:
    base = socketserver.ThreadingTCPServer if kind == "threading" else socketserver.ForkingTCPServer

    class Server(base):  # type: ignore[valid-type,misc]
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = 2048  # as prefork's backlog: the same queue for both

        def server_activate(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().server_activate()

    with Server(("127.0.0.1", port), HANDLERS[handler_name]) as server:
        server.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
