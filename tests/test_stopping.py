"""Handlers learn that their worker is stopping: keep-alive HTTP clients and persistent
senders no longer hold a TERM for the whole --graceful-timeout (then a SIGKILL that cut
the request in flight)."""

from __future__ import annotations

import contextlib
import http.client
import select
import signal
import socket
import threading
from pathlib import Path

import psutil
import pytest
from conftest import SERVER_FIRST, wait_until

APP = """
import http.server, socket, socketserver, time

class KeepAlive(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_POST(self):  # the body back
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/slow":
            open("slow.started", "w").close()
            time.sleep(1.0)
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Lines(socketserver.StreamRequestHandler):
    '''A persistent sender's receiver: waits for lines, a little at a time, and ends
    the conversation once its worker is stopping.'''

    def handle(self):
        self.connection.settimeout(0.1)
        while not self.server.prefork_stopping.is_set():
            try:
                line = self.rfile.readline()
            except socket.timeout:
                continue
            if not line:
                return
            self.wfile.write(line)
        self.wfile.write(b"bye\\n")
"""


def get(conn: http.client.HTTPConnection, path: str) -> http.client.HTTPResponse:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response


def start(serve, listener: socket.socket, app_dir: Path, worker_class: str, target: str):
    (app_dir / "stopapp.py").write_text(APP)
    server = serve(
        target, "-k", worker_class, "-w", "1", "--graceful-timeout", "20", *SERVER_FIRST,
        listen_on=listener,
    )  # fmt: skip
    server.wait_ready(1)
    return server


def assert_stops_in_time(server) -> None:
    assert server.wait_exit(10) == 0  # well before --graceful-timeout (20 s)
    assert "did not stop in time" not in server.log


@pytest.mark.parametrize("worker_class", ["thread", "sync"])
def test_idle_keep_alive_connections_are_closed_at_a_term(
    serve, listener: socket.socket, app_dir: Path, worker_class: str
) -> None:
    """Idle keep-alive clients held their threads (a sync worker: the worker) until
    --graceful-timeout, then a SIGKILL."""
    server = start(serve, listener, app_dir, worker_class, "stopapp:KeepAlive")
    host, port = listener.getsockname()[:2]
    clients = 4 if worker_class == "thread" else 1  # a sync worker serves one at a time
    idle = [http.client.HTTPConnection(host, port, timeout=10) for _ in range(clients)]
    for conn in idle:
        assert get(conn, "/").status == 200  # then each waits for its next request
    server.signal(signal.SIGTERM)
    for conn in idle:  # closed at once, as if the client had closed
        assert conn.sock.recv(1) == b""
        conn.close()
    assert_stops_in_time(server)


@pytest.mark.parametrize("worker_class", ["thread", "sync"])
def test_a_request_in_flight_at_a_term_is_answered_with_connection_close(
    serve, listener: socket.socket, app_dir: Path, worker_class: str
) -> None:
    server = start(serve, listener, app_dir, worker_class, "stopapp:KeepAlive")
    conn = http.client.HTTPConnection(*listener.getsockname()[:2], timeout=10)
    assert get(conn, "/").status == 200
    answers: list[http.client.HTTPResponse] = []
    slow = threading.Thread(target=lambda: answers.append(get(conn, "/slow")))
    slow.start()
    wait_until(lambda: (app_dir / "slow.started").exists(), message="the slow request")
    server.signal(signal.SIGTERM)
    slow.join(15)
    [answer] = answers  # answered, not cut
    assert (answer.status, answer.getheader("Connection")) == (200, "close")
    assert conn.sock is None or conn.sock.recv(1) == b""
    conn.close()
    assert_stops_in_time(server)


def test_a_request_accepted_while_draining_gets_its_body(
    serve, listener: socket.socket, app_dir: Path
) -> None:
    """A POST whose headers are queued when TERM comes and whose body follows later:
    the draining worker waits for the body. (It shut reading at once, so the body
    read found the end of the stream, and the handler answered with an empty body;
    XML-RPC answered "no element found" during HUPs.)"""
    server = start(serve, listener, app_dir, "sync", "stopapp:KeepAlive")
    address = listener.getsockname()[:2]
    busy = http.client.HTTPConnection(*address, timeout=10)
    slow = threading.Thread(target=lambda: get(busy, "/slow"))  # holds the one worker 1 s
    slow.start()
    wait_until(lambda: (app_dir / "slow.started").exists(), message="the slow request")
    with socket.create_connection(address, timeout=10) as conn:
        body = b"the body, sent after the headers"
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        server.signal(signal.SIGTERM)  # the worker drains: it takes this connection next
        slow.join(15)
        mine = conn.getsockname()[1]
        wait_until(
            lambda: worker_holds(server, mine) or select.select([conn], [], [], 0)[0],
            message="the worker to take it",
        )  # (or to have answered already: as it did before the body came, cutting it)
        conn.sendall(body)
        answer = conn.makefile("rb").read()
    head, _, received = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), answer
    assert b"Connection: close" in head and received == body
    busy.close()
    assert_stops_in_time(server)


def worker_holds(server, client_port: int) -> bool:
    """The worker has accepted the connection from ``client_port`` (it reads its request)."""
    for pid in server.worker_pids():
        with contextlib.suppress(psutil.Error):
            for held in psutil.Process(pid).net_connections("tcp"):
                if held.raddr and held.raddr[1] == client_port:
                    return True
    return False


def test_a_handler_reads_prefork_stopping(serve, listener: socket.socket, app_dir: Path):
    (app_dir / "stopapp.py").write_text(APP)
    server = serve(
        "stopapp:Lines", "-w", "1", "--graceful-timeout", "20", *SERVER_FIRST, listen_on=listener
    )
    server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=10) as conn:
        reader = conn.makefile("rb")
        conn.sendall(b"hello\n")
        assert reader.readline() == b"hello\n"
        server.signal(signal.SIGTERM)
        assert reader.readline() == b"bye\n"
        assert reader.readline() == b""
    assert server.wait_exit(10) == 0
