"""The servers compared, how to start each on 127.0.0.1, and how to stop it by PID."""

from __future__ import annotations

import contextlib
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
    handler: str  # hello, echo, crunch
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
                python, "-m", "gunicorn", "benchmarks.wsgi_app:app", "-b", f"127.0.0.1:{port}",
                "-w", str(self.workers), "-k", self.option, *threads, "--backlog", "2048",
                "--log-level", "warning",
            ]  # fmt: skip
        if self.kind == "nginx":
            conf = workdir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(workers=self.workers, dir=workdir, port=port))
            return ["nginx", "-c", str(conf), "-p", str(workdir)]
        raise ValueError(self.kind)

    def app(self) -> str:
        """prefork's MODULE:OBJECT: "bare" is bare_app.py's (imports nothing), else apps.py's."""
        if self.handler == "bare":
            return "benchmarks.bare_app:Hello"
        return f"benchmarks.apps:{self.handler.title()}"

    def missing(self) -> str | None:
        """Why this server cannot run here, with how to fix it; None if it can."""
        if self.kind == "gunicorn" and not _importable("gunicorn"):
            return 'gunicorn is not installed: pip install -e ".[bench]"'
        if self.kind == "nginx" and not shutil.which("nginx"):
            return "nginx is not installed: apt-get install nginx-light (or nginx)"
        return None


def _importable(module: str) -> bool:
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return probe.returncode == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(server: Server, port: int) -> bool:
    """One request of the server's protocol gets a full answer."""
    http = server.handler in ("hello", "bare")
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
                if process.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(
                        f"{server.name} did not start: {log.read_text(errors='replace')[-500:]}"
                    )
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
