"""The floor: the least a pre-fork server in Python can do.

    python -m benchmarks.floor HANDLER PORT WORKERS

The parent binds and listens, forks WORKERS children and waits; each child loops on
``accept()``, runs the handler on the connection and closes it. No supervision, no
signals, no heartbeat, no socketserver: what is left is the interpreter and the
handler, which is what prefork's overhead is measured against. TCP_NODELAY is set on
the listening socket (accepted sockets inherit it), as prefork does by default.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from benchmarks.apps import HANDLERS


class _Server:
    """What a handler may look at: socketserver handlers read nothing from it here."""


def serve(handler_name: str, port: int, workers: int) -> None:
    handler = HANDLERS[handler_name]
    listener = socket.create_server(("127.0.0.1", port), backlog=2048)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server = _Server()
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            accept = listener.accept
            while True:
                conn, address = accept()
                try:  # noqa: SIM105 - cheaper than contextlib.suppress on the hot path
                    handler(conn, address, server)
                except Exception:
                    pass
                conn.close()
        children.append(pid)
    listener.close()

    def stop(signum: int, frame: object) -> None:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        signal.pause()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
