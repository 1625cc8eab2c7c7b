"""What ``prefork run`` serves, and how the pool keeps itself whole: real sockets."""

from __future__ import annotations

import re
import signal
import socket
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import SERVER_FIRST, echo_line, wait_until


def logged_port(server) -> int:
    match = wait_until(
        lambda: re.search(r"serving 127\.0\.0\.1:(\d+)", server.log),
        message=lambda: f"the serving line; log:\n{server.log}",
    )
    return int(match.group(1))


def listening_sockets(port: int) -> int:
    """How many TCP sockets listen on 127.0.0.1:port (one line each in /proc/net/tcp)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return sum(1 for row in table if row.split()[1] == want and row.split()[3] == "0A")


def test_stdlib_simple_http_handler_serves_files(serve, listener, app_dir: Path):
    site = app_dir / "site"
    site.mkdir()
    (site / "hello.txt").write_text("hello from prefork\n")
    server = serve(
        "http.server:SimpleHTTPRequestHandler", "-w", "2", "--chdir", str(site), listen_on=listener
    )
    server.wait_ready(2)
    host, port = listener.getsockname()
    with urllib.request.urlopen(f"http://{host}:{port}/hello.txt", timeout=5) as response:
        assert response.status == 200
        assert response.read() == b"hello from prefork\n"
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0


def test_udp_and_unix_datagram_binds(serve, app_dir: Path):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.set_inheritable(True)
    dgram_path = app_dir / "dgram.sock"
    server = serve("apps:DatagramEcho", "-w", "2", "-b", f"unix-dgram:{dgram_path}", listen_on=udp)
    server.wait_ready(2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        for n in range(5):
            client.sendto(b"udp %d" % n, udp.getsockname())
            assert client.recv(100) == b"udp %d" % n
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        client.bind(str(app_dir / "client.sock"))
        client.settimeout(5)
        client.sendto(b"unix", str(dgram_path))
        assert client.recv(100) == b"unix"
    udp.close()
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not dgram_path.exists()


def test_stale_unix_socket_file_is_replaced(serve, app_dir: Path):
    path = app_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # left behind without a listener, as after a crash
    assert path.exists()
    server = serve("apps:Echo", "-w", "1", "-b", f"unix:{path}")
    server.wait_ready(1)
    assert echo_line(str(path), b"fresh") == b"fresh"


def test_max_requests_starts_the_successor_before_retiring_the_worker(serve, listener):
    server = serve("apps:Pid", "-w", "1", "--max-requests", "3", listen_on=listener)
    first = server.wait_ready(1)[0]
    answers = [int(echo_line(listener.getsockname())) for _ in range(3)]
    assert answers == [first] * 3
    wait_until(lambda: (b := server.booted()) and b[0] != first, message="a fresh worker")
    successor = server.booted()[0]
    assert int(echo_line(listener.getsockname())) == successor
    log = server.log
    assert f"worker 1 (pid {first}) served 3 requests; it will be replaced" in log
    # The order that keeps capacity: successor booted, then the old one retired.
    booted = log.index(f"worker 1 (pid {successor}) booted")
    assert booted < log.index(f"worker 1 (pid {first}) replaced by pid {successor}")


def test_hung_handler_is_killed_after_the_timeout_with_its_stack_and_client(serve, listener):
    server = serve("apps:Slow", "-w", "1", "--timeout", "2", listen_on=listener)
    stuck = server.wait_ready(1)[0]
    with socket.create_connection(listener.getsockname(), timeout=10) as conn:
        host, port = conn.getsockname()
        client = f"{host}:{port}"
        conn.sendall(b"60\n")
        assert conn.recv(8) == b"started\n"
        wait_until(
            lambda: (b := server.booted()) and b[0] != stuck,
            timeout=6,
            message=lambda: f"a replacement; log:\n{server.log}",
        )
        assert conn.recv(8) == b""  # the stuck request's connection died with its worker
    log = server.log
    assert f"worker 1 (pid {stuck}) timed out: its request from {client} has run 2." in log
    assert "dumping its stack, then killing it" in log
    dump = log.split("dumping its stack")[1]
    assert "most recent call first" in dump and "in handle" in dump  # faulthandler's dump
    assert "apps.py" in dump
    assert f"worker 1 (pid {stuck}) killed by SIGKILL" in log


def test_reuse_port_gives_each_worker_its_own_socket(serve):
    server = serve("apps:Pid", "-w", "3", "--reuse-port", "-b", "127.0.0.1:0")
    workers = server.wait_ready(3)
    port = logged_port(server)
    assert listening_sockets(port) == 3
    # Each worker holds exactly one listening socket of its own (no shared queue).
    for pid in workers:
        own = [
            c
            for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert len(own) == 1
    seen = {int(echo_line(("127.0.0.1", port))) for _ in range(60)}
    assert seen == set(workers)  # the kernel spreads connections over all three
    # A removed slot's socket leaves the group: nothing is hashed to a dead queue.
    server.signal(signal.SIGTTOU)
    wait_until(
        lambda: len(server.worker_pids()) == 2 and listening_sockets(port) == 2,
        message="slot 3 and its socket to go",
    )
    answers = [echo_line(("127.0.0.1", port), timeout=2) for _ in range(60)]
    assert all(answers)


def test_several_binds_share_one_pool(serve, app_dir: Path):
    a, b = app_dir / "a.sock", app_dir / "b.sock"
    server = serve("apps:Pid", "-w", "2", "-b", f"unix:{a}", "-b", f"unix:{b}")
    workers = set(server.wait_ready(2))
    served = {int(echo_line(str(path))) for path in (a, b) for _ in range(10)}
    assert served <= workers


def hold(address: tuple[str, int]) -> tuple[socket.socket, int]:
    """Open a connection to apps:HoldPid; return it and the pid of the worker holding it."""
    conn = socket.create_connection(address, timeout=5)
    return conn, int(conn.makefile("rb").readline())


def test_thread_worker_at_its_thread_cap_leaves_connections_to_idle_workers(serve, listener):
    server = serve(
        "apps:HoldPid",
        "-w",
        "2",
        "-k",
        "thread",
        "--threads",
        "1",
        *SERVER_FIRST,
        listen_on=listener,
    )
    server.wait_ready(2)
    first, first_pid = hold(listener.getsockname())
    second, second_pid = hold(listener.getsockname())
    with first, second:
        assert first_pid != second_pid  # the busy worker stopped accepting


def test_thread_worker_serves_up_to_threads_connections_at_once(serve, listener):
    server = serve(
        "apps:HoldPid",
        "-w",
        "1",
        "-k",
        "thread",
        "--threads",
        "3",
        *SERVER_FIRST,
        listen_on=listener,
    )
    (worker,) = server.wait_ready(1)
    held = [hold(listener.getsockname()) for _ in range(3)]
    try:
        assert [pid for _, pid in held] == [worker] * 3  # three at once, one worker
        with socket.create_connection(listener.getsockname(), timeout=5) as fourth:
            fourth.settimeout(0.3)
            try:
                early = fourth.recv(16)
            except TimeoutError:
                early = b""
            assert early == b""  # at the cap: the fourth waits in the backlog
            held.pop()[0].close()
            fourth.settimeout(5)
            assert int(fourth.makefile("rb").readline()) == worker  # served once one ends
    finally:
        for conn, _ in held:
            conn.close()


def test_accepted_tcp_connections_have_nodelay_unless_turned_off(serve, listener):
    on = serve("apps:NoDelay", "-w", "1", listen_on=listener)
    on.wait_ready(1)
    assert echo_line(listener.getsockname()) == b"1"
    on.signal(signal.SIGTERM)
    assert on.wait_exit() == 0
    with socket.create_server(("127.0.0.1", 0)) as plain:
        plain.set_inheritable(True)
        off = serve("apps:NoDelay", "-w", "1", "--no-tcp-nodelay", listen_on=plain)
        off.wait_ready(1)
        assert echo_line(plain.getsockname()) == b"0"


LEAKY_APP = """
import socketserver
KEPT = []
class Closes(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"bye\\n")
class KeepsAFile(socketserver.BaseRequestHandler):
    def handle(self):
        kept = self.request.makefile("wb")  # never closed: close() alone would not end it
        KEPT.append(kept)
        kept.write(b"kept\\n")
        kept.flush()
"""


@pytest.mark.parametrize(("handler", "answer"), [("Closes", b"bye\n"), ("KeepsAFile", b"kept\n")])
@pytest.mark.parametrize("worker_class", ["sync", "thread", "fork"])
def test_connection_ends_when_the_handler_returns(
    serve, listener, app_dir: Path, handler, answer, worker_class
):
    """prefork closes without socketserver's shutdown(SHUT_WR) when close() alone sends
    the FIN; a handler that keeps a file open on the socket still gets it shut down."""
    (app_dir / "leaky.py").write_text(LEAKY_APP)
    server = serve(
        f"leaky:{handler}", "-w", "1", "-k", worker_class, *SERVER_FIRST, listen_on=listener
    )
    server.wait_ready(1)
    for _ in range(3):
        with socket.create_connection(listener.getsockname(), timeout=5) as conn:
            data = b""
            while chunk := conn.recv(100):  # EOF, or a timeout that fails the test
                data += chunk
            assert data == answer
