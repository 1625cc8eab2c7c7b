"""The servers compared, how to start each on 127.0.0.1, and how to stop it by PID."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.frameworks import FRAMEWORKS

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
# Servers run as deployed: bytecode cached (some shells set PYTHONDONTWRITEBYTECODE,
# which would make every worker compile the app from source).
SERVER_ENV = {"PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": ""}
STOP_TIMEOUT = 15.0

NGINX_CONF = """
worker_processes {workers};
daemon off;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    fastcgi_temp_path {dir};
    uwsgi_temp_path {dir};
    scgi_temp_path {dir};
    server {{
        listen 127.0.0.1:{port} backlog=2048;
        location / {{
            default_type text/plain;
            return 200 "Hello, world!\\n";
        }}
    }}
}}
"""


@dataclass(frozen=True)
class Server:
    """One server configuration. ``kind``: prefork, floor, stdlib, gunicorn, nginx."""

    name: str
    kind: str
    handler: str  # hello, bare, echo, crunch; or a framework's hello app: flask, django, bottle
    workers: int = 1
    option: str = ""  # prefork/gunicorn worker class; stdlib threading/forking
    extra: tuple[str, ...] = field(default_factory=tuple)

    def command(self, port: int, workdir: Path) -> list[str]:
        python = sys.executable
        if self.kind == "prefork":
            return [
                python, "-m", "prefork", "run", self.app(),
                "-b", f"127.0.0.1:{port}", "-w", str(self.workers), "-k", self.option,
                "--log-level", "warning", *self.extra,
            ]  # fmt: skip
        if self.kind == "floor":
            return [python, "-m", "benchmarks.floor", self.handler, str(port), str(self.workers)]
        if self.kind == "stdlib":
            return [python, "-m", "benchmarks.stdlib_server", self.option, self.handler, str(port)]
        if self.kind == "gunicorn":
            threads = ["--threads", "16"] if self.option == "gthread" else []
            return [
                python, "-m", "gunicorn", self.app(), "-b", f"127.0.0.1:{port}",
                "-w", str(self.workers), "-k", self.option, *threads, "--backlog", "2048",
                "--log-level", "warning",
            ]  # fmt: skip
        if self.kind == "nginx":
            conf = workdir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(workers=self.workers, dir=workdir, port=port))
            return ["nginx", "-c", str(conf), "-p", str(workdir)]
        raise ValueError(self.kind)

    def app(self) -> str:
        """The MODULE:OBJECT served. A framework's is its WSGI app, for either server; else
        gunicorn's is wsgi_app.py's, prefork's bare_app.py's (imports nothing) for "bare"
        and apps.py's handler class for the others."""
        if self.handler in FRAMEWORKS:
            return f"benchmarks.frameworks.{self.handler}_app:app"
        if self.kind == "gunicorn":
            return "benchmarks.wsgi_app:app"
        if self.handler == "bare":
            return "benchmarks.bare_app:Hello"
        return f"benchmarks.apps:{self.handler.title()}"

    @property
    def speaks_http(self) -> bool:
        return self.handler not in ("echo", "crunch")

    def missing(self) -> str | None:
        """Why this server cannot run here, with how to fix it; None if it can. The
        framework first: a scenario whose framework is missing gives every server the
        same reason."""
        if self.handler in FRAMEWORKS and not _importable(self.handler):
            return f'{self.handler} is not installed: pip install -e ".[bench]"'
        if self.kind == "gunicorn" and not _importable("gunicorn"):
            return 'gunicorn is not installed: pip install -e ".[bench]"'
        if self.kind == "nginx" and not shutil.which("nginx"):
            return "nginx is not installed: apt-get install nginx-light (or nginx)"
        return None


@functools.cache  # asked once per server of every scenario; a probe costs an interpreter
def _importable(module: str) -> bool:
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return probe.returncode == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(server: Server, port: int) -> bool:
    """One request of the server's protocol gets a full answer."""
    http = server.speaks_http
    request = b"GET / HTTP/1.0\r\n\r\n" if http else b"ready\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(request)
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
                if not http and data.endswith(b"\n"):
                    break
    except OSError:
        return False
    return data.startswith(b"HTTP/1.") or data == request


class ServerDidNotStart(RuntimeError):
    """The server exited, or did not answer within START_TIMEOUT; ``why``: the last line
    of its log (the whole tail is in the message)."""

    def __init__(self, server: Server, log_tail: str, exited: bool) -> None:
        lines = [line for line in log_tail.splitlines() if line.strip()]
        how = "exited" if exited else f"did not answer within {START_TIMEOUT:g} s"
        self.why = f"{how}: {lines[-1].strip()}" if lines else how
        super().__init__(f"{server.name} did not start ({how}): {log_tail}")


@dataclass
class Running:
    server: Server
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    started_at: float  # perf_counter at Popen
    ready_after: float  # seconds from Popen to the first full answer

    @property
    def pid(self) -> int:
        return self.process.pid

    def workers(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.pid).children()]
        except psutil.Error:
            return []


@contextlib.contextmanager
def running(server: Server, env: dict[str, str] | None = None) -> Iterator[Running]:
    """Start ``server``, wait until it answers, yield; then stop it and everything it
    started, by PID."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="prefork-bench-") as tmp:
        workdir = Path(tmp)
        log = workdir / "server.log"
        with open(log, "wb") as log_file:
            started = time.perf_counter()
            process = subprocess.Popen(
                server.command(port, workdir),
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **SERVER_ENV, **(env or {})},
                start_new_session=True,
            )
        try:
            deadline = started + START_TIMEOUT
            while not answers(server, port):
                exited = process.poll() is not None
                if exited or time.perf_counter() > deadline:
                    tail = log.read_text(errors="replace")[-500:]
                    raise ServerDidNotStart(server, tail, exited)
                time.sleep(0.01)
            ready = time.perf_counter() - started
            yield Running(server, port, process, log, started, ready)
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """TERM the server, wait; then SIGKILL what is left of it and of its children."""
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        family = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    for child in family:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(family, timeout=5)
