"""Zero-downtime: HUP and USR2 under real concurrent load, for TCP, Unix and UDP binds."""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CliServer, wait_until
from load import Load

APP = """
import socketserver, time
VERSION = b"{version}"
time.sleep({boot_sleep})
class Stream(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(VERSION + b"\\n")
class Datagram(socketserver.DatagramRequestHandler):
    def handle(self):
        self.wfile.write(VERSION + b"\\n")
"""
# Bytecode caches are keyed by mtime and size: a module rewritten within the same second
# at the same size could be served stale. The tests write no bytecode at all.
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}


def write_app(app_dir: Path, version: str, boot_sleep: float = 0, broken: bool = False) -> None:
    source = APP.format(version=version, boot_sleep=boot_sleep)
    (app_dir / "versioned.py").write_text(source + ("def broken(:\n" if broken else ""))


@pytest.fixture
def bound(request: pytest.FixtureRequest, app_dir: Path) -> Iterator[tuple[str, list[str], Any]]:
    """(kind, bind arguments, client address) for a socket of each kind; fd:// for TCP/UDP."""
    kind = request.param
    if kind == "unix":
        path = app_dir / "reload.sock"
        yield kind, ["-b", f"unix:{path}"], str(path)
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    if kind == "tcp":
        sock.listen(2048)
    sock.set_inheritable(True)
    request.node.pass_fds = (sock.fileno(),)
    yield kind, ["-b", f"fd://{sock.fileno()}"], sock.getsockname()
    sock.close()


def start(
    serve: Callable[..., CliServer], bound: Any, request: pytest.FixtureRequest, *extra: str
) -> CliServer:
    kind, bind_args, _ = bound
    target = "versioned:Datagram" if kind == "udp" else "versioned:Stream"
    server = serve(
        target,
        "-w",
        "2",
        *bind_args,
        *extra,
        env=NO_PYC,
        pass_fds=getattr(request.node, "pass_fds", ()),
    )
    server.wait_ready(2)
    return server


def reload_and_wait(server: CliServer, signum: int, generation: int) -> None:
    server.signal(signum)
    wait_until(
        lambda: f"reload complete: generation {generation} serving" in server.log,
        timeout=20,
        message=lambda: f"generation {generation}; log:\n{server.log}",
    )


KINDS = pytest.mark.parametrize("bound", ["tcp", "unix", "udp"], indirect=True)


@KINDS
def test_hup_five_times_under_load_replaces_every_worker_with_no_failure(
    serve, bound, request, app_dir: Path
) -> None:
    write_app(app_dir, "v1")
    server = start(serve, bound, request)
    with Load(bound[2], bound[0]) as load:
        load.wait_for_requests(50)
        for generation in range(2, 7):
            before = set(server.booted())
            write_app(app_dir, f"v{generation}")
            reload_and_wait(server, signal.SIGHUP, generation)
            wait_until(
                lambda b=before: b.isdisjoint(server.worker_pids()),
                message="the old generation to exit",
            )
            assert len(server.booted()) == 2
            load.wait_for_requests(50)
    report = load.report
    print(f"\nHUP x5 under load ({bound[0]}): {report.summary()}")
    assert report.failures == []
    assert set(report.answers) <= {b"v%d" % n for n in range(1, 7)}
    assert b"v6" in report.answers
    with Load(bound[2], bound[0], clients=1, max_requests=20) as after:
        after.wait_for_requests(20)
    assert set(after.report.answers) == {b"v6"}  # only the new code answers now


@KINDS
def test_hup_with_a_broken_module_keeps_the_old_code_serving(
    serve, bound, request, app_dir: Path
) -> None:
    write_app(app_dir, "v1")
    server = start(serve, bound, request)
    workers = set(server.booted())
    with Load(bound[2], bound[0]) as load:
        load.wait_for_requests(50)
        write_app(app_dir, "v2", broken=True)
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload abandoned, generation 1 keeps serving" in server.log, timeout=20)
        wait_until(lambda: len(server.worker_pids()) == 2)  # the failed generation is gone
        load.wait_for_requests(100)
        assert set(server.worker_pids()) == workers  # exactly the old N, untouched
        assert "SyntaxError" in server.log.split("reload abandoned")[1].splitlines()[0]
        write_app(app_dir, "v3")
        reload_and_wait(server, signal.SIGHUP, 3)
        load.wait_for_requests(50)
    report = load.report
    print(f"\nbroken HUP under load ({bound[0]}): {report.summary()}")
    assert report.failures == []
    assert set(report.answers) <= {b"v1", b"v3"}
    assert server.proc.poll() is None  # the master lives


@pytest.mark.parametrize("bound", ["tcp"], indirect=True)
def test_slow_booting_app_reload_makes_no_request_wait(serve, bound, request, app_dir: Path):
    write_app(app_dir, "v1")
    server = start(serve, bound, request)
    with Load(bound[2], bound[0]) as load:
        load.wait_for_requests(50)
        write_app(app_dir, "v2", boot_sleep=2)
        reload_and_wait(server, signal.SIGHUP, 2)
        load.wait_for_requests(50)
    report = load.report
    print(f"\nslow-boot (2 s) HUP under load: {report.summary()}")
    assert report.failures == []
    assert report.max_latency < 1.0  # nothing waited for the 2 s boot


@pytest.mark.parametrize("bound", ["tcp", "unix"], indirect=True)
def test_usr2_with_preload_upgrades_in_place_under_load(serve, bound, request, app_dir: Path):
    write_app(app_dir, "v1")
    server = start(serve, bound, request, "--preload", "--pid", "app.pid")
    pid_file = (app_dir / "app.pid").read_text()
    before = set(server.booted())
    with Load(bound[2], bound[0]) as load:
        load.wait_for_requests(50)
        write_app(app_dir, "v2")
        reload_and_wait(server, signal.SIGUSR2, 2)
        wait_until(lambda: before.isdisjoint(server.worker_pids()))
        load.wait_for_requests(50)
    report = load.report
    print(f"\nUSR2 --preload under load ({bound[0]}): {report.summary()}")
    assert report.failures == []
    assert (app_dir / "app.pid").read_text() == pid_file == f"{server.pid}\n"
    assert server.proc.poll() is None
    assert "upgraded in place: adopted 2 workers" in server.log
    assert set(report.answers) <= {b"v1", b"v2"} and b"v2" in report.answers
    assert len(server.worker_pids()) == 2


@pytest.mark.parametrize("bound", ["tcp"], indirect=True)
def test_usr2_with_a_broken_module_changes_nothing(serve, bound, request, app_dir: Path):
    write_app(app_dir, "v1")
    server = start(serve, bound, request, "--preload")
    before = set(server.booted())
    write_app(app_dir, "v2", broken=True)
    server.signal(signal.SIGUSR2)
    wait_until(lambda: "upgrade abandoned, still serving generation 1" in server.log, timeout=20)
    assert "SyntaxError" in server.log.split("upgrade abandoned")[1].splitlines()[0]
    assert set(server.worker_pids()) == before
    with Load(bound[2], bound[0], clients=1, max_requests=10) as load:
        load.wait_for_requests(10)
    assert set(load.report.answers) == {b"v1"}


@pytest.mark.parametrize("bound", ["tcp"], indirect=True)
def test_hup_with_preload_delivers_new_code(serve, bound, request, app_dir: Path):
    write_app(app_dir, "v1")
    server = start(serve, bound, request, "--preload")
    before = set(server.booted())
    write_app(app_dir, "v2")
    reload_and_wait(server, signal.SIGHUP, 2)
    assert "reloading by re-executing it" in server.log
    # Retired workers may take a connection or two before they act on their TERM.
    wait_until(lambda: before.isdisjoint(server.worker_pids()), message="the old workers")
    with Load(bound[2], bound[0], clients=1, max_requests=10) as load:
        load.wait_for_requests(10)
    assert set(load.report.answers) == {b"v2"}
    assert os.path.exists(f"/proc/{server.pid}")


def test_usr2_with_reuse_port_keeps_every_slot_socket(serve, app_dir: Path):
    write_app(app_dir, "v1")
    server = serve("versioned:Stream", "-w", "3", "--reuse-port", "-b", "127.0.0.1:0", env=NO_PYC)
    server.wait_ready(3)
    port = int(wait_until(lambda: re.search(r"serving 127\.0\.0\.1:(\d+)", server.log)).group(1))
    before = set(server.booted())
    with Load(("127.0.0.1", port), "tcp") as load:
        load.wait_for_requests(100)
        write_app(app_dir, "v2")
        reload_and_wait(server, signal.SIGUSR2, 2)
        wait_until(lambda: before.isdisjoint(server.worker_pids()))
        load.wait_for_requests(200)  # every slot's queue still has a worker behind it
    report = load.report
    print(f"\nUSR2 --reuse-port under load: {report.summary()}")
    assert report.failures == []
    assert b"v2" in report.answers


@pytest.mark.parametrize("bound", ["tcp"], indirect=True)
def test_reload_gives_up_on_a_worker_that_misses_the_boot_timeout(
    serve, bound, request, app_dir: Path
) -> None:
    write_app(app_dir, "v1")
    server = start(serve, bound, request, "--boot-timeout", "1")
    workers = set(server.booted())
    with Load(bound[2], bound[0]) as load:
        write_app(app_dir, "v2", boot_sleep=30)
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload abandoned, generation 1 keeps serving" in server.log, timeout=10)
        wait_until(lambda: set(server.worker_pids()) == workers)
        load.wait_for_requests(50)
    assert "not ready within 1s" in server.log.split("reload abandoned")[1].splitlines()[0]
    assert "retrying" not in server.log  # the killed new workers were not boot failures
    assert load.report.failures == []
    assert set(load.report.answers) == {b"v1"}


def write_config(app_dir: Path, workers: int, *socks: Path, extra: str = "") -> None:
    binds = ", ".join(f'"unix:{s}"' for s in socks)
    (app_dir / "prefork.toml").write_text(f"workers = {workers}\nbind = [{binds}]\n{extra}")


def test_hup_rereads_the_config_file_adding_and_removing_binds(serve, app_dir: Path):
    write_app(app_dir, "v1")
    a, b = app_dir / "a.sock", app_dir / "b.sock"
    write_config(app_dir, 2, a)
    server = serve("versioned:Stream", "--config", "prefork.toml", env=NO_PYC)
    server.wait_ready(2)
    with Load(str(a), "unix") as load:  # a stays served while b is added
        load.wait_for_requests(50)
        write_config(app_dir, 3, a, b)
        reload_and_wait(server, signal.SIGHUP, 2)
        wait_until(lambda: len(server.booted()) == 3)
        load.wait_for_requests(50)
    assert load.report.failures == []
    with Load(str(b), "unix") as load:  # b stays served while a is removed
        load.wait_for_requests(50)
        write_config(app_dir, 3, b)
        reload_and_wait(server, signal.SIGHUP, 3)
        wait_until(lambda: not a.exists(), message="a.sock to be closed and removed")
        load.wait_for_requests(50)
    assert load.report.failures == []
    assert f"closing unix:{a}: no longer configured" in server.log
    with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(a))


def test_hup_with_an_invalid_config_file_changes_nothing(serve, app_dir: Path):
    write_app(app_dir, "v1")
    a = app_dir / "a.sock"
    write_config(app_dir, 2, a)
    server = serve("versioned:Stream", "--config", "prefork.toml", env=NO_PYC)
    workers = set(server.wait_ready(2))
    with Load(str(a), "unix") as load:
        write_config(app_dir, 0, a)
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload abandoned" in server.log)
        load.wait_for_requests(50)
    line = server.log.split("reload abandoned")[1].splitlines()[0]
    assert "prefork.toml: workers must be at least 1, got 0" in line
    assert set(server.worker_pids()) == workers and load.report.failures == []
    write_config(app_dir, 2, a, extra='worker_class = "thread"\n')
    reload_and_wait(server, signal.SIGHUP, 2)  # still a new generation, still sync workers
    assert "worker_class changed; it takes effect at the next USR2 or restart" in server.log


def test_usr2_applies_changed_binds(serve, app_dir: Path):
    write_app(app_dir, "v1")
    a, b = app_dir / "a.sock", app_dir / "b.sock"
    write_config(app_dir, 2, a)
    server = serve("versioned:Stream", "--config", "prefork.toml", env=NO_PYC)
    server.wait_ready(2)
    write_config(app_dir, 2, b)
    write_app(app_dir, "v2")
    reload_and_wait(server, signal.SIGUSR2, 2)
    wait_until(lambda: not a.exists(), message="a.sock to be closed and removed")
    with Load(str(b), "unix", clients=1, max_requests=5) as load:
        load.wait_for_requests(5)
    assert set(load.report.answers) == {b"v2"}
