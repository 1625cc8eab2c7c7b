"""--access-log: one line per connection or datagram, from every worker model."""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest
from conftest import echo_line, run_cli, wait_until

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4} (?P<client>\S+) "
    r"worker (?P<slot>\d+) \((?P<pid>\d+)\) (?P<ms>\d+\.\d{3})ms (?P<outcome>.+)$"
)

FAILING_APP = """
import socketserver
class Fails(socketserver.StreamRequestHandler):
    def handle(self):
        if self.rfile.readline().strip() == b"fail":
            raise ZeroDivisionError("asked to")
        self.wfile.write(b"fine\\n")
"""


def lines_of(path: Path, count: int) -> list[str]:
    """The file's lines once it has ``count`` complete ones (the test waits for that)."""
    return wait_until(
        lambda: (
            path.exists()
            and len(lines := path.read_text().splitlines(keepends=True)) >= count
            and all(line.endswith("\n") for line in lines)
            and [line.rstrip("\n") for line in lines]
        ),
        message=f"{count} lines in {path}",
    )


@pytest.mark.parametrize("worker_class", ["sync", "thread", "fork"])
def test_one_line_per_connection_names_client_worker_duration(
    serve, listener, app_dir: Path, worker_class: str
):
    access = app_dir / "access.log"
    server = serve(
        "apps:Echo", "-w", "2", "-k", worker_class, "--access-log", str(access),
        listen_on=listener,
    )  # fmt: skip
    pids = server.wait_ready(2)
    clients = set()
    for n in range(6):
        with socket.create_connection(listener.getsockname(), timeout=5) as conn:
            clients.add("{}:{}".format(*conn.getsockname()))
            conn.sendall(b"%d\n" % n)
            assert conn.makefile("rb").readline() == b"%d\n" % n
    lines = lines_of(access, 6)
    assert len(lines) == 6, lines
    entries = [LINE.match(line) for line in lines]
    assert all(entries), lines
    assert {e["client"] for e in entries} == clients
    assert {int(e["pid"]) for e in entries} <= set(pids)
    assert {e["slot"] for e in entries} <= {"1", "2"}
    assert {e["outcome"] for e in entries} == {"ok"}
    assert all(float(e["ms"]) < 5000 for e in entries)
    assert server.log.count("Traceback") == 0


def test_a_failing_request_is_logged_as_an_error(serve, listener, app_dir: Path):
    (app_dir / "failing.py").write_text(FAILING_APP)
    access = app_dir / "access.log"
    server = serve("failing:Fails", "-w", "1", "--access-log", str(access), listen_on=listener)
    server.wait_ready(1)
    assert echo_line(listener.getsockname(), b"fail") == b""
    assert echo_line(listener.getsockname(), b"ok") == b"fine"
    first, second = lines_of(access, 2)
    assert first.endswith(" error ZeroDivisionError") and second.endswith(" ok")


def test_datagrams_json_and_usr1_reopen(serve, app_dir: Path):
    access, log = app_dir / "access.log", app_dir / "prefork.log"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = serve(
        "apps:DatagramEcho", "-w", "2", "-b", f"udp://127.0.0.1:{port}",
        "--access-log", str(access), "--log-format", "json",
        "--log-file", str(log), "--log-level", "debug",
    )  # fmt: skip
    wait_until(
        lambda: log.exists() and log.read_text().count(") booted") == 2,
        message=lambda: f"2 workers booted; stderr:\n{server.log}",
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.connect(("127.0.0.1", port))
        ours = f"127.0.0.1:{client.getsockname()[1]}"
        client.send(b"one")
        assert client.recv(100) == b"one"
        (before,) = lines_of(access, 1)
        access.rename(app_dir / "access.log.1")  # logrotate moves it, then signals
        server.signal(signal.SIGUSR1)
        wait_until(  # each worker reopens the access log, then the log file
            lambda: log.read_text().count("reopened its log file") == 2,
            message="both workers to reopen their logs",
        )
        client.send(b"two")
        assert client.recv(100) == b"two"
        (after,) = lines_of(access, 1)
    for line in (before, after):
        entry = json.loads(line)
        assert entry["client"] == ours
        assert entry["outcome"] == "ok" and entry["worker"] in (1, 2)
        assert entry["duration"] >= 0 and entry["time"] > 0
    assert (app_dir / "access.log.1").read_text().count("\n") == 1


def test_unwritable_access_log_is_one_line(app_dir: Path):
    result = run_cli("run", "apps:Echo", "--access-log", "/nonexistent/dir/a.log", cwd=app_dir)
    assert result.returncode == 2
    assert result.stderr == (
        "Error: cannot open access log /nonexistent/dir/a.log: No such file or directory\n"
    )
