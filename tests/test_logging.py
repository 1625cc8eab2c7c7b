"""Logging: a log file reopened on USR1 (logrotate), slot tags, JSON lines."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from conftest import echo_line, run_cli, wait_until


def test_usr1_reopens_the_log_file_in_master_and_workers(serve, listener, app_dir: Path):
    log_file = app_dir / "app.log"
    server = serve(
        "apps:Echo",
        "-w",
        "2",
        "--log-file",
        str(log_file),
        "--log-level",
        "debug",
        listen_on=listener,
    )
    wait_until(
        lambda: log_file.exists() and log_file.read_text().count(") booted") == 2,
        message=lambda: f"2 workers booted; stderr:\n{server.log}",
    )
    assert echo_line(listener.getsockname()) == b"ping"
    first = log_file.read_text()
    assert "[master] [INFO] prefork 0.1.0 master" in first
    log_file.rename(app_dir / "app.log.1")  # what logrotate does before it signals
    server.signal(signal.SIGUSR1)

    def reopened() -> str:
        text = log_file.read_text() if log_file.exists() else ""
        return text if text.count("reopened its log file") == 2 else ""

    text = wait_until(reopened, message=lambda: f"workers to reopen; stderr:\n{server.log}")
    assert "[master] [INFO] reopened the log file; asking 2 workers to do the same" in text
    assert "[worker 1] [DEBUG] worker 1" in text and "[worker 2] [DEBUG] worker 2" in text
    moved = (app_dir / "app.log.1").read_text()
    assert ") booted" in moved and "reopened" not in moved  # nothing went to the old file
    assert server.log == ""  # and nothing to stderr
    assert echo_line(listener.getsockname()) == b"ping"


def test_json_log_format(serve, listener):
    server = serve("apps:Echo", "-w", "1", "--log-format", "json", listen_on=listener)
    wait_until(lambda: "booted" in server.log)
    text = server.log
    complete = text[: text.rfind("\n") + 1]  # the server may be writing its next line now
    entries = [json.loads(line) for line in complete.splitlines()]
    assert {"time", "level", "pid", "slot", "logger", "message"} <= set(entries[0])
    assert entries[0]["slot"] == "master" and entries[0]["pid"] == server.pid
    assert any(e["message"].endswith("booted") for e in entries)


def test_unwritable_log_file_is_one_line(app_dir: Path):
    result = run_cli("run", "apps:Echo", "--log-file", "/no/such/dir/app.log", cwd=app_dir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: cannot open log file /no/such/dir/app.log: No such file or directory"
    ]
