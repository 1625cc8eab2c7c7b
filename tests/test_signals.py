"""The master's signals, driven through the CLI as an operator would: real processes."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest
from conftest import can_connect, echo_line, is_running, wait_until


def slow_request(address: object, seconds: float) -> socket.socket:
    """Start a request on apps:Slow and return once the handler has begun it."""
    conn = socket.socket(socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX)
    conn.settimeout(30)
    conn.connect(address)
    conn.sendall(b"%f\n" % seconds)
    assert conn.recv(8) == b"started\n"
    return conn


def test_serves_every_bind_then_term_exits_0_and_cleans_up(serve, listener, app_dir: Path):
    sock_path = app_dir / "app.sock"
    server = serve(
        "apps:Echo", "-w", "2", "-b", f"unix:{sock_path}", "--pid", "app.pid", listen_on=listener
    )
    workers = server.wait_ready(2)
    assert (app_dir / "app.pid").read_text() == f"{server.pid}\n"
    assert echo_line(listener.getsockname(), b"tcp") == b"tcp"
    assert echo_line(str(sock_path), b"unix") == b"unix"
    assert psutil.Process(server.pid).cmdline()[0] == "prefork: master [apps:Echo]"
    titles = sorted(psutil.Process(pid).cmdline()[0] for pid in workers)
    assert titles == ["prefork: worker 1 [apps:Echo]", "prefork: worker 2 [apps:Echo]"]
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not (app_dir / "app.pid").exists()
    assert not sock_path.exists()
    assert "prefork 0.1.0 master" in server.log and "exited with status 0" in server.log


def test_term_right_after_the_port_accepts_is_honoured(serve, app_dir: Path):
    # Handlers are installed before bind: a TERM the moment the socket accepts is a
    # graceful stop (exit 0), never the default action that would kill the master.
    sock_path = app_dir / "fresh.sock"
    server = serve("apps:Echo", "-w", "1", "-b", f"unix:{sock_path}")
    wait_until(lambda: sock_path.exists() and can_connect(str(sock_path)), interval=0.001)
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0


def test_sigkilled_worker_is_replaced_within_a_second_with_no_zombie(serve, listener):
    server = serve("apps:Pid", "-w", "2", listen_on=listener)
    before = server.wait_ready(2)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    def replaced() -> set[int]:
        booted = set(server.booted())  # one snapshot: the victim may be dying right now
        return booted - set(before) if len(booted) == 2 and victim not in booted else set()

    replacement = wait_until(
        replaced, timeout=1.0, interval=0.002, message="a replacement worker"
    ).pop()
    respawn = time.monotonic() - killed_at
    seen = {int(echo_line(listener.getsockname())) for _ in range(40)}
    assert seen <= set(server.booted())
    zombies = [
        p for p in psutil.Process(server.pid).children() if p.status() == psutil.STATUS_ZOMBIE
    ]
    assert zombies == []
    assert f"(pid {victim}) killed by SIGKILL unexpectedly" in server.log
    assert (
        f"worker 1 (pid {replacement}) booted" in server.log
        or f"worker 2 (pid {replacement}) booted" in server.log
    )
    print(f"respawn after SIGKILL: {respawn * 1000:.1f} ms")


def test_ttin_adds_and_ttou_removes_a_worker_never_below_one(serve, listener):
    server = serve("apps:Echo", "-w", "2", listen_on=listener)
    server.wait_ready(2)
    for signum, expected in [
        (signal.SIGTTIN, 3),
        (signal.SIGTTOU, 2),
        (signal.SIGTTOU, 1),
        (signal.SIGTTOU, 1),
    ]:
        server.signal(signum)
        wait_until(
            lambda n=expected: f"pool size is now {n}" in server.log.split("master got")[-1],
            message=f"pool size {expected}",
        )
        wait_until(lambda n=expected: len(server.worker_pids()) == n, message=f"{expected} workers")
    assert echo_line(listener.getsockname()) == b"ping"
    titles = [psutil.Process(p).cmdline()[0] for p in server.worker_pids()]
    assert titles == ["prefork: worker 1 [apps:Echo]"]  # the highest slots left first


def test_term_drains_an_in_flight_request_and_exits_0(serve, listener):
    server = serve("apps:Slow", "-w", "1", listen_on=listener)
    server.wait_ready(1)
    with slow_request(listener.getsockname(), 1.0) as conn:
        server.signal(signal.SIGTERM)
        assert conn.recv(8) == b"done\n"
    assert server.wait_exit() == 0


def test_graceful_timeout_kills_what_is_left(serve, listener):
    server = serve("apps:Slow", "-w", "1", "--graceful-timeout", "0.5", listen_on=listener)
    server.wait_ready(1)
    with slow_request(listener.getsockname(), 60):
        server.signal(signal.SIGTERM)
        assert server.wait_exit(timeout=10) == 0
    assert "did not stop in time; killing it" in server.log


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_int_and_quit_stop_now(serve, listener, signum: int):
    server = serve("apps:Slow", "-w", "2", listen_on=listener)
    server.wait_ready(2)
    with slow_request(listener.getsockname(), 60):
        server.signal(signum)
        assert server.wait_exit(timeout=5) == 0  # not the 30 s graceful timeout


def test_second_int_during_graceful_stop_makes_it_quick(serve, listener):
    server = serve("apps:Slow", "-w", "1", listen_on=listener)
    server.wait_ready(1)
    with slow_request(listener.getsockname(), 60):
        server.signal(signal.SIGTERM)
        wait_until(lambda: "stopping gracefully" in server.log)
        server.signal(signal.SIGINT)
        assert server.wait_exit(timeout=5) == 0
    assert "stopping now" in server.log


@pytest.mark.parametrize("worker_class", ["sync", "thread", "fork"])
def test_workers_exit_when_the_master_is_killed(serve, listener, worker_class: str):
    server = serve("apps:Slow", "-w", "2", "-k", worker_class, listen_on=listener)
    server.wait_ready(2)
    with slow_request(listener.getsockname(), 60):  # one worker busy, one idle
        family = psutil.Process(server.pid).children(recursive=True)
        assert len(family) >= 2
        server.signal(signal.SIGKILL)
        wait_until(
            lambda: not any(is_running(p.pid) for p in family),
            timeout=1.0,
            message="every worker (and connection child) to exit",
        )
    server.wait_exit()


def test_environment_sets_options_and_the_command_line_wins(serve, listener):
    env = {"PREFORK_WORKERS": "3", "PREFORK_NAME": "from-env"}
    by_env = serve("apps:Echo", env=env, listen_on=listener)
    pids = by_env.wait_ready(3)
    assert psutil.Process(pids[0]).cmdline()[0].endswith("[from-env]")
    by_env.signal(signal.SIGTERM)
    assert by_env.wait_exit() == 0
    by_cli = serve("apps:Echo", "-w", "1", env=env, listen_on=listener)
    by_cli.wait_ready(1)
    wait_until(lambda: "with 1 sync workers" in by_cli.log)


@pytest.mark.parametrize("worker_class", ["sync", "thread"])
def test_term_serves_connections_already_queued_in_the_backlog(
    serve, app_dir: Path, worker_class: str
):
    # The server binds the socket itself: when it exits, anything still queued in the
    # kernel would be reset, so every answer below proves the queue was drained.
    path = app_dir / "drain.sock"
    server = serve(
        "apps:Slow", "-w", "1", "-k", worker_class, "--threads", "1", "-b", f"unix:{path}"
    )
    server.wait_ready(1)
    first = slow_request(str(path), 0.3)  # the worker is busy with this one
    queued: list[socket.socket] = []
    try:
        for _ in range(8):  # these wait in the listen backlog
            queued.append(socket.socket(socket.AF_UNIX))
            queued[-1].settimeout(30)
            queued[-1].connect(str(path))
            queued[-1].sendall(b"0.05\n")
        server.signal(signal.SIGTERM)
        answers = [first.recv(16)]
        for conn in queued:
            try:
                answers.append(conn.makefile("rb").read())
            except ConnectionResetError:
                answers.append(b"reset")
    finally:
        for conn in [first, *queued]:
            conn.close()
    assert answers[0] == b"done\n"
    assert answers[1:] == [b"started\ndone\n"] * 8
    assert server.wait_exit() == 0
