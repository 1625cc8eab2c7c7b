"""--user/--group/--umask/--socket-mode: bind as root, serve as nobody.

These run as root (as the test machines do), with an interpreter and a copy of prefork
that nobody can read (the ``as_nobody`` fixture); as root they never skip.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import DROP_TO_NOBODY, Interpreter, run_cli, wait_until

NOBODY = 65534

WHO_APP = """
import os, socketserver
class WhoAmI(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        groups = ",".join(str(g) for g in sorted(os.getgroups()))
        self.wfile.write(f"{os.getuid()} {os.geteuid()} {os.getgid()} {groups}\\n".encode())
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory nobody can read (pytest's tmp_path is root's alone), with the app."""
    path = Path(tempfile.mkdtemp(prefix="prefork-priv-"))
    path.chmod(0o755)
    (path / "who.py").write_text(WHO_APP)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def free_port(ports: range) -> int:
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip(f"no free port in {ports}")


def ask(address: object) -> list[str]:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as conn:
        conn.settimeout(5)
        conn.connect(address)
        conn.sendall(b"who\n")
        return conn.makefile().readline().split()


def test_workers_serve_a_privileged_port_as_nobody_while_the_master_keeps_root(
    serve, open_dir: Path, as_nobody: Interpreter
):
    port = free_port(range(800, 1000))  # below 1024: only root may bind it
    server = serve(
        "who:WhoAmI", "-w", "2", "-b", f"127.0.0.1:{port}", "--user", "nobody",
        cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    pids = server.wait_ready(2)
    uid, euid, gid, groups = ask(("127.0.0.1", port))
    assert (int(uid), int(euid), int(gid), groups) == (NOBODY, NOBODY, NOBODY, str(NOBODY))
    assert psutil.Process(server.pid).uids().real == 0
    assert {psutil.Process(pid).uids().effective for pid in pids} == {NOBODY}
    # A reload's workers switch too; status (as root) still reads the master.
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload complete: generation 2" in server.log, timeout=20)
    assert ask(("127.0.0.1", port))[0] == str(NOBODY)
    status = run_cli("status", str(server.pid), cwd=open_dir, interpreter=as_nobody)
    assert status.returncode == 0 and f"master {server.pid}" in status.stdout


def test_unix_socket_mode_owner_and_umask(serve, open_dir: Path, as_nobody: Interpreter):
    sock, log, access = open_dir / "app.sock", open_dir / "prefork.log", open_dir / "access.log"
    server = serve(
        "who:WhoAmI", "-w", "1", "-b", f"unix:{sock}",
        "--user", "nobody", "--group", "nogroup", "--socket-mode", "660", "--umask", "027",
        "--log-file", str(log), "--access-log", str(access),
        cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    wait_until(lambda: log.exists() and ") booted" in log.read_text(), message=lambda: server.log)
    assert ask(str(sock))[0] == str(NOBODY)
    info = sock.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(log.stat().st_mode) == 0o640  # created by the master under umask 027
    assert log.stat().st_uid == NOBODY and access.stat().st_uid == NOBODY
    wait_until(lambda: access.read_text().count(" ok\n") == 1, message="the access line")


def test_a_worker_that_cannot_switch_never_serves(open_dir: Path, as_nobody: Interpreter):
    """Started as nobody and told to run workers as root: the switch fails; nothing
    serves, one line says why, nothing is left behind."""
    port = free_port(range(20000, 20100))
    for preload in ([], ["--preload"]):  # the import check, then the worker itself
        result = subprocess.run(
            [*DROP_TO_NOBODY, as_nobody.python, "-m", "prefork", "run", "who:WhoAmI",
             "-b", f"127.0.0.1:{port}", "-w", "1", "--user", "root", *preload],
            cwd=open_dir,
            env={**os.environ, "PYTHONPATH": f"{as_nobody.path}{os.pathsep}{open_dir}"},
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert "cannot switch to user root (uid 0, gid 0): Operation not permitted" in last
        assert "Traceback" not in result.stderr
