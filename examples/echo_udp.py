"""UDP echo on a DatagramRequestHandler: every datagram comes back to its sender.

prefork run examples.echo_udp:EchoHandler --bind udp://127.0.0.1:9001 --workers 2
printf 'hello' | nc -u -w1 127.0.0.1 9001
"""

from __future__ import annotations

import socketserver


class EchoHandler(socketserver.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read())
