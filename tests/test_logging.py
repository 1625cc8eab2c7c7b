"""Logging: a log file reopened on USR1 (logrotate), slot tags, JSON lines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, echo_line, run_cli, wait_until


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


LIBRARY_HOST = """
import logging, os, socketserver, sys
import prefork

if sys.argv[1] == "configured":
    fmt = "host %(name)s: %(message)s"
    logging.basicConfig(filename=sys.argv[2], level=logging.INFO, format=fmt)

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())

server = prefork.PreForkTCPServer(("127.0.0.1", 0), Echo, workers=1)
print(server.server_address[1], flush=True)
server.serve_forever(0.1)
server.server_close()
"""


@pytest.mark.parametrize("host", ["configured", "unconfigured"])
def test_a_library_hosts_logging_gets_preforks_lines(tmp_path: Path, host: str) -> None:
    """The library logged to prefork.* and configured nothing: in a host without a
    logging configuration its info lines were lost (logging's last resort shows
    warnings only); in one with a configuration they go there, in its format."""
    host_log = tmp_path / "host.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", LIBRARY_HOST, host, str(host_log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        wait_until(lambda: echo_line(("127.0.0.1", port), b"hi") == b"hi", timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    booted = re.compile(r"worker 1 \(pid \d+\) booted")
    if host == "configured":
        text = host_log.read_text()
        assert re.search(r"host prefork\.\w+: " + booted.pattern, text), text
        assert not booted.search(stderr), stderr
    else:
        assert booted.search(stderr), stderr
        assert "[master] [INFO]" in stderr, stderr  # prefork run's own format


NOISY = """
import logging, socketserver, sys

class Noisy(socketserver.StreamRequestHandler):
    '''Prints, logs through the app's own logger, and fails on "fail".'''

    def handle(self):
        line = self.rfile.readline().strip().decode()
        print("printed", line)
        logging.getLogger("app").warning("app logged %s", line)
        if line.startswith("fail"):
            raise RuntimeError("handler failed on " + line)
        self.wfile.write(b"ok\\n")
"""


def test_capture_output_sends_prints_and_tracebacks_to_the_log_across_usr1(
    serve, listener, app_dir: Path
) -> None:
    """Prints, the app's last-resort log lines and handle_error's tracebacks went to the
    master's inherited stdout and stderr, never to --log-file, and USR1 reopened nothing
    of them."""
    (app_dir / "noisy.py").write_text(NOISY)
    log_file = app_dir / "app.log"
    server = serve(
        "noisy:Noisy", "-w", "2", "--log-file", str(log_file), "--capture-output",
        "--log-level", "debug", listen_on=listener,
    )  # fmt: skip
    wait_until(lambda: log_file.exists() and log_file.read_text().count("booted") == 2)
    address = listener.getsockname()
    assert echo_line(address, b"one") == b"ok"
    echo_line(address, b"fail-one")
    wait_until(lambda: "handler failed on fail-one" in log_file.read_text())
    text = log_file.read_text()
    assert "printed one" in text and "app logged one" in text and "Traceback" in text
    log_file.rename(app_dir / "app.log.1")  # logrotate moves it, then signals
    server.signal(signal.SIGUSR1)
    # Each worker reopens as it hears of USR1, after the master: wait for both.
    wait_until(lambda: log_file.exists() and log_file.read_text().count("reopened its log") == 2)
    for _ in range(4):  # both workers, whichever answers
        assert echo_line(address, b"two") == b"ok"
    echo_line(address, b"fail-two")
    wait_until(lambda: "handler failed on fail-two" in log_file.read_text())
    text, moved = log_file.read_text(), (app_dir / "app.log.1").read_text()
    assert "printed two" in text and "app logged two" in text
    assert "two" not in moved
    assert "printed" not in server.log and "Traceback" not in server.log  # the old stdio


def test_log_config_configures_the_apps_loggers(serve, listener, app_dir: Path) -> None:
    (app_dir / "noisy.py").write_text(NOISY)
    app_log, log_file = app_dir / "app-only.log", app_dir / "prefork.log"
    (app_dir / "logging.toml").write_text(
        "[formatters.plain]\n"
        'format = "APP %(levelname)s %(message)s"\n'
        "[handlers.file]\n"
        '"class" = "logging.FileHandler"\n'
        f'filename = "{app_log}"\n'
        'formatter = "plain"\n'
        "[loggers.app]\n"
        'handlers = ["file"]\n'
        "propagate = false\n"
    )
    server = serve(
        "noisy:Noisy", "-w", "1", "--log-file", str(log_file), "--log-config", "logging.toml",
        listen_on=listener,
    )  # fmt: skip
    wait_until(lambda: log_file.exists() and "booted" in log_file.read_text())
    assert echo_line(listener.getsockname(), b"three") == b"ok"
    wait_until(lambda: app_log.exists() and "APP WARNING app logged three" in app_log.read_text())
    assert "booted" in log_file.read_text()  # prefork's own loggers were left alone
    # logrotate moves both, then signals: the app's file handlers reopen too (they kept
    # writing to the moved file).
    app_log.rename(app_dir / "app-only.log.1")
    log_file.rename(app_dir / "prefork.log.1")
    server.signal(signal.SIGUSR1)
    wait_until(lambda: log_file.exists() and "reopened the log file" in log_file.read_text())
    assert echo_line(listener.getsockname(), b"four") == b"ok"
    wait_until(lambda: app_log.exists() and "app logged four" in app_log.read_text())
    assert "four" not in (app_dir / "app-only.log.1").read_text()


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("bad.json", "{not json", "not valid JSON"),
        ("list.json", "[1, 2]", "not a JSON object"),
        ("bad.yaml", "version: 1", "must end in .json or .toml"),
        ("nohandler.json", '{"handlers": {"h": {"class": "no.such.Handler"}}}', "no.such"),
    ],
)
def test_a_bad_log_config_is_one_line(app_dir: Path, name: str, content: str, says: str):
    (app_dir / name).write_text(content)
    result = run_cli("run", "apps:Echo", "-b", "127.0.0.1:0", "--log-config", name, cwd=app_dir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert says in lines[0] and "Traceback" not in result.stderr, lines[0]
