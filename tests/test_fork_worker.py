"""The fork worker's contract, with real processes: it never waits for a child, so at its
``--max-children`` it keeps its heartbeat, kills only the slow child at --timeout, drains,
and dies with its master; its connection children run nothing to find libc."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import socketserver
import time
from pathlib import Path

import psutil
import pytest
from conftest import SERVER_FIRST, is_running, run_cli, wait_until

import prefork
from prefork.errors import ConfigError

APP = r'''
import ctypes, os, resource, socketserver

class ChildUsage(socketserver.StreamRequestHandler):
    """The largest RSS, in KiB, of the processes this connection child has waited for:
    a forked process starts with none, so 0 unless something (ldconfig) ran in it."""
    def handle(self):
        self.rfile.readline()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.wfile.write(b"%d %d\n" % (os.getpid(), usage.ru_maxrss))

class MasterPipeOnly:
    """Takes back the kernel's PR_SET_PDEATHSIG in the worker, so that the master's death
    reaches it only through its pipe, which its loop watches."""
    def post_fork(self, worker):
        ctypes.CDLL(None, use_errno=True).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG, 0
        super().post_fork(worker)
'''


@pytest.fixture
def forks(app_dir: Path) -> Path:
    (app_dir / "forkapps.py").write_text(APP)
    return app_dir


def status(server, cwd: Path) -> dict:
    """The one worker's record in ``prefork status --json``."""
    result = run_cli("status", "--json", str(server.pid), cwd=cwd)
    assert result.returncode == 0, result.stderr
    (worker,) = json.loads(result.stdout)["workers"]
    return worker


def readable(conn: socket.socket) -> bool:
    return bool(select.select([conn], [], [], 0)[0])


def start_slow(address, seconds: float = 60) -> socket.socket:
    """A connection whose connection child is in apps:Slow's sleep when this returns."""
    conn = socket.create_connection(address, timeout=10)
    conn.sendall(b"%g\n" % seconds)
    assert conn.recv(8) == b"started\n"
    return conn


def no_answer_within(conn: socket.socket, seconds: float) -> bool:
    """Nothing arrives on ``conn`` for ``seconds``: the connection is queued, not served."""
    return not select.select([conn], [], [], seconds)[0]


def test_at_its_cap_a_fork_worker_beats_and_kills_only_the_slow_child(serve, listener, forks):
    """At max_children the worker waited in socketserver's collect_children
    (waitpid(-1, 0)): no heartbeat, so the master killed it, and every connection, at
    --timeout."""
    server = serve(
        "apps:Slow", "-w", "1", "-k", "fork", "--max-children", "1", "--timeout", "2",
        listen_on=listener,
    )  # fmt: skip
    (worker,) = server.wait_ready(1)
    address = listener.getsockname()
    slow = start_slow(address)
    started = time.monotonic()
    with slow, socket.create_connection(address, timeout=10) as queued:
        queued.sendall(b"0\n")
        ages = []  # (seconds into the slow request, the worker's heartbeat age)
        while time.monotonic() - started < 10:
            record = status(server, forks)
            # In this order: the queued connection is served only after the slow one ends.
            assert not readable(queued) or readable(slow)  # at the cap: the next one waits
            if readable(slow):
                break  # the child was killed meanwhile: this reading may be from after
            assert record["pid"] == worker and record["active"] == 1
            ages.append((time.monotonic() - started, record["heartbeat_age"]))
        killed_after = time.monotonic() - started
        assert slow.recv(8) == b""  # its child was killed: this connection only
        assert 1.5 < killed_after < 5, ages
        assert [t for t, _ in ages if t > 1.5], ages  # looked at well into the slow request
        assert all(age < 1.0 for _, age in ages), ages
        assert queued.makefile("rb").read() == b"started\ndone\n"  # served once a child is free
    assert server.booted() == [worker]
    assert "connection child (pid" in server.log and "over --timeout 2; killing it" in server.log
    assert "timed out" not in server.log and "killed by" not in server.log


def test_a_draining_fork_worker_at_its_cap_kills_the_slow_child_and_exits(serve, listener, forks):
    """TERM at the cap: the worker, waiting in collect_children, neither killed the slow
    child at --timeout nor stopped; the master killed it at --graceful-timeout."""
    server = serve(
        "apps:Slow", "-w", "1", "-k", "fork", "--max-children", "1", "--timeout", "2",
        "--graceful-timeout", "30", listen_on=listener,
    )  # fmt: skip
    (worker,) = server.wait_ready(1)
    with start_slow(listener.getsockname()) as slow:
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in server.log, 5, message=lambda: server.log)
        assert slow.recv(8) == b""  # killed at --timeout, during the drain
        assert time.monotonic() - started < 5
    assert server.wait_exit(10) == 0
    assert "over --timeout 2; killing it" in server.log
    assert f"worker 1 (pid {worker}) exited with status 0" in server.log
    assert "did not stop in time" not in server.log


def test_a_fork_worker_at_its_cap_sees_its_master_die_through_the_pipe(serve, listener, forks):
    """With the kernel's death signal taken away, only the worker's loop can notice the
    master's death: waiting in collect_children at the cap, it never read the pipe's EOF
    and lived on with its child."""
    server = serve(
        "apps:Slow", "-w", "1", "-k", "fork", "--max-children", "1",
        "--server-class", "forkapps:MasterPipeOnly", listen_on=listener,
    )  # fmt: skip
    (worker,) = server.wait_ready(1)
    with start_slow(listener.getsockname()) as slow:
        (child,) = [p.pid for p in psutil.Process(worker).children()]
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(5)
        wait_until(lambda: not is_running(worker) and not is_running(child), 3)
        assert slow.recv(8) == b""


@pytest.mark.parametrize(
    ("args", "env"),
    [(("--max-children", "2"), {}), ((), {"PREFORK_MAX_CHILDREN": "2"})],
    ids=["flag", "environment"],
)
def test_max_children_sets_how_many_connections_a_fork_worker_serves_at_once(
    serve, listener, forks, args, env
):
    server = serve(
        "apps:HoldPid", "-w", "1", "-k", "fork", *SERVER_FIRST, *args, listen_on=listener,
        env=env,
    )  # fmt: skip
    (worker,) = server.wait_ready(1)
    address = listener.getsockname()
    held = [socket.create_connection(address, timeout=10) for _ in range(2)]
    try:
        children = {int(conn.makefile("rb").readline()) for conn in held}
        assert len(children) == 2 and worker not in children  # two children at once
        with socket.create_connection(address, timeout=10) as third:
            assert no_answer_within(third, 1.0)  # the cap: it waits in the queue
            assert status(server, forks)["active"] == 2
            held.pop().close()  # a child finishes: the worker accepts again
            assert int(third.makefile("rb").readline()) not in (0, worker)
    finally:
        for conn in held:
            conn.close()


def test_a_hup_applies_a_new_max_children(serve, listener, forks):
    config = forks / "prefork.toml"
    config.write_text("max_children = 1\n")
    server = serve(
        "apps:HoldPid", "-w", "1", "-k", "fork", "--config", str(config), *SERVER_FIRST,
        listen_on=listener,
    )  # fmt: skip
    (old,) = server.wait_ready(1)
    address = listener.getsockname()
    with socket.create_connection(address, timeout=10) as first:
        first.makefile("rb").readline()
        with socket.create_connection(address, timeout=10) as second:
            assert no_answer_within(second, 1.0)  # one at a time
    config.write_text("max_children = 2\n")
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload complete" in server.log, 20, message=lambda: server.log)
    wait_until(lambda: not is_running(old), 10, message="the old worker to stop")
    (new,) = server.worker_pids()
    with (
        socket.create_connection(address, timeout=10) as first,
        socket.create_connection(address, timeout=10) as second,
    ):
        children = {int(c.makefile("rb").readline()) for c in (first, second)}
        assert len(children) == 2  # two at once, both the new generation's worker's
        assert {psutil.Process(pid).ppid() for pid in children} == {new}


def test_max_children_must_be_at_least_one(forks) -> None:
    result = run_cli("run", "apps:Echo", "-k", "fork", "--max-children", "0", cwd=forks)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["Error: max_children must be at least 1, got 0"]
    with pytest.raises(ConfigError, match="max_children must be at least 1, got 0"):
        prefork.PreForkForkingTCPServer(("127.0.0.1", 0), None, max_children=0)


def test_max_children_defaults_to_forking_mixins() -> None:
    assert prefork.Config().max_children == socketserver.ForkingMixIn.max_children == 40


class FiveChildren(socketserver.ForkingMixIn, socketserver.TCPServer):
    max_children = 5  # a socketserver server as written without prefork


@pytest.mark.parametrize(
    ("bases", "settings", "expected"),
    [
        ((prefork.PreForkMixIn, FiveChildren), {}, 5),  # later in the bases: not shadowed
        ((prefork.PreForkMixIn, FiveChildren), {"max_children": 2}, 2),
        ((prefork.PreForkForkingTCPServer,), {}, 40),
        ((prefork.PreForkTCPServer,), {}, 40),  # no ForkingMixIn: the default, unused
    ],
)
def test_the_library_takes_max_children_as_forking_mixin_does(bases, settings, expected):
    server_class = type("Server", bases, {})
    handler = socketserver.BaseRequestHandler
    with server_class(("127.0.0.1", 0), handler, **settings) as server:
        assert server.prefork_config.max_children == expected


def test_a_connection_child_runs_nothing_to_find_libc(serve, listener, forks):
    """Every connection child called ctypes.util.find_library, which runs /sbin/ldconfig
    (5-20 ms): libc is opened once, by the worker, and inherited."""
    server = serve("forkapps:ChildUsage", "-w", "1", "-k", "fork", listen_on=listener)
    (worker,) = server.wait_ready(1)
    for _ in range(5):
        with socket.create_connection(listener.getsockname(), timeout=10) as conn:
            conn.sendall(b"go\n")
            pid, waited_rss = map(int, conn.makefile("rb").readline().split())
        assert pid != worker  # served by a connection child
        assert waited_rss == 0  # it waited for no process: it ran none
