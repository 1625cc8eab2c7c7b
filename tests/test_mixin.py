"""The library API, served in-process: ready classes, the mix-in, socketserver's hooks."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import io
import os
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, echo_line, is_running, living_descendants, wait_until

import prefork
from prefork.workers.base import STACK_DUMP_SIGNAL

# serve_forever runs in a thread here; on Python 3.12+ fork() then warns about threads.
pytestmark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")


class Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class DatagramEcho(socketserver.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read())


class Pid(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for _ in self.rfile:
            self.wfile.write(b"%d\n" % os.getpid())


@contextmanager
def serving(server: Any, poll_interval: float = 0.1) -> Iterator[Any]:
    """Run serve_forever in a thread; shutdown() and server_close() on the way out.

    It yields once the pool has forked: a socket this process opens while a worker is
    being forked would be inherited by that worker, which could then hold open the
    very connection it waits on (true of any fork in a threaded program).
    """
    expected = len(workers_of()) + server.prefork_config.workers
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,))
    thread.start()
    try:
        wait_until(lambda: len(workers_of()) == expected, message="the pool to fork")
        yield server
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
        assert not thread.is_alive()


def workers_of(pid: int = 0) -> list[int]:
    """Running children titled as workers; one that exits while we look is skipped."""
    pids = []
    for child in psutil.Process(pid or os.getpid()).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE and "worker" in " ".join(child.cmdline()):
                pids.append(child.pid)
    return sorted(pids)


def datagram_round_trip(server: Any, tmp_path: Path, payload: bytes = b"ping") -> bytes:
    family = server.socket.family
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        if family == socket.AF_UNIX:
            path = tmp_path / "client.sock"
            path.unlink(missing_ok=True)
            client.bind(str(path))
        client.settimeout(5)
        client.sendto(payload, server.server_address)
        return client.recv(4096)


READY_CLASSES = [
    (f"PreFork{model}{kind}Server", kind)
    for model in ("", "Threading", "Forking")
    for kind in ("TCP", "UDP", "UnixStream", "UnixDatagram")
]


@pytest.mark.parametrize(("class_name", "kind"), READY_CLASSES)
def test_ready_class_round_trip_and_shutdown_leaves_no_child(
    class_name: str, kind: str, tmp_path: Path
) -> None:
    cls = getattr(prefork, class_name)
    address: Any = str(tmp_path / "s.sock") if kind.startswith("Unix") else ("127.0.0.1", 0)
    handler = Echo if kind in ("TCP", "UnixStream") else DatagramEcho
    with serving(cls(address, handler, workers=2)) as server:
        for n in range(4):
            payload = b"hello %d" % n
            if handler is Echo:
                assert echo_line(server.server_address, payload) == payload
            else:
                assert datagram_round_trip(server, tmp_path, payload) == payload
        assert len(wait_until(lambda: len(workers_of()) == 2 and workers_of())) == 2
    assert living_descendants() == []  # shutdown() returned only after every worker exited
    if kind.startswith("Unix"):
        assert not os.path.exists(address)  # server_close removed the socket file


@pytest.mark.parametrize("cls", [prefork.PreForkTCPServer, prefork.PreForkThreadingTCPServer])
def test_workers_boot_when_the_hosts_stderr_is_not_a_file(cls: Any) -> None:
    # Jupyter, IDLE and contextlib.redirect_stderr give streams without a descriptor:
    # every worker failed to boot registering its stack dump (faulthandler).
    with (
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
        serving(cls(("127.0.0.1", 0), Echo, workers=1)) as server,
    ):
        assert echo_line(server.server_address, b"embedded") == b"embedded"
        worker = workers_of()[0]
        os.kill(worker, STACK_DUMP_SIGNAL)  # goes to descriptor 2; the worker lives on
        assert echo_line(server.server_address, b"again") == b"again"
        assert workers_of() == [worker]


def test_mixin_composes_with_threading_mixin() -> None:
    class Server(prefork.PreForkMixIn, socketserver.ThreadingMixIn, socketserver.TCPServer):
        workers = 1
        threads = 4

    started = threading.Event()

    with serving(Server(("127.0.0.1", 0), Echo)) as server:
        # Three connections held open at once by one worker: only threads can do that.
        conns = [socket.create_connection(server.server_address, timeout=5) for _ in range(3)]
        try:
            for n, conn in enumerate(conns):
                conn.sendall(b"%d\n" % n)
            answers = [conn.makefile("rb").readline() for conn in conns]
        finally:
            for conn in conns:
                conn.close()
        assert answers == [b"0\n", b"1\n", b"2\n"]
        started.set()


def test_handler_error_reaches_handle_error_and_worker_lives_on(tmp_path: Path) -> None:
    errors = tmp_path / "errors"

    class Failing(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            if line == b"fail\n":
                raise RuntimeError("handler blew up")
            self.wfile.write(b"%d\n" % os.getpid())

    class Server(prefork.PreForkTCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            with open(errors, "a") as f:
                f.write(f"{os.getpid()} {client_address[0]}\n")

    with serving(Server(("127.0.0.1", 0), Failing, workers=1)) as server:
        before = echo_line(server.server_address, b"hi")
        assert echo_line(server.server_address, b"fail") == b""  # closed, no answer
        after = echo_line(server.server_address, b"hi")
        assert before == after  # the same worker answers: it survived
        assert errors.read_text() == f"{int(before)} 127.0.0.1\n"


def test_verify_request_false_closes_the_connection() -> None:
    class Server(prefork.PreForkTCPServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return False

    # The client sends nothing and waits to be closed: TCP_DEFER_ACCEPT off.
    with serving(Server(("127.0.0.1", 0), Echo, workers=1, defer_accept=0)) as server:  # noqa: SIM117
        with socket.create_connection(server.server_address, timeout=5) as conn:
            assert conn.recv(10) == b""  # closed without being served


class ClientPort(socketserver.BaseRequestHandler):
    """Answers with the client address the server handed over, and the socket's facts."""

    def handle(self) -> None:
        sock = self.request
        facts = f"{self.client_address!r} {sock.family!r} {sock.type!r} {sock.gettimeout()!r}"
        receive = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
        sock.sendall(f"{facts} {receive[0] + receive[1] / 1e6}".encode() + b"\n")


def test_accepted_socket_is_what_socket_accept_gives() -> None:
    # The worker accepts without socket.accept's per-connection enum lookups; the
    # handler must see the same socket and address all the same.
    # --client-timeout is the kernel's (SO_RCVTIMEO, inherited from the listener): the
    # connection stays blocking, as socket.accept gives it.
    for client_timeout, seen in [(0, "None 0.0"), (7.5, "None 7.5")]:
        server = prefork.PreForkTCPServer(
            ("127.0.0.1", 0), ClientPort, workers=1, defer_accept=0, client_timeout=client_timeout
        )
        with serving(server), socket.create_connection(server.server_address, timeout=5) as conn:
            port = conn.getsockname()[1]
            answer = conn.makefile("rb").readline().decode()
        assert answer.split(") ", 1)[0] == f"('127.0.0.1', {port}"
        assert f"<AddressFamily.AF_INET: 2> <SocketKind.SOCK_STREAM: 1> {seen}" in answer


def test_get_request_override_is_used() -> None:
    class Server(prefork.PreForkTCPServer):
        def get_request(self) -> tuple[Any, Any]:
            request, _ = super().get_request()
            return request, ("203.0.113.9", 4242)  # what a PROXY-protocol server might do

    with serving(Server(("127.0.0.1", 0), ClientPort, workers=1, defer_accept=0)) as server:  # noqa: SIM117
        with socket.create_connection(server.server_address, timeout=5) as conn:
            answer = conn.makefile("rb").readline()
    assert answer.startswith(b"('203.0.113.9', 4242)")
    assert answer.endswith(b" None 10.0\n")  # its connections have the client timeout too


def test_hooks_run_in_workers_and_bind_hooks_once_in_master(tmp_path: Path) -> None:
    calls = tmp_path / "calls"

    def record(what: str) -> None:
        with open(calls, "a") as f:
            f.write(f"{what} {os.getpid()}\n")

    class Server(prefork.PreForkTCPServer):
        timeout = 0.05  # handle_timeout after this long without a request

        def server_bind(self) -> None:
            record("server_bind")
            super().server_bind()

        def server_activate(self) -> None:
            record("server_activate")
            super().server_activate()

        def process_request(self, request: Any, client_address: Any) -> None:
            record("process_request")
            super().process_request(request, client_address)

        def finish_request(self, request: Any, client_address: Any) -> None:
            record("finish_request")
            super().finish_request(request, client_address)

        def shutdown_request(self, request: Any) -> None:
            record("shutdown_request")
            super().shutdown_request(request)

        def service_actions(self) -> None:
            if not getattr(self, "_recorded_service", False):
                self._recorded_service = True
                record("service_actions")

        def handle_timeout(self) -> None:
            if not getattr(self, "_recorded_timeout", False):
                self._recorded_timeout = True
                record("handle_timeout")

    master = os.getpid()
    with serving(Server(("127.0.0.1", 0), Pid, workers=1)) as server:
        worker = int(echo_line(server.server_address))
        wait_until(lambda: "handle_timeout" in calls.read_text())
    lines = calls.read_text().splitlines()
    assert lines.count(f"server_bind {master}") == 1
    assert lines.count(f"server_activate {master}") == 1
    for hook in (
        "process_request",
        "finish_request",
        "shutdown_request",
        "service_actions",
        "handle_timeout",
    ):
        assert f"{hook} {worker}" in lines, hook
        assert f"{hook} {master}" not in lines, f"{hook} ran in the master"


def test_unknown_keyword_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="'wrokers'"):
        prefork.PreForkTCPServer(("127.0.0.1", 0), Echo, wrokers=2)


def test_bad_setting_value_is_a_config_error_and_binds_nothing() -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(prefork.ConfigError, match="workers must be at least 1"):
        prefork.PreForkTCPServer(("127.0.0.1", 0), Echo, workers=0)
    assert set(os.listdir("/proc/self/fd")) == before


def test_settings_are_class_attributes_with_config_defaults() -> None:
    defaults = prefork.Config()
    assert prefork.PreForkMixIn.workers == defaults.workers == (os.cpu_count() or 1)
    assert prefork.PreForkMixIn.backlog == 2048
    assert prefork.PreForkMixIn.graceful_timeout == defaults.graceful_timeout

    class Server(prefork.PreForkTCPServer):
        workers = 3
        backlog = 77

    with Server(("127.0.0.1", 0), Echo, bind_and_activate=False) as server:
        assert server.prefork_config.workers == 3
        assert server.request_queue_size == 77


def test_failed_bind_leaks_no_descriptor() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(OSError, match="in use"):
            prefork.PreForkTCPServer(taken.getsockname(), Echo)
        assert set(os.listdir("/proc/self/fd")) == before


def test_shutdown_before_serve_forever_does_not_hang() -> None:
    with prefork.PreForkTCPServer(("127.0.0.1", 0), Echo, workers=1) as server:
        server.shutdown()  # returns at once
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        thread.join(5)
        assert not thread.is_alive()  # and serve_forever, asked to stop already, returned
    assert living_descendants() == []


def test_two_servers_reap_only_their_own_workers() -> None:
    # The host program's own child must stay the host's: its exit status must survive.
    host_child = subprocess.Popen(["sh", "-c", "read _; exit 7"], stdin=subprocess.PIPE)
    a = prefork.PreForkTCPServer(("127.0.0.1", 0), Pid, workers=2)
    b = prefork.PreForkTCPServer(("127.0.0.1", 0), Pid, workers=2)
    with serving(a), serving(b):  # noqa: SIM117 - one server inside the other's lifetime
        wait_until(lambda: len(workers_of()) == 4)
        a_pids = {int(echo_line(a.server_address)) for _ in range(8)}
        victim = next(iter(a_pids))
        b_before = set(workers_of()) - a_pids
        host_child.communicate(b"\n", timeout=5)  # it exits with 7 while both servers run
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not is_running(victim) and len(workers_of()) == 4)
        assert b_before <= set(workers_of())  # b's workers untouched
    assert host_child.returncode == 7  # not stolen by a waitpid(-1)


def test_serve_forever_in_main_thread_stops_on_sigterm_and_restores_handlers() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with prefork.PreForkTCPServer(("127.0.0.1", 0), Echo, workers=1) as server:

        def term_when_served() -> None:
            wait_until(lambda: len(workers_of()) == 1, message="the pool to fork")
            echo_line(server.server_address)
            os.kill(os.getpid(), signal.SIGTERM)

        sender = threading.Thread(target=term_when_served)
        sender.start()
        server.serve_forever(poll_interval=0.1)  # returns on SIGTERM
        sender.join(5)
    assert signal.getsignal(signal.SIGTERM) == previous
    assert living_descendants() == []


def test_hup_under_the_library_replaces_every_worker() -> None:
    with prefork.PreForkTCPServer(("127.0.0.1", 0), Pid, workers=2) as server:
        seen: dict[str, set[int]] = {}

        def hup_then_term() -> None:
            wait_until(lambda: len(workers_of()) == 2, message="the pool to fork")
            seen["before"] = set(workers_of())
            os.kill(os.getpid(), signal.SIGHUP)
            # The old generation goes only after the new one is ready: wait for both.
            wait_until(
                lambda: (
                    (now := set(workers_of())) and len(now) == 2 and now.isdisjoint(seen["before"])
                ),
                message="a new generation",
            )
            seen["after"] = {int(echo_line(server.server_address)) for _ in range(10)}
            os.kill(os.getpid(), signal.SIGTERM)

        driver = threading.Thread(target=hup_then_term)
        driver.start()
        server.serve_forever(poll_interval=0.1)
        driver.join(10)
    assert seen["after"] and seen["after"].isdisjoint(seen["before"])
    assert living_descendants() == []


def test_hooks_run_in_the_right_process_and_order(tmp_path: Path) -> None:
    calls = tmp_path / "hooks"

    def record(*what: object) -> None:
        with open(calls, "a") as f:
            f.write(" ".join(map(str, (*what, os.getpid()))) + "\n")

    class Server(prefork.PreForkTCPServer):
        def on_starting(self) -> None:
            record("on_starting")

        def when_ready(self) -> None:
            record("when_ready")

        def pre_fork(self, worker: prefork.WorkerInfo) -> None:
            record("pre_fork", worker.nr, worker.generation, worker.pid)

        def post_fork(self, worker: prefork.WorkerInfo) -> None:
            record("post_fork", worker.nr, worker.generation, worker.pid)

        def worker_exit(self, worker: prefork.WorkerInfo) -> None:
            record("worker_exit", worker.nr, worker.generation, worker.pid)

        def on_reload(self) -> None:
            record("on_reload")

    master = os.getpid()
    with Server(("127.0.0.1", 0), Pid, workers=2) as server:

        def hup_then_term() -> None:
            try:
                wait_until(lambda: calls.exists() and "when_ready" in calls.read_text())
                os.kill(master, signal.SIGHUP)
                wait_until(lambda: calls.read_text().count("worker_exit") == 2)  # gen 1 gone
            finally:
                os.kill(master, signal.SIGTERM)  # whatever happened, let serve_forever end

        driver = threading.Thread(target=hup_then_term)
        driver.start()
        server.serve_forever(poll_interval=0.1)
        driver.join(10)
    lines = [line.split() for line in calls.read_text().splitlines()]
    names = [line[0] for line in lines]
    assert names[0] == "on_starting" and lines[0][-1] == str(master)
    for line in lines:
        in_worker = line[0] in ("post_fork", "worker_exit")
        assert (line[-1] != str(master)) == in_worker, line  # the right process
        if in_worker:
            assert line[3] == line[4]  # the worker's own pid, as WorkerInfo says
    assert [line[3] for line in lines if line[0] == "pre_fork"] == ["None"] * 4
    first_ready = names.index("when_ready")
    assert names[:first_ready].count("post_fork") == 2  # ready means both booted
    reload_at = names.index("on_reload")
    assert [line[2] for line in lines[reload_at:] if line[0] == "pre_fork"] == ["2", "2"]
    assert names.count("when_ready") == 1 and names.count("worker_exit") == 4


def test_a_signal_delivered_to_another_thread_wakes_the_master_at_once() -> None:
    # Python runs handlers in the main thread only; the kernel may deliver a signal to
    # any thread. Sent straight to this helper thread, HUP and TERM must still act now,
    # not when the master's sleep (up to the 30 s heartbeat timeout) ends.
    with prefork.PreForkTCPServer(("127.0.0.1", 0), Pid, workers=1) as server:
        timings: dict[str, float] = {}

        def signal_this_thread() -> None:
            me = threading.get_ident()
            term_sent = False
            try:
                wait_until(lambda: len(workers_of()) == 1, message="the pool to fork")
                before = set(workers_of())
                started = time.monotonic()
                signal.pthread_kill(me, signal.SIGHUP)
                wait_until(
                    lambda: (now := set(workers_of())) and now.isdisjoint(before),
                    message="the reload to replace the worker",
                )
                timings["reload"] = time.monotonic() - started
                started = time.monotonic()
                signal.pthread_kill(me, signal.SIGTERM)
                term_sent = True
                wait_until(lambda: not workers_of(), message="the stop")
                timings["stop"] = time.monotonic() - started
            finally:
                # A second TERM after serve_forever returned (and restored the default
                # handler) would kill this very process: only if none was sent.
                if not term_sent:
                    os.kill(os.getpid(), signal.SIGTERM)

        helper = threading.Thread(target=signal_this_thread)
        helper.start()
        server.serve_forever(poll_interval=0.1)
        helper.join(10)
    assert timings["reload"] < 5 and timings["stop"] < 5


THREADED_HOST = """
import socketserver, sys, threading
import prefork

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)

# The host's own thread, alive through every fork, as a web app's or a test runner's are.
idle = threading.Event()
threading.Thread(target=idle.wait, daemon=True).start()
server = prefork.PreForkTCPServer(("127.0.0.1", 0), Echo, workers=2)
master = threading.Thread(target=server.serve_forever, args=(0.05,))
master.start()
print(server.server_address[1], flush=True)
sys.stdin.readline()  # until the test has made the master fork again
server.shutdown()
master.join(10)
server.server_close()
"""


@pytest.mark.parametrize("warnings", ["error::DeprecationWarning", "default::DeprecationWarning"])
def test_a_threaded_host_is_told_once_per_master_that_workers_fork_beside_threads(
    tmp_path: Path, warnings: str
) -> None:
    # A host that set up no logging and forks three workers (two, then a replacement):
    # one line on its stderr, not one per fork, and not hidden. CPython's own warning
    # (3.12+) is the host's filters' to show: at most once per master under "default".
    script = tmp_path / "host.py"
    script.write_text(THREADED_HOST)
    env = {**os.environ, "PYTHONWARNINGS": warnings, "PYTHONPATH": str(ROOT)}
    host = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert host.stdout is not None and host.stdin is not None
        port = int(host.stdout.readline())
        first = wait_until(lambda: len(found := workers_of(host.pid)) == 2 and found)
        os.kill(first[0], signal.SIGKILL)  # the master forks a third worker
        wait_until(lambda: first[0] not in (now := workers_of(host.pid)) and len(now) == 2)
        assert echo_line(("127.0.0.1", port)) == b"ping"
        _, stderr = host.communicate("stop\n", timeout=20)
    finally:
        if host.poll() is None:
            for pid in workers_of(host.pid):
                os.kill(pid, signal.SIGKILL)
            host.kill()
            host.wait(5)
    assert host.returncode == 0, stderr
    said = [line for line in stderr.splitlines() if "other thread" in line]
    assert len(said) == 1, stderr
    assert said[0].endswith(  # after the host's logging format, if it has one
        f"master (pid {host.pid}) forks its workers beside 2 other threads of this "
        "process: a worker gets none of them, and a lock one held at the fork stays held "
        'in the worker (docs/design.md, "Forking from a threaded host")'
    ), stderr
    assert "Traceback" not in stderr
    cpython_said = stderr.count("is multi-threaded, use of fork()")
    assert cpython_said == (
        1 if warnings.startswith("default") and sys.version_info >= (3, 12) else 0
    ), stderr


class PidWithAThread(prefork.PreForkTCPServer):
    """An app that starts a thread of its own in each worker, as many do."""

    def post_fork(self, worker: Any) -> None:
        threading.Thread(target=threading.Event().wait, daemon=True).start()


def threads_taking(pid: int, signum: int) -> list[int]:
    """The threads of ``pid``, other than its main one, that do not block ``signum``."""
    found = []
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            match = re.search(r"SigBlk:\s*([0-9a-f]+)", status)
            blocked = int(match.group(1), 16) if match else 0
            if tid != pid and not blocked & (1 << (signum - 1)):
                found.append(tid)
    return found


def test_a_worker_forked_from_a_thread_acts_on_a_signal_another_of_its_threads_gets() -> None:
    # The kernel hands a process's signal to any thread that does not block it: here
    # the app's own. The worker was forked by a master running outside the main
    # thread, and CPython 3.13 then flags a thread state the child does not run: the
    # handler would wait for the next interrupted system call (an idle worker has
    # none) and the TERM, say, of a stop would never be acted on.
    tgkill = ctypes.CDLL(None, use_errno=True).tgkill
    with serving(PidWithAThread(("127.0.0.1", 0), Pid, workers=1)):
        [worker] = workers_of()
        other = wait_until(
            lambda: threads_taking(worker, signal.SIGTERM), message="the app's thread"
        )[0]
        assert tgkill(worker, other, signal.SIGTERM) == 0
        wait_until(lambda: not is_running(worker), timeout=3, message="the worker to stop")


def _hello_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from %s\n" % environ["PATH_INFO"].encode()]


def test_a_wsgi_app_from_the_library() -> None:
    server = prefork.PreForkThreadingTCPServer(
        ("127.0.0.1", 0), prefork.wsgi_handler(_hello_app), workers=1
    )
    with server, serving(server):
        conn = http.client.HTTPConnection(*server.server_address, timeout=10)
        try:
            for path in ("/a", "/b"):  # one kept-alive connection
                conn.request("GET", path)
                assert conn.getresponse().read() == b"hello from %s\n" % path.encode()
        finally:
            conn.close()
