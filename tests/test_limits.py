"""Values that must not take the service down: from the command line, the environment
and the config file, at start (one line, exit 2), on HUP and on USR2 (nothing changes,
one line in the log), and values that are legal however large they are."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
from conftest import echo_line, run_cli, wait_until


def assert_one_line(result, *fragments: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


BAD_VALUES = [
    # (option, value, config-file text, what the line says)
    ("--timeout", "inf", "timeout = inf", "worker_timeout must be a finite number"),
    ("--timeout", "nan", "timeout = nan", "worker_timeout must be a finite number"),
    ("--graceful-timeout", "-inf", "graceful_timeout = -inf", "must be a finite number"),
    ("--boot-timeout", "1e10", "boot_timeout = 1e10", "boot_timeout must be at most"),
    # below the master's half-second look, every healthy worker was killed, in a loop
    ("--timeout", "0.05", "timeout = 0.05", "worker_timeout must be 0 (off) or at least 1"),
    ("--boot-timeout", "0.2", "boot_timeout = 0.2", "boot_timeout must be 0 (off) or at"),
    ("--client-timeout", "nan", "client_timeout = nan", "client_timeout must be a finite"),
    ("--backlog", "99999999999", "backlog = 99999999999", "backlog must be at most 2,147,483"),
    ("--workers", "100000", "workers = 100000", "workers must be at most 1,024"),
    ("--threads", "1000000", "threads = 1000000", "threads must be at most 10,000"),
    ("--defer-accept", "-1", "defer_accept = -1", "defer_accept must be at least 0"),
    ("--max-requests", "1" + "0" * 20, "max_requests = 1" + "0" * 18, "max_requests must be"),
]  # fmt: skip


@pytest.mark.parametrize(("option", "value", "toml", "says"), BAD_VALUES)
def test_a_bad_value_is_one_line_from_each_source(
    app_dir: Path, option: str, value: str, toml: str, says: str
):
    base = ("run", "apps:Echo", "-b", "127.0.0.1:0")
    assert_one_line(run_cli(*base, option, value, cwd=app_dir), says)
    variable = "PREFORK_" + option[2:].upper().replace("-", "_")
    assert_one_line(run_cli(*base, cwd=app_dir, env={variable: value}), says)
    (app_dir / "bad.toml").write_text(toml + "\n")
    assert_one_line(run_cli(*base, "--config", "bad.toml", cwd=app_dir), "bad.toml", says)


def test_text_that_is_not_utf8_is_one_line(app_dir: Path):
    base = ("run", "apps:Echo", "-b", "127.0.0.1:0")
    assert_one_line(run_cli("run", "apps:\udcff", cwd=app_dir), "not valid UTF-8")
    assert_one_line(run_cli(*base, "--name", "x\udcffy", cwd=app_dir), "not valid UTF-8")
    assert_one_line(run_cli(*base, "-b", "unix:/tmp/\udcff.sock", cwd=app_dir), "not valid UTF-8")
    (app_dir / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    assert_one_line(run_cli(*base, "--config", "latin1.toml", cwd=app_dir), "not valid UTF-8")
    (app_dir / "pyproject.toml").write_bytes(b'[tool.prefork]\nname = "\xff"\n')
    assert_one_line(run_cli(*base, cwd=app_dir), "pyproject.toml", "not valid UTF-8")


def test_a_config_file_nested_too_deep_or_not_a_file_is_one_line(app_dir: Path):
    (app_dir / "deep.toml").write_text("bind = " + "[" * 5000 + "]" * 5000 + "\n")
    base = ("run", "apps:Echo", "-b", "127.0.0.1:0", "--config")
    assert_one_line(run_cli(*base, "deep.toml", cwd=app_dir), "deep.toml")
    assert_one_line(run_cli(*base, "/dev/zero", cwd=app_dir), "/dev/zero")
    (app_dir / "fifo").unlink(missing_ok=True)
    import os

    os.mkfifo(app_dir / "fifo")  # opening it for reading would wait for a writer for ever
    assert_one_line(run_cli(*base, "fifo", cwd=app_dir), "not a regular file")


def test_abstract_sockets_take_no_mode_and_need_a_name(serve, app_dir: Path):
    server = serve("apps:Echo", "-w", "1", "-b", "unix:@prefork-test-mode", "--socket-mode", "660")
    server.wait_ready(1)
    line = next(x for x in server.log.splitlines() if "--socket-mode" in x)
    assert "[WARNING]" in line and "does not apply to unix:@prefork-test-mode" in line
    result = run_cli("run", "apps:Echo", "-b", "unix:@", cwd=app_dir)
    assert_one_line(result, "name after @ is empty")


def test_timeouts_of_a_month_work_and_a_graceful_stop_still_finishes(serve, listener):
    """30 days is a plausible "never": select() cannot take it, the loop sleeps towards it."""
    server = serve(
        "apps:Slow", "-w", "1", "--timeout", "2592000", "--graceful-timeout", "2592000",
        "--boot-timeout", "2592000", "--client-timeout", "2592000", listen_on=listener,
    )  # fmt: skip
    server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=10) as conn:
        conn.sendall(b"1\n")
        assert conn.recv(8) == b"started\n"
        server.signal(signal.SIGTERM)  # a request in flight: it must finish, not be killed
        assert conn.makefile("rb").readline() == b"done\n"
    assert server.wait_exit(10) == 0
    assert "Traceback" not in server.log


def test_a_hup_to_a_huge_timeout_completes_and_the_master_lives(serve, listener, app_dir: Path):
    config = app_dir / "prefork.toml"
    config.write_text("timeout = 30\n")
    server = serve("apps:Echo", "-w", "1", "--config", str(config), listen_on=listener)
    server.wait_ready(1)
    config.write_text("timeout = 3000000\n")
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload complete: generation 2" in server.log, 15)
    server.signal(signal.SIGUSR1)  # a turn of the loop with the new deadlines
    assert echo_line(listener.getsockname()) == b"ping"
    assert server.proc.poll() is None and "Traceback" not in server.log


@pytest.mark.parametrize(
    "toml", ["timeout = nan", "timeout = 0.05", "workers = 100000", "backlog = -1", "name = 1"]
)
def test_a_bad_value_on_hup_or_usr2_changes_nothing(serve, listener, app_dir: Path, toml: str):
    config = app_dir / "prefork.toml"
    config.write_text("workers = 1\n")
    server = serve("apps:Pid", "--config", str(config), listen_on=listener)
    before = server.wait_ready(1)
    config.write_text(toml + "\n")
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload abandoned" in server.log, 10, message=lambda: server.log)
    server.signal(signal.SIGUSR2)
    wait_until(lambda: "upgrade abandoned" in server.log, 10, message=lambda: server.log)
    for word in ("reload abandoned", "upgrade abandoned"):
        line = next(x for x in server.log.splitlines() if word in x)
        assert "prefork.toml" in line
    assert server.booted() == before  # the same worker, the same master
    assert int(echo_line(listener.getsockname())) == before[0]
    assert "Traceback" not in server.log


def test_many_workers_start_in_batches_and_a_term_is_heard_meanwhile(serve, listener):
    server = serve("apps:Echo", "-w", "300", "--boot-timeout", "60", listen_on=listener)
    wait_until(lambda: len(server.worker_pids()) >= 20, 30)
    server.signal(signal.SIGTERM)  # in the middle of forking 300
    assert server.wait_exit(30) == 0
    assert len(server.booted()) == 0


def test_check_config_checks_everything_and_changes_nothing(app_dir: Path, listener):
    log_file = app_dir / "never.log"
    result = run_cli(
        "run", "apps:Echo", "-b", "127.0.0.1:1", "--log-file", str(log_file), "--check-config",
        cwd=app_dir,
    )  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not log_file.exists()  # nothing made, nothing bound (port 1 would need root)
    for bad, says in [
        (("--server-class", "nosuch:X"), "cannot import 'nosuch'"),
        (("--chdir", "/nonexistent"), "cannot change to directory /nonexistent"),
        (("--user", "no-such-user-here"), "unknown user"),
        (("-b", "unix:@"), "name after @ is empty"),
    ]:
        check = run_cli("run", "apps:Echo", *bad, "--check-config", cwd=app_dir)
        assert_one_line(check, says)
    assert_one_line(run_cli("run", "apps:Nope", "--check-config", cwd=app_dir), "no object")


@pytest.mark.parametrize(
    "toml", ['server_class = "nosuch:X"', 'chdir = "/nonexistent"', 'user = "no-such-user-x"']
)
def test_a_usr2_whose_new_start_would_fail_changes_nothing(
    serve, listener, app_dir: Path, toml: str
):
    """A HUP keeps what it cannot apply for the next USR2 or restart; that USR2 runs the
    new start's --check-config first and, refused, leaves the master as it was."""
    config = app_dir / "prefork.toml"
    config.write_text("workers = 1\n")
    server = serve("apps:Pid", "--config", str(config), listen_on=listener)
    before = server.wait_ready(1)
    config.write_text(toml + "\n")
    server.signal(signal.SIGUSR2)
    wait_until(lambda: "upgrade abandoned" in server.log, 20, message=lambda: server.log)
    assert server.proc.poll() is None and server.booted() == before
    assert int(echo_line(listener.getsockname())) == before[0]
