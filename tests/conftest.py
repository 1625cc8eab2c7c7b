"""Fixtures: real servers in subprocesses or threads, sockets the tests own, and a guard
that fails any test leaving a process behind.

pytest makes itself a child subreaper, so a worker orphaned by a killed master is
re-parented to pytest instead of init: the guard sees it, and reaps it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
# For handlers that speak first (apps:HoldPid) or clients that wait to be closed without
# sending: TCP_DEFER_ACCEPT, on by default, would hold such a connection in the kernel.
SERVER_FIRST = ("--defer-accept", "0")
_PR_SET_CHILD_SUBREAPER = 36


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str | Callable[[], str] = "condition",
) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds.

    ``message`` may be a callable, evaluated only on failure (to show a fresh log).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def living_descendants() -> list[psutil.Process]:
    """Our descendants that still run; zombies among our own children are reaped here."""
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                if proc.ppid() == os.getpid():
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(proc.pid, os.WNOHANG)
                continue
            alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def is_running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="session", autouse=True)
def _subreaper() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@pytest.fixture(autouse=True)
def no_stray_processes() -> Iterator[None]:
    """Fail a test that leaves any process of its own running (after a short grace)."""
    yield
    deadline = time.monotonic() + 5.0
    while (strays := living_descendants()) and time.monotonic() < deadline:
        time.sleep(0.02)
    if strays:
        described = [f"{p.pid} {' '.join(p.cmdline()) or p.name()}" for p in strays]
        for proc in strays:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        wait_until(lambda: not living_descendants(), 5.0, message="strays to die")
        pytest.fail(f"test left processes running: {described}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the whole run if any process started by the tests is still alive."""
    strays = living_descendants()
    if strays:
        for proc in strays:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        print(f"\nprocesses left running by the tests: {[p.pid for p in strays]}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- sockets the test owns --------------------------------------------------------------
@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening TCP socket on 127.0.0.1, inheritable, for ``--bind fd://N``."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.set_inheritable(True)
    yield sock
    sock.close()


def echo_line(address: Any, payload: bytes = b"ping", timeout: float = 5.0) -> bytes:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(address)
        conn.sendall(payload + b"\n")
        return conn.makefile("rb").readline().rstrip(b"\n")


def can_connect(address: Any) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(1.0)
        try:
            conn.connect(address)
        except OSError:
            return False
    return True


# -- an interpreter the workers' user can run ------------------------------------------------
@dataclass(frozen=True)
class Interpreter:
    """A Python and a PYTHONPATH entry holding prefork."""

    python: str
    path: str


THIS = Interpreter(sys.executable, str(ROOT))
DROP_TO_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


def _runs_prefork_as_nobody(interpreter: Interpreter) -> bool:
    try:
        result = subprocess.run(
            [*DROP_TO_NOBODY, interpreter.python, "-c", "import prefork.cli"],
            env={**os.environ, "PYTHONPATH": interpreter.path},
            cwd="/",
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.fixture(scope="session")
def as_nobody() -> Iterator[Interpreter]:
    """An interpreter and a copy of prefork that ``nobody`` can read, for tests where the
    master is root and the workers are nobody. This test's interpreter when nobody can
    run it; otherwise a venv of Debian's own python3 (readable by every user) with
    prefork's dependencies, in a world-readable directory. As root these tests must run:
    when neither works the test fails, it is not skipped."""
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    home = Path(tempfile.mkdtemp(prefix="prefork-nobody-"))
    home.chmod(0o755)
    shutil.copytree(ROOT / "prefork", home / "prefork", ignore=shutil.ignore_patterns("*.pyc"))
    try:
        chosen = Interpreter(sys.executable, str(home))
        if not _runs_prefork_as_nobody(chosen):
            chosen = _debian_venv(home)
        yield chosen
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _debian_venv(home: Path) -> Interpreter:
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None:
        pytest.fail("nobody cannot run this interpreter, and there is no /usr/bin/python3")
    version = subprocess.run(
        [system, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version == str(sys.version_info[:2]):
        # The same Python version: this environment's packages work there, copied where
        # nobody can read them (no download).
        for name in ("click", "psutil", "setproctitle"):
            origin = Path(__import__(name).__file__ or "")
            source = origin.parent if origin.name == "__init__.py" else origin
            copy = shutil.copytree if source.is_dir() else shutil.copy2
            copy(source, home / source.name)
        chosen = Interpreter(system, str(home))
        if _runs_prefork_as_nobody(chosen):
            return chosen
    venv = home / "venv"
    packages = ["click>=8.1", "setproctitle>=1.3", "psutil>=5.9", "tomli>=2; python_version<'3.11'"]
    subprocess.run([system, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *packages],
        check=True,
        timeout=600,
        capture_output=True,
    )
    chosen = Interpreter(str(venv / "bin" / "python"), str(home))
    if not _runs_prefork_as_nobody(chosen):
        pytest.fail(f"nobody cannot run prefork with {system} either")
    return chosen


# -- the CLI in a subprocess ----------------------------------------------------------------
class CliServer:
    """``python -m prefork run ...`` as a user would start it, with its log in a file."""

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        log_path: Path,
        pass_fds: tuple[int, ...],
        env: dict[str, str] | None,
        launcher: list[str] | None = None,
        interpreter: Interpreter = THIS,
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        path = f"{interpreter.path}{os.pathsep}{cwd}"
        full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        self.proc = subprocess.Popen(
            [*(launcher or []), interpreter.python, "-m", "prefork", "run", *args],
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
            env=full_env,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._known_workers: set[int] = set()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def booted(self) -> list[int]:
        """PIDs of workers whose boot the master logged, still running."""
        running = set(self.worker_pids())  # once: the log grows with every respawn
        pids = [int(p) for p in re.findall(r"worker \d+ \(pid (\d+)\) booted", self.log)]
        return [p for p in pids if p in running]

    def worker_pids(self) -> list[int]:
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    pids.append(child.pid)
        self._known_workers.update(pids)
        return sorted(pids)

    def wait_ready(self, workers: int, timeout: float = 10.0) -> list[int]:
        return wait_until(
            lambda: len(self.booted()) == workers and self.booted(),
            timeout,
            message=lambda: f"{workers} workers to boot; log:\n{self.log}",
        )

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Finaliser: stop the master by PID, then any worker it left, by PID."""
        self.worker_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self._known_workers:
            with contextlib.suppress(ProcessLookupError):
                if is_running(pid):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def serve(app_dir: Path) -> Iterator[Callable[..., CliServer]]:
    """Start ``prefork run`` in ``app_dir`` (where apps.py is); stop it at teardown."""
    tmp_path = app_dir
    started: list[CliServer] = []

    def start(
        *args: str,
        listen_on: socket.socket | None = None,
        cwd: Path | None = None,
        pass_fds: tuple[int, ...] = (),
        env: dict[str, str] | None = None,
        launcher: list[str] | None = None,
        interpreter: Interpreter = THIS,
    ) -> CliServer:
        """``listen_on``: a socket the test owns, served as ``--bind fd://N``."""
        if listen_on is not None:
            args = (*args, "-b", f"fd://{listen_on.fileno()}")
            pass_fds = (*pass_fds, listen_on.fileno())
        log_path = tmp_path / f"server{len(started)}.log"
        server = CliServer(
            list(args), cwd or tmp_path, log_path, pass_fds, env, launcher, interpreter
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def run_cli(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 20.0,
    interpreter: Interpreter = THIS,
) -> subprocess.CompletedProcess[str]:
    """Run ``prefork`` to completion (for commands that fail before serving)."""
    path = f"{interpreter.path}{os.pathsep}{cwd}"
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run(
        [interpreter.python, "-m", "prefork", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A directory with small handler modules the CLI tests serve."""
    (tmp_path / "apps.py").write_text(APPS)
    return tmp_path


APPS = '''
import os, socketserver, time

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)

class Pid(socketserver.StreamRequestHandler):
    """Answers every line with the worker's pid."""
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"%d\\n" % os.getpid())

class Slow(socketserver.StreamRequestHandler):
    """Says 'started', sleeps for the number of seconds sent, then says 'done'."""
    def handle(self):
        seconds = float(self.rfile.readline())
        self.wfile.write(b"started\\n"); self.wfile.flush()
        time.sleep(seconds)
        self.wfile.write(b"done\\n")

class HoldPid(socketserver.StreamRequestHandler):
    """Sends the worker's pid at once, then holds the connection until the client closes."""
    def handle(self):
        self.wfile.write(b"%d\\n" % os.getpid()); self.wfile.flush()
        self.rfile.read()

class NoDelay(socketserver.BaseRequestHandler):
    """Reports whether TCP_NODELAY is set on the accepted connection."""
    def handle(self):
        import socket
        self.request.sendall(b"%d\\n" % bool(
            self.request.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))

class Both(socketserver.BaseRequestHandler):
    """Echoes a line on a stream socket, or a datagram on a datagram socket."""
    def handle(self):
        if isinstance(self.request, tuple):
            data, sock = self.request
            sock.sendto(data, self.client_address)
        else:
            line = self.request.makefile("rb").readline()
            if line.startswith(b"env "):  # what a child process of this worker inherits
                import subprocess
                name = line.split()[1].decode()
                line = subprocess.run(["sh", "-c", 'echo "${%s-unset}"' % name],
                                      capture_output=True).stdout
            self.request.sendall(line)

class DatagramEcho(socketserver.DatagramRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.read())

not_a_class = 42
'''
