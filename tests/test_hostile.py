"""Hostile clients and forged pages: idle and trickling connections, client text full of
terminal escapes, and processes that pretend to be a prefork master."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import echo_line, run_cli, wait_until


def probe_time(address: tuple[str, int], timeout: float = 15.0) -> float:
    """Seconds until a fresh client is answered."""
    started = time.monotonic()
    assert echo_line(address, b"probe", timeout=timeout) == b"probe"
    return time.monotonic() - started


@contextlib.contextmanager
def clients(
    address: tuple[str, int], count: int, first: bytes = b""
) -> Iterator[list[socket.socket]]:
    """``count`` connections, each having sent ``first``; all closed on the way out."""
    with contextlib.ExitStack() as stack:
        conns = []
        for _ in range(count):
            conn = stack.enter_context(socket.create_connection(address, timeout=15))
            if first:
                conn.sendall(first)
            conns.append(conn)
        yield conns


def closed_by_server(conn: socket.socket) -> bool:
    """True once the server has closed ``conn`` (EOF or reset), waiting up to its timeout."""
    try:
        return conn.recv(100) == b""
    except ConnectionResetError:
        return True


def test_the_default_listener_defers_accept_until_the_client_speaks(serve, listener):
    server = serve("apps:Echo", "-w", "1", listen_on=listener)
    server.wait_ready(1)
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) >= 30
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    with socket.create_server(("127.0.0.1", 0)) as other:
        other.set_inheritable(True)
        off = serve("apps:Echo", "-w", "1", "--defer-accept", "0", listen_on=other)
        off.wait_ready(1)
        assert other.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0


def test_idle_connections_do_not_stall_a_sync_pool_with_the_defaults(serve, listener):
    """Two connections that send nothing froze the default 2-worker sync pool for 30 s,
    then got both workers killed. The kernel now holds them (TCP_DEFER_ACCEPT)."""
    server = serve("apps:Echo", "-w", "2", listen_on=listener)
    workers = server.wait_ready(2)
    address = listener.getsockname()
    with clients(address, 2):
        assert probe_time(address) < 3.0
    assert sorted(server.booted()) == sorted(workers) and "timed out" not in server.log


def test_idle_clients_past_the_deferral_end_at_once(serve, listener):
    """Once the deferral runs out the kernel hands a silent connection over anyway; it
    has been silent all that time, and it ends at its first read, without waiting."""
    server = serve(
        "apps:Echo", "-w", "2", "--defer-accept", "1", "--log-level", "debug",
        listen_on=listener,
    )  # fmt: skip
    workers = server.wait_ready(2)
    address = listener.getsockname()
    with clients(address, 4) as idle:
        started = time.monotonic()
        assert all(closed_by_server(conn) for conn in idle)
        assert time.monotonic() - started < 9.0  # handed over after 1-3 s, then closed
        assert probe_time(address) < 3.0
    assert sorted(server.booted()) == sorted(workers)
    wait_until(lambda: server.log.count("sent nothing during the accept deferral") == 4, 5)
    assert "Traceback" not in server.log


class Trickle:
    """Clients that send a byte every ``interval`` seconds, each on its own socket."""

    def __init__(self, conns: list[socket.socket], interval: float) -> None:
        self.conns, self.interval = conns, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 30
        while not self.stop.wait(self.interval) and time.monotonic() < deadline:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.send(b"x")

    def __enter__(self) -> Trickle:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(5)


def test_trickling_clients_are_dropped_and_a_probe_gets_through(serve, listener):
    """Six clients that send a byte every 0.3 s, well inside the 2 s between reads, against
    two sync workers: each may keep its worker waiting 2 s in all, not for ever."""
    server = serve("apps:Echo", "-w", "2", "--client-timeout", "2", listen_on=listener)
    workers = server.wait_ready(2)
    address = listener.getsockname()
    with clients(address, 6, first=b"G") as trickling, Trickle(trickling, 0.3):
        assert probe_time(address) < 12.0  # three rounds of two, ~2-3 s each, at worst
        assert all(closed_by_server(conn) for conn in trickling)
    assert sorted(server.booted()) == sorted(workers)
    assert "timed out" not in server.log and "Traceback" not in server.log


def test_a_client_that_keeps_up_is_served_however_long_it_takes(serve, listener, app_dir: Path):
    """A slow but steady upload (2 KB/s, above MIN_RATE) outlasts the client timeout."""
    (app_dir / "count.py").write_text(
        "import socketserver\n"
        "class Count(socketserver.StreamRequestHandler):\n"
        "    def handle(self):\n"
        "        self.wfile.write(b'%d\\n' % len(self.rfile.readline()))\n"
    )
    server = serve("count:Count", "-w", "1", "--client-timeout", "1", listen_on=listener)
    server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=15) as conn:
        for _ in range(30):  # 3 s in all, three times the timeout
            conn.sendall(b"y" * 200)
            time.sleep(0.1)  # the client's pace, not a wait for the server
        conn.sendall(b"\n")
        assert conn.makefile("rb").readline() == b"6001\n"


def test_a_client_that_reads_its_answer_slowly_is_dropped(serve, listener, app_dir: Path):
    """Slow read: a client that takes a 16 MB answer (more than the kernel's send buffers
    hold) 64 bytes every 0.2 s, under MIN_RATE, keeps the one sync worker waiting about
    the 1 s client timeout, not for the days it would take: a client behind it gets
    its own answer in seconds, while the slow one is still reading."""
    answer = 16 << 20
    (app_dir / "big.py").write_text(
        "import socketserver\n"
        "class Big(socketserver.StreamRequestHandler):\n"
        "    def handle(self):\n"
        "        self.rfile.readline()\n"
        f"        self.wfile.write(b'z' * {answer})\n"
    )
    server = serve("big:Big", "-w", "1", "--client-timeout", "1", listen_on=listener)
    server.wait_ready(1)
    address = listener.getsockname()
    done = threading.Event()

    def read_slowly(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while not done.wait(0.2):  # the client's pace; ends with the test
                if not conn.recv(64):
                    return

    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(15)
        slow.connect(address)
        slow.sendall(b"go\n")
        reader = threading.Thread(target=read_slowly, args=(slow,))
        reader.start()
        try:
            time.sleep(0.5)  # the slow client's pace: its request is in first
            started = time.monotonic()
            with socket.create_connection(address, timeout=15) as conn:
                conn.sendall(b"go\n")
                assert len(conn.makefile("rb").read()) == answer
            assert time.monotonic() - started < 10
            assert reader.is_alive()  # still reading: the worker let it go
        finally:
            done.set()
            reader.join(timeout=5)
    assert "Traceback" not in server.log


def test_idle_connections_do_not_fill_a_thread_pool(serve, listener):
    """40 silent connections used to take all 2 x 16 threads for as long as they stayed."""
    server = serve("apps:Echo", "-w", "2", "-k", "thread", listen_on=listener)
    server.wait_ready(2)
    address = listener.getsockname()
    with clients(address, 40):
        assert probe_time(address) < 3.0


RECV_APP = """
import socketserver
class Recv(socketserver.BaseRequestHandler):
    def handle(self):
        while self.request.recv(100):
            pass
"""


@pytest.mark.parametrize("bind", ["tcp", "unix"])
def test_a_client_timeout_is_a_debug_line_never_a_traceback(
    serve, listener, app_dir: Path, bind: str
):
    """The handler's recv() outwaits the timeout and raises (EAGAIN): handle_error says
    it at debug level. A TCP connection has it from its listener, a Unix one is given
    it as it is accepted."""
    (app_dir / "recv.py").write_text(RECV_APP)
    path = str(app_dir / "app.sock")
    where = {"listen_on": listener} if bind == "tcp" else {}
    unix = ("-b", f"unix:{path}") if bind == "unix" else ()
    server = serve(
        "recv:Recv", "-w", "1", "--client-timeout", "0.5", "--log-level", "debug", *unix,
        **where,
    )  # fmt: skip
    server.wait_ready(1)
    family = socket.AF_INET if bind == "tcp" else socket.AF_UNIX
    with socket.socket(family) as conn:
        conn.settimeout(10)
        conn.connect(listener.getsockname() if bind == "tcp" else path)
        conn.sendall(b"partial")
        started = time.monotonic()
        assert conn.recv(10) == b""  # closed after 0.5 s of silence
        assert 0.4 < time.monotonic() - started < 5
    wait_until(lambda: "was silent for 0.5s (--client-timeout); closed" in server.log, 5)
    assert "[DEBUG]" in next(x for x in server.log.splitlines() if "was silent" in x)
    assert server.log.count("--client-timeout") == 1
    assert "Traceback" not in server.log and "Error" not in server.log


def test_a_line_reader_times_out_as_with_settimeout(serve, listener):
    """readline() raises TimeoutError, as with socket.settimeout, rather than handing the
    handler half a line as if the stream had ended."""
    server = serve("apps:Echo", "-w", "1", "--client-timeout", "0.5", listen_on=listener)
    server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=10) as conn:
        conn.sendall(b"no newline yet")
        assert conn.makefile("rb").read() == b""  # closed, half a line never echoed
    assert "Traceback" not in server.log


def test_a_handler_with_its_own_timeout_keeps_it(serve, listener, app_dir: Path):
    (app_dir / "own.py").write_text(
        "import socketserver\n"
        "class Own(socketserver.StreamRequestHandler):\n"
        "    timeout = 60\n"
        "    def handle(self):\n"
        "        self.rfile.readline()\n"
        "        self.wfile.write(b'%r\\n' % self.connection.gettimeout())\n"
    )
    server = serve("own:Own", "-w", "1", "--client-timeout", "3", listen_on=listener)
    server.wait_ready(1)
    assert echo_line(listener.getsockname(), b"x") == b"60.0"


# -- text a client chooses -------------------------------------------------------------------
EVIL = "\x1b]0;owned\x07\x1b[2J\n[master] forged line"


@pytest.fixture
def evil_client(tmp_path: Path) -> Iterator[socket.socket]:
    """A Unix client bound at a path full of terminal escapes and a line break."""
    directory = tmp_path / "c"
    directory.mkdir()
    conn = socket.socket(socket.AF_UNIX)
    conn.bind(str(directory / EVIL.replace("/", "_")))
    yield conn
    conn.close()


def test_client_text_is_escaped_in_status_the_log_and_the_access_log(
    serve, app_dir: Path, evil_client: socket.socket
):
    path, access = str(app_dir / "app.sock"), app_dir / "access.log"
    server = serve(
        "apps:Slow", "-w", "1", "-b", f"unix:{path}", "--timeout", "1.5",
        "--access-log", str(access),
    )  # fmt: skip
    server.wait_ready(1)
    evil_client.connect(path)
    evil_client.sendall(b"4\n")  # a request that outlives --timeout
    assert evil_client.recv(8) == b"started\n"
    status = run_cli("status", str(server.pid), cwd=app_dir)
    as_json = run_cli("status", "--json", str(server.pid), cwd=app_dir)
    wait_until(lambda: "timed out: its request from" in server.log, 10, message=lambda: server.log)
    for text in (status.stdout, as_json.stdout, server.log):
        assert "\x1b" not in text and "\x07" not in text
        assert "\n[master] forged line" not in text
    assert "\\x1b]0;owned\\x07" in status.stdout
    assert "\\x1b]0;owned\\x07" in json.loads(as_json.stdout)["workers"][0]["client"]
    assert "\\x1b]0;owned" in next(x for x in server.log.splitlines() if "timed out" in x)
    wait_until(lambda: server.worker_pids() and len(server.booted()) == 1, 10)
    with socket.socket(socket.AF_UNIX) as plain:  # a request that finishes: its access line
        plain.settimeout(5)
        plain.bind(str(app_dir / "c\x1bx"))
        plain.connect(path)
        plain.sendall(b"0\n")
        assert plain.makefile("rb").read() == b"started\ndone\n"
    wait_until(lambda: access.exists() and "ms ok" in access.read_text(), 5)
    assert "\x1b" not in access.read_text() and "c\\x1bx" in access.read_text()


def test_handle_error_escapes_the_client_and_the_exception(serve, app_dir: Path):
    """A client's bytes in an exception message, line breaks and all, stay one line."""
    (app_dir / "fails.py").write_text(
        "import socketserver\n"
        "class Fails(socketserver.BaseRequestHandler):\n"
        "    def handle(self):\n"
        "        raise ValueError(self.request.recv(200).decode())\n"
    )
    path = str(app_dir / "app.sock")
    server = serve("fails:Fails", "-w", "1", "-b", f"unix:{path}")
    server.wait_ready(1)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.bind(str(app_dir / "\x1b[31mred"))
        conn.connect(path)
        conn.sendall(b"\x1b[2J boom\n2026-01-01 00:00:00 [1] [master] [ERROR] forged line\n")
        conn.recv(10)
    wait_until(lambda: "ValueError" in server.log, 5)
    assert "Exception occurred during processing of request from" in server.log
    assert "\x1b" not in server.log and "\\x1b[31mred" in server.log
    assert not any(line.startswith("2026-01-01") for line in server.log.splitlines())
    assert "boom\\n2026-01-01" in server.log


def test_options_a_binder_set_on_a_passed_socket_are_kept(serve):
    """systemd's DeferAcceptSec= (here set by the test, which binds) is its choice."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.set_inheritable(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 3)
        server = serve("apps:Echo", "-w", "1", listen_on=sock)
        server.wait_ready(1)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 3
        assert echo_line(sock.getsockname()) == b"ping"


# -- pages that are not prefork's --------------------------------------------------------------
FORGER = r"""
import ctypes, os, signal, struct, sys, time
child = os.fork()  # its worker: a child, ended with it
if child == 0:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    time.sleep(60)
    os._exit(0)
payload = sys.stdin.buffer.read().replace(b'"pid": 1,', b'"pid": %d,' % os.getpid())
fd = os.memfd_create("prefork-master", 0)
os.write(fd, struct.pack("Q", 2) + struct.pack("I", len(payload)) + payload)
worker = os.memfd_create("prefork-worker", 0)
page = bytearray(4096)
struct.pack_into("d", page, 0, float("nan"))
struct.pack_into("dQH", page, 8, float("inf"), 2**64 - 1, 65535)
struct.pack_into("qIIId", page, 248, child, 1, 1, 7, float("nan"))
page[26:35] = b"\x1b[2Jevil\x07"
os.write(worker, bytes(page))
print("ready", flush=True)
time.sleep(60)
"""

VALID = {
    "board": 7, "pid": 1, "name": "n", "version": "v", "state": "serving", "generation": 1,
    "reloading": None, "workers": 1, "worker_class": "sync", "binds": ["x"],
    "served_by_exited": 0,
}  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"{not json", "not JSON"),
        (b"[" * 30000 + b"]" * 30000, "not JSON"),
        (b'"a string"', "not a JSON object"),
        (json.dumps({**VALID, "binds": [["nested"]]}).encode(), "binds"),
        (json.dumps({k: v for k, v in VALID.items() if k != "generation"}).encode(), "generation"),
        (json.dumps({**VALID, "workers": True}).encode(), "'workers' is bool"),
    ],
)
def test_a_forged_master_page_is_one_line(tmp_path: Path, payload: bytes, says: str):
    length = len(payload)
    forger = subprocess.Popen(
        [sys.executable, "-c", FORGER, str(length)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert forger.stdin and forger.stdout
        forger.stdin.write(payload)
        forger.stdin.close()
        assert forger.stdout.readline() == b"ready\n"
        for extra in ([], ["--json"]):
            result = run_cli("status", *extra, str(forger.pid), cwd=tmp_path)
            assert result.returncode == 1, result.stderr
            assert "Traceback" not in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
            assert says in result.stderr
    finally:
        forger.kill()
        forger.wait(5)
        if forger.stdout:
            forger.stdout.close()


def test_a_forged_worker_page_is_shown_without_its_lies(tmp_path: Path):
    payload = json.dumps(VALID).encode()
    forger = subprocess.Popen(
        [sys.executable, "-c", FORGER, str(len(payload))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert forger.stdin and forger.stdout
        forger.stdin.write(payload)
        forger.stdin.close()
        assert forger.stdout.readline() == b"ready\n"
        text = run_cli("status", str(forger.pid), cwd=tmp_path)
        as_json = run_cli("status", "--json", str(forger.pid), cwd=tmp_path)
    finally:
        forger.kill()
        forger.wait(5)
        if forger.stdout:
            forger.stdout.close()
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    assert "\x1b" not in text.stdout and "\\x1b[2Jevil\\x07" in text.stdout
    (worker,) = json.loads(as_json.stdout)["workers"]
    assert worker["heartbeat_age"] is None and worker["request_age"] is None
    assert worker["requests"] == 2**53


def test_status_of_a_process_with_a_fifo_named_like_a_page_does_not_hang(tmp_path: Path):
    """A descriptor that is not a page (here a pipe) is skipped, not read."""
    code = "import os,time; r,w=os.pipe(); print('ready',flush=True); time.sleep(60)"
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert other.stdout and other.stdout.readline() == b"ready\n"
        result = run_cli("status", str(other.pid), cwd=tmp_path, timeout=10)
        assert result.returncode == 1 and "is not a prefork master" in result.stderr
    finally:
        os.kill(other.pid, signal.SIGKILL)
        other.wait(5)
        if other.stdout:
            other.stdout.close()


def _keeps_going(conn: socket.socket, step: bytes, pause: float, seconds: float) -> float | None:
    """Send ``step`` every ``pause`` s for up to ``seconds``, reading what comes back;
    how long until the server closed the connection, or None if it never did."""
    conn.settimeout(0.01)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            conn.sendall(step)
        except OSError:  # reset: closed
            return time.monotonic() - started
        with contextlib.suppress(TimeoutError):
            if conn.recv(4096) == b"":
                return time.monotonic() - started
        time.sleep(pause)
    return None


@pytest.mark.parametrize(
    ("pattern", "step", "pause"),
    [("above the minimum rate", b"x" * 10, 0.001), ("a line inside every timeout", b"x\n", 1.2)],
)
def test_a_client_just_inside_every_bound_is_disconnected_in_the_end(
    serve, listener, pattern: str, step: bytes, pause: float
):
    """~600 bytes a second never emptied the allowance, and on a kept-alive connection
    each prompt answer refilled it: 32 such clients held every thread of a thread pool
    for as long as they liked."""
    server = serve(
        "apps:Echo", "-w", "1", "-k", "thread", "--client-timeout", "2",
        "--client-max-wait", "3", "--log-level", "debug", listen_on=listener,
    )  # fmt: skip
    server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=10) as conn:
        lasted = _keeps_going(conn, step, pause, seconds=20)
    assert lasted is not None, f"{pattern}: still connected after 20 s"
    wait_until(lambda: "in all (--client-max-wait); closed" in server.log, 5)
    assert "Traceback" not in server.log
