"""What a worker promises a server class whatever it overrides: a thread worker counts its
busy connections for any ``process_request`` (a thread pool's too), and a connection is
ended as socketserver ends it, so a handler's child holding the descriptor cannot make the
client wait."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import psutil
from conftest import SERVER_FIRST, echo_line, is_running, run_cli, wait_until

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


COUNTING = '''
import socketserver, threading

served_here = threading.local()


class Counting(socketserver.StreamRequestHandler):
    """Answers how many connections its thread has served, this one included."""

    def handle(self):
        line = self.rfile.readline()
        if line == b"exit\\n":
            raise SystemExit(3)
        if line == b"interrupt\\n":
            raise KeyboardInterrupt
        if line == b"fail\\n":
            raise ValueError("handler failed")
        served_here.count = getattr(served_here, "count", 0) + 1
        self.wfile.write(b"%d\\n" % served_here.count)


class Hooked(socketserver.ThreadingTCPServer):
    """ThreadingMixIn's per-connection hooks, seen to run."""

    def process_request_thread(self, request, client_address):
        request.sendall(b"hook ")
        super().process_request_thread(request, client_address)

    def handle_error(self, request, client_address):
        request.sendall(b"handled\\n")
'''


def _busy_workers(server: Any, cwd: Path) -> int:
    result = run_cli("status", "--json", str(server.pid), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return sum(worker["active"] > 0 for worker in json.loads(result.stdout)["workers"])


def _serve_counting(
    serve: Any, listener: socket.socket, app_dir: Path, *options: str, workers: int = 1
) -> Any:
    (app_dir / "counting.py").write_text(COUNTING)
    server = serve(
        "counting:Counting", *options, "-w", str(workers), *SERVER_FIRST, listen_on=listener
    )
    server.wait_ready(workers)
    return server


def _ask(address: Any, line: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(line + b"\n")
        return conn.makefile("rb").read()


def test_a_thread_worker_serves_connections_from_a_pool_that_survives_its_handlers(
    serve, listener: socket.socket, app_dir: Path
) -> None:
    """A thread per connection (ThreadingMixIn's) cost more than a small request: each
    thread now serves many connections, and a handler that raises SystemExit,
    KeyboardInterrupt or an error takes neither its thread nor the worker with it."""
    server = _serve_counting(serve, listener, app_dir, "-k", "thread", "--threads", "1")
    address = listener.getsockname()
    assert [_ask(address, b"count") for _ in range(3)] == [b"1\n", b"2\n", b"3\n"]
    for line in (b"exit", b"interrupt", b"fail"):
        assert _ask(address, line) == b""
    assert _ask(address, b"count") == b"4\n"  # the same thread, still serving
    assert "ValueError: handler failed" in server.log
    assert "a handler raised out of its thread" in server.log  # the KeyboardInterrupt


def test_a_pool_thread_runs_threading_mixins_hooks(
    serve, listener: socket.socket, app_dir: Path
) -> None:
    _serve_counting(serve, listener, app_dir, "--server-class", "counting:Hooked")
    address = listener.getsockname()
    assert _ask(address, b"count") == b"hook 1\n"
    assert _ask(address, b"fail") == b"hook handled\n"


def test_a_thread_worker_at_its_cap_leaves_the_next_connection_to_a_sibling(
    serve, listener: socket.socket, app_dir: Path
) -> None:
    """--threads 1 and a connection held open: the next one is served by the other
    worker, not queued behind the pool's only thread."""
    server = _serve_counting(serve, listener, app_dir, "-k", "thread", "--threads", "1", workers=2)
    address = listener.getsockname()
    with socket.create_connection(address, timeout=10) as held:
        wait_until(lambda: _busy_workers(server, app_dir) == 1, message="a busy worker")
        for _ in range(4):
            assert _ask(address, b"count") in (b"1\n", b"2\n", b"3\n", b"4\n")
        held.sendall(b"count\n")
        assert held.makefile("rb").read() == b"1\n"


FEW_FILES = '''
import os, resource, socketserver


class Once(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())


class FewFiles(socketserver.ThreadingTCPServer):
    """Leaves its worker 3 descriptors free: the next connections find it out of them."""

    def post_worker_init(self, worker):
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
        limit = max(fds) + 1  # the highest is listdir's own, closed by now
        free = limit - (len(fds) - 1)
        self.filling = [os.open(os.devnull, os.O_RDONLY) for _ in range(free - 3)]
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
'''


def test_a_worker_out_of_descriptors_pauses_instead_of_spinning_and_recovers(
    serve, listener: socket.socket, app_dir: Path
) -> None:
    """accept() failing with EMFILE left the connection queued and the listener readable:
    the loop went straight back to it, a core at 100% (2.0 s of CPU in 2 s) until a
    descriptor came free. Now it pauses, says so once, and serves the rest later."""
    (app_dir / "fewfiles.py").write_text(FEW_FILES)
    server = serve(
        "fewfiles:Once", "--server-class", "fewfiles:FewFiles", "-w", "1", *SERVER_FIRST,
        listen_on=listener,
    )  # fmt: skip
    (worker,) = server.wait_ready(1)
    held = [socket.create_connection(listener.getsockname(), timeout=10) for _ in range(5)]
    try:
        wait_until(lambda: "cannot accept" in server.log, message="the worker to run out")
        process = psutil.Process(worker)
        before, started = sum(process.cpu_times()[:2]), time.monotonic()
        wait_until(lambda: time.monotonic() - started >= 1.5, message="a while to pass")
        assert sum(process.cpu_times()[:2]) - before < 0.5  # spinning would take ~1.5 s
        for number, conn in enumerate(held):
            conn.sendall(b"line %d\n" % number)
        assert [conn.makefile("rb").readline() for conn in held] == [
            b"line %d\n" % number for number in range(5)
        ]
    finally:
        for conn in held:
            conn.close()
    assert server.log.count("cannot accept: Too many open files") == 1
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
