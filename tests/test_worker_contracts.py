"""What a worker promises a server class whatever it overrides: a thread worker counts its
busy connections for any ``process_request`` (a thread pool's too), and a connection is
ended as socketserver ends it, so a handler's child holding the descriptor cannot make the
client wait."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

from conftest import SERVER_FIRST, echo_line, is_running, wait_until

POOL = '''
import queue, threading


class PoolServer:
    """The usual thread-pool recipe: process_request queues, a pool of threads serves."""

    def process_request(self, request, client_address):
        if not hasattr(self, "pool_queue"):  # in the worker, after the fork
            self.pool_queue = queue.Queue()
            for _ in range(3):
                threading.Thread(target=self.pool_thread, daemon=True).start()
        self.pool_queue.put((request, client_address))

    def pool_thread(self):
        while True:
            request, client_address = self.pool_queue.get()
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
'''


def test_a_thread_pool_process_request_keeps_the_worker_accepting(
    serve, listener: socket.socket, app_dir: Path
) -> None:
    """The busy count went up in the worker and down only in ThreadingMixIn's request
    thread, which a pool never runs: after --threads connections the worker stopped
    accepting for good while its heartbeat stayed fresh."""
    (app_dir / "pool.py").write_text(POOL)
    server = serve(
        "apps:Echo", "-k", "thread", "--threads", "2", "--server-class", "pool:PoolServer",
        "-w", "1", listen_on=listener,
    )  # fmt: skip
    server.wait_ready(1)
    for number in range(8):
        assert echo_line(listener.getsockname(), b"call %d" % number) == b"call %d" % number


FORKS = '''
import os, socketserver, time


class Forks(socketserver.StreamRequestHandler):
    """Answers, then leaves a helper process behind that holds the connection's
    descriptor (forked, as a handler starting a background job does)."""

    def handle(self):
        self.rfile.readline()
        helper = os.fork()
        if helper == 0:
            time.sleep(30)
            os._exit(0)
        self.wfile.write(b"%d\\n" % helper)
'''


def test_a_handlers_helper_holding_the_descriptor_does_not_hold_the_client(
    serve, listener: socket.socket, app_dir: Path
) -> None:
    """Without socketserver's shutdown(SHUT_WR), the client's EOF waited for the helper's
    exit (3.01 s in the issue, against 0.00 s with the stdlib TCPServer)."""
    (app_dir / "forks.py").write_text(FORKS)
    server = serve("forks:Forks", "-w", "1", *SERVER_FIRST, listen_on=listener)
    server.wait_ready(1)
    helper = 0
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as conn:
            conn.sendall(b"go\n")
            reader = conn.makefile("rb")
            helper = int(reader.readline())
            assert reader.read() == b""  # EOF, while the helper still holds the descriptor
            assert is_running(helper)
    finally:
        if helper:
            with contextlib.suppress(ProcessLookupError):
                os.kill(helper, signal.SIGKILL)
            wait_until(lambda: not is_running(helper), message="the helper to exit")
