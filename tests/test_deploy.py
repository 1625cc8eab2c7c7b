"""Deploy paths as an operator walks them, with systemd's own tools: socket activation by
``systemd-socket-activate`` through HUP and USR2, a NOTIFY_SOCKET listener that records
what systemd would hear, USR2 checked without blocking, the handover, and what a
handler's child processes inherit."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import echo_line, is_running, run_cli, wait_until

from prefork.handover import Handover

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate is not installed (Debian: systemd)"
)

APP = r'''
import os, socketserver, subprocess, time

def setting(name, default):
    try:
        with open(name) as f:
            return f.read().strip()
    except OSError:
        return default

time.sleep(float(setting("boot_delay", "0")))
VERSION = setting("version", "1")

class Echo(socketserver.BaseRequestHandler):
    """A line on a stream socket, a datagram on a datagram socket; 'version' tells the
    code's version, 'spawn' starts `sleep 30` without close_fds and tells its pid."""
    def handle(self):
        if isinstance(self.request, tuple):
            data, sock = self.request
            sock.sendto(data, self.client_address)
            return
        line = self.request.makefile("rb").readline()
        if line.strip() == b"version":
            line = VERSION.encode() + b"\n"
        elif line.strip() == b"spawn":
            child = subprocess.Popen(["sleep", "30"], close_fds=False)
            line = b"%d\n" % child.pid
        self.request.sendall(line)
'''


@pytest.fixture
def deploy(app_dir: Path) -> Path:
    (app_dir / "deployed.py").write_text(APP)
    return app_dir


def free_port() -> str:
    """A TCP port free now, for systemd-socket-activate (which takes no port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def activated(serve, cwd: Path, listen: list[str], *args: str, env=None, extra=()):
    """``prefork run`` under systemd-socket-activate, which binds ``listen`` and execs
    the command once a first connection comes (made here, on the first address)."""
    launcher = [ACTIVATE, *[f"--listen={a}" for a in listen], *extra]
    for name in ("PYTHONPATH", "PATH", "HOME", *(env or {})):
        launcher.append(f"--setenv={name}")
    server = serve(*args, launcher=launcher, env=env, cwd=cwd)
    wait_until(lambda: "Listening on" in server.log, 10, message=lambda: server.log)
    first = listen[0]
    if first.startswith("/"):
        wait_until(lambda: os.path.exists(first), 5)
        address: object = first
        family = socket.AF_UNIX
    else:
        address, family = _tcp_port_of(server.pid), socket.AF_INET
    trigger = socket.socket(family)
    trigger.connect(address)
    trigger.sendall(b"first\n")
    assert trigger.makefile("rb").readline() == b"first\n"
    trigger.close()
    return server, address


def _tcp_port_of(pid: int) -> tuple[str, int]:
    ports = wait_until(
        lambda: [
            c.laddr.port
            for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        ],
        5,
    )
    return "127.0.0.1", ports[0]


def listening(pid: int) -> set[object]:
    addresses: set[object] = set()
    for conn in psutil.Process(pid).net_connections("all"):
        if conn.status in (psutil.CONN_LISTEN, psutil.CONN_NONE) and conn.laddr:
            address = conn.laddr
            addresses.add(address if isinstance(address, str) else address.port)
    return addresses


def reload_then_upgrade(server, after_each: Callable[[], object] = lambda: None) -> None:
    """HUP, then USR2, each waited for until its generation (2, then 3) serves."""
    for sig, generation in ((signal.SIGHUP, 2), (signal.SIGUSR2, 3)):
        server.signal(sig)
        done = f"reload complete: generation {generation}"
        wait_until(lambda d=done: d in server.log, 30, message=lambda: server.log)
        after_each()


class Load:
    """Clients in a thread, one request per connection, counting what fails."""

    def __init__(self, address: object) -> None:
        self.address, self.ok, self.failed = address, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                assert echo_line(self.address, b"x", timeout=10) == b"x"
                self.ok += 1
            except (OSError, AssertionError) as exc:
                self.failed.append(repr(exc))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(15)


# -- socket activation ---------------------------------------------------------------------------
@needs_activate
@pytest.mark.parametrize("bind", [(), ("-b", "fd://3")])
def test_socket_activation_reloads_and_upgrades_with_no_extra_listener(
    serve, deploy: Path, bind: tuple[str, ...]
):
    """With systemd's sockets and no --bind, every HUP opened the default 127.0.0.1:8000
    (or failed on it), and -b fd://3 adopted the descriptor twice and crashed."""
    server, address = activated(
        serve, deploy, [free_port()], "deployed:Echo", "-w", "2", *bind,
        extra=["--fdname=web"],
    )  # fmt: skip
    server.wait_ready(2)
    before = listening(server.pid)
    assert before == {address[1]}
    with Load(address) as load:
        reload_then_upgrade(server)
    assert load.ok > 0 and load.failed == []
    assert listening(server.pid) == before
    assert "127.0.0.1:8000" not in server.log and "Traceback" not in server.log
    assert f"127.0.0.1:{address[1]} (web)" in server.log
    status = run_cli("status", "--json", str(server.pid), cwd=deploy)
    assert json.loads(status.stdout)["master"]["binds"] == [f"127.0.0.1:{address[1]} (web)"]


@needs_activate
def test_socket_activation_of_a_unix_socket_beside_a_bind_of_its_own(serve, deploy: Path):
    path = str(deploy / "activated.sock")
    config = deploy / "prefork.toml"
    config.write_text(f'bind = ["unix:{path}", "unix:{deploy / "own.sock"}"]\n')
    server, _ = activated(
        serve, deploy, [path], "deployed:Echo", "-w", "1", "--config", str(config)
    )
    server.wait_ready(1)
    assert echo_line(path, b"a") == b"a" and echo_line(str(deploy / "own.sock"), b"b") == b"b"
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload complete" in server.log, 20, message=lambda: server.log)
    assert "address already in use" not in server.log  # the passed socket was not bound again
    assert listening(server.pid) == {path, str(deploy / "own.sock")}


@needs_activate
def test_socket_activation_of_a_udp_socket(serve, deploy: Path, tmp_path: Path):
    # A Unix stream socket first, so that a connection starts the command.
    first = str(tmp_path / "first.sock")
    server, _ = activated(
        serve, deploy, [first], "deployed:Echo", "-w", "1", "-b", "udp://127.0.0.1:0"
    )
    server.wait_ready(1)
    port = next(p for p in listening(server.pid) if isinstance(p, int))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"udp", ("127.0.0.1", port))
        assert client.recv(16) == b"udp"


def test_an_empty_bind_list_needs_passed_sockets(deploy: Path):
    (deploy / "none.toml").write_text("bind = []\n")
    result = run_cli("run", "deployed:Echo", "--config", "none.toml", cwd=deploy)
    assert result.returncode == 2 and "nothing to serve" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- what systemd hears --------------------------------------------------------------------
class NotifyListener:
    """A NOTIFY_SOCKET that records every message, with the time it came."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))

    def heard(self, text: str) -> bool:
        return any(text in m for _, m in self.messages)

    def since(self, index: int) -> list[str]:
        return [m for _, m in self.messages[index:]]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify")
    yield listener
    listener.close()


def test_systemd_hears_the_whole_story(serve, listener, deploy: Path, notify: NotifyListener):
    env = {"NOTIFY_SOCKET": str(notify.sock.getsockname()), "WATCHDOG_USEC": "1000000"}
    config = deploy / "prefork.toml"
    config.write_text("workers = 1\n")
    server = serve("deployed:Echo", "--config", str(config), listen_on=listener, env=env)
    server.wait_ready(1)
    wait_until(lambda: notify.heard("READY=1"), 5)

    mark = len(notify.messages)  # a good reload: RELOADING=1, then READY=1
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload complete" in server.log, 10)
    wait_until(lambda: any("READY=1" in m for m in notify.since(mark)), 5)
    assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in notify.since(mark))

    mark = len(notify.messages)  # a failed reload: its cause, and no READY=1
    (deploy / "deployed.py").write_text("raise RuntimeError('broken deploy')\n")
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload abandoned" in server.log, 10)
    wait_until(lambda: any("reload failed" in m for m in notify.since(mark)), 5)
    assert not any("READY=1" in m for m in notify.since(mark))
    assert any("broken deploy" in m for m in notify.since(mark))

    mark = len(notify.messages)  # a refused USR2: its cause in STATUS=
    server.signal(signal.SIGUSR2)
    wait_until(lambda: "upgrade abandoned" in server.log, 20)
    wait_until(lambda: any("upgrade refused" in m for m in notify.since(mark)), 5)
    assert not any(m.startswith("RELOADING=1") for m in notify.since(mark))

    mark = len(notify.messages)  # a good USR2: RELOADING=1, then READY=1
    (deploy / "deployed.py").write_text(APP)
    server.signal(signal.SIGUSR2)
    wait_until(lambda: "upgraded in place" in server.log, 20, message=lambda: server.log)
    wait_until(lambda: any("READY=1" in m for m in notify.since(mark)), 20)
    assert any(m.startswith("RELOADING=1") for m in notify.since(mark))

    mark = len(notify.messages)
    server.signal(signal.SIGTERM)
    assert server.wait_exit(10) == 0
    assert any(m.startswith("STOPPING=1") for m in notify.since(mark))
    assert notify.heard("WATCHDOG=1")


def test_a_slow_usr2_check_does_not_stop_supervision(
    serve, listener, deploy: Path, notify: NotifyListener
):
    """The check was a synchronous subprocess in the loop: with a 5 s import, a worker
    killed during the upgrade was noticed 11 s later and the watchdog went 13 s silent."""
    env = {"NOTIFY_SOCKET": str(notify.sock.getsockname()), "WATCHDOG_USEC": "1000000"}
    server = serve("deployed:Echo", "-w", "2", listen_on=listener, env=env)
    server.wait_ready(2)
    (deploy / "boot_delay").write_text("4")  # the check imports the app for 4 s
    server.signal(signal.SIGUSR2)
    wait_until(lambda: "checking the new start" in server.log, 5)
    check = int(re.search(r"checking the new start first \(pid (\d+)\)", server.log).group(1))
    victim = server.booted()[0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(server.booted()) == 2 and victim not in server.booted(), 10)
    assert time.monotonic() - killed_at < 7.0  # boot_delay 4 s for the replacement too
    assert is_running(check)  # the check was still running meanwhile
    wait_until(lambda: "upgraded in place" in server.log, 30, message=lambda: server.log)
    pings = [t for t, m in notify.messages if "WATCHDOG=1" in m]
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert gaps and max(gaps) < 1.5, gaps  # WatchdogSec=1 would have held


def test_term_during_a_usr2_check_stops_the_server(serve, listener, deploy: Path):
    server = serve("deployed:Echo", "-w", "1", listen_on=listener)
    server.wait_ready(1)
    (deploy / "boot_delay").write_text("10")
    server.signal(signal.SIGUSR2)
    wait_until(lambda: "checking the new start" in server.log, 5)
    check = int(re.search(r"checking the new start first \(pid (\d+)\)", server.log).group(1))
    server.signal(signal.SIGUSR2)  # a second one: ignored, with a line
    wait_until(lambda: "being checked already; USR2 ignored" in server.log, 5)
    server.signal(signal.SIGTERM)
    assert server.wait_exit(10) == 0
    wait_until(lambda: not is_running(check), 5)
    assert "re-executing" not in server.log


# -- the handover -------------------------------------------------------------------------------
def test_a_handover_with_a_missing_and_an_unknown_field_is_read():
    payload = {
        "generation": 4, "master_r": 5, "master_w": 6, "from_the_future": [1, 2],
        "workers": [{"pid": 10, "nr": 1, "generation": 4, "status_fd": 7, "colour": "red"}],
    }  # fmt: skip
    handover = Handover.from_json(json.dumps(payload))
    assert handover.generation == 4 and handover.newest == 0 and handover.stdlib is None
    (worker,) = handover.workers
    assert (worker.pid, worker.state, worker.ready, worker.heartbeat_fd) == (
        10,
        "serving",
        True,
        -1,
    )


@pytest.mark.parametrize("direction", ["on-to-off", "off-to-on"])
def test_reuse_port_turned_either_way_at_usr2_loses_no_connection(
    serve, deploy: Path, direction: str
):
    """Turning reuse_port off and upgrading left the per-slot sockets open and unserved:
    23 of 30 new connections hung."""
    config = deploy / "prefork.toml"
    before, after = ("true", "false") if direction == "on-to-off" else ("false", "true")
    config.write_text(f'bind = ["127.0.0.1:0"]\nworkers = 3\nreuse_port = {before}\n')
    server = serve("deployed:Echo", "--config", str(config))
    server.wait_ready(3)
    port = re.search(r"serving 127\.0\.0\.1:(\d+)", server.log).group(1)
    config.write_text(f'bind = ["127.0.0.1:0"]\nworkers = 3\nreuse_port = {after}\n')
    address = ("127.0.0.1", int(port))
    with Load(address) as load:
        server.signal(signal.SIGUSR2)
        wait_until(lambda: "reload complete" in server.log, 30, message=lambda: server.log)
        wait_until(lambda: len(server.booted()) == 3, 10)
        time.sleep(1.0)  # the load goes on after the upgrade: a measurement window
    answered = sum(echo_line(address, b"y", timeout=5) == b"y" for _ in range(30))
    assert load.failed == [] and load.ok > 0 and answered == 30
    if direction == "off-to-on":
        assert "was bound without SO_REUSEPORT" in server.log


def test_a_child_a_handler_starts_keeps_no_socket_nor_systemd_variable(
    serve, listener, deploy: Path, notify: NotifyListener
):
    """After USR2 the listening sockets and the master pipe were inheritable: a process a
    handler started without close_fds kept the port."""
    env = {"NOTIFY_SOCKET": str(notify.sock.getsockname()), "WATCHDOG_USEC": "5000000"}
    server = serve("deployed:Echo", "-w", "1", listen_on=listener, env=env)
    server.wait_ready(1)
    server.signal(signal.SIGUSR2)
    wait_until(
        lambda: "reload complete: generation 2" in server.log, 30, message=lambda: server.log
    )
    wait_until(lambda: len(server.booted()) == 1, 10)
    sleeper = int(echo_line(listener.getsockname(), b"spawn"))
    try:
        process = psutil.Process(sleeper)
        assert not [c for c in process.net_connections("all") if c.status == psutil.CONN_LISTEN]

        def beyond_stdio() -> dict[str, str]:
            fds, found = f"/proc/{sleeper}/fd", {}
            for n in os.listdir(fds):
                if int(n) > 2:
                    with contextlib.suppress(FileNotFoundError):  # closed since listdir
                        found[n] = os.readlink(f"{fds}/{n}")
            return found

        # Until sleep(1) is in its sleep, the dynamic loader may hold a library open
        # for a moment; what was inherited stays.
        wait_until(lambda: not beyond_stdio(), 5, message=lambda: str(beyond_stdio()))
        environ = process.environ()
        leaked = [
            k
            for k in environ
            if k.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_", "PREFORK_HANDOVER"))
        ]
        assert leaked == []
    finally:
        os.kill(sleeper, signal.SIGKILL)  # ours to end: the worker started it for us


def test_a_hup_naming_one_of_the_masters_own_descriptors_changes_nothing(serve, deploy: Path):
    """fd://N on a HUP adopted whatever the master held at N, its own listener here; the
    abandoned reload then closed it, and every later respawn failed with EBADF."""
    config = deploy / "prefork.toml"
    config.write_text('bind = ["127.0.0.1:0"]\nworkers = 1\n')
    server = serve("deployed:Echo", "--config", str(config))
    (before,) = server.wait_ready(1)
    (listener,) = [
        c for c in psutil.Process(server.pid).net_connections("tcp") if c.status == "LISTEN"
    ]
    address = ("127.0.0.1", listener.laddr.port)
    config.write_text(f'bind = ["127.0.0.1:0", "fd://{listener.fd}"]\nworkers = 1\n')
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload abandoned" in server.log, 10, message=lambda: server.log)
    assert f"fd://{listener.fd}: a descriptor can be named only at start" in server.log
    os.kill(before, signal.SIGKILL)  # its replacement needs the master's listener
    wait_until(lambda: len(server.booted()) == 1 and before not in server.booted(), 10)
    assert echo_line(address, b"still") == b"still"
    assert "Bad file descriptor" not in server.log and "Traceback" not in server.log


FLAKY = """
import os, socketserver
if os.path.exists("broken") and "PREFORK_CHECK_REPORT" not in os.environ:
    raise ImportError("fails now and then")  # but not in the USR2's check

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        self.wfile.write(b"%d\\n" % os.getpid() if line == b"pid\\n" else line)
"""


def test_an_upgrade_that_fails_after_re_executing_serves_on(
    serve, listener, deploy: Path, notify: NotifyListener
):
    """The check passed, then the re-executed image failed (an import that fails now and
    then, a file changed in between) and exited 2: every worker went with it."""
    (deploy / "flaky.py").write_text(FLAKY)
    env = {"NOTIFY_SOCKET": str(notify.sock.getsockname())}
    server = serve("flaky:Echo", "-w", "2", "--preload", listen_on=listener, env=env)
    before = set(server.wait_ready(2))
    (deploy / "broken").touch()
    mark = len(notify.messages)
    with Load(listener.getsockname()) as load:
        server.signal(signal.SIGUSR2)
        wait_until(lambda: "reload abandoned" in server.log, 30, message=lambda: server.log)
    assert load.ok > 0 and load.failed == []
    assert "upgrade failed after re-executing: cannot import 'flaky'" in server.log
    assert server.proc.poll() is None and set(server.booted()) == before
    assert not any("READY=1" in m for m in notify.since(mark))
    (deploy / "broken").unlink()  # fixed: the next HUP deploys, the workers import it
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload complete" in server.log, 30, message=lambda: server.log)
    wait_until(lambda: len(server.booted()) == 2 and not set(server.booted()) & before, 10)
    assert int(echo_line(listener.getsockname(), b"pid")) in server.booted()


# -- the shipped examples/systemd units ------------------------------------------------------------
UNITS = Path(__file__).resolve().parent.parent / "examples" / "systemd"


def _unit_value(unit: str, key: str) -> str:
    for line in (UNITS / unit).read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.partition("=")[2].strip()
    raise AssertionError(f"{unit} has no {key}=")


def _http_get(address: tuple[str, int], path: str = "/") -> bytes:
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK"), data
    return data.partition(b"\r\n\r\n")[2]


@needs_activate
def test_the_shipped_systemd_units_reload_and_upgrade(serve, notify: NotifyListener):
    """examples/systemd as systemd would run them: the socket unit's ListenStream (on a
    free port here, not 8000), the service's ExecStart without --bind, its notify
    protocol. HUP and USR2 deploy (they were abandoned on "address already in use")
    and open no second listener."""
    assert _unit_value("prefork-hello.service", "Type") == "notify-reload"
    assert _unit_value("prefork-hello.service", "ReloadSignal") == "SIGHUP"
    assert ":" in _unit_value("prefork-hello.socket", "ListenStream")
    command = _unit_value("prefork-hello.service", "ExecStart").split()
    assert command[:2] == ["/srv/prefork-hello/.venv/bin/prefork", "run"]
    assert not any(arg.startswith(("-b", "--bind")) for arg in command)
    port = free_port()
    env = {"NOTIFY_SOCKET": str(notify.sock.getsockname())}
    launcher = [ACTIVATE, f"--listen={port}", "--setenv=NOTIFY_SOCKET"]
    for name in ("PYTHONPATH", "PATH", "HOME"):
        launcher.append(f"--setenv={name}")
    server = serve(*command[2:], launcher=launcher, env=env, cwd=UNITS.parent.parent)
    wait_until(lambda: "Listening on" in server.log, 10, message=lambda: server.log)
    address = (port.partition(":")[0], int(port.partition(":")[2]))
    assert _http_get(address) == b"Hello, world!\n"  # the first connection starts it
    wait_until(lambda: notify.heard("READY=1"), 20, message=lambda: server.log)
    before = listening(server.pid)
    for sig, done in [
        (signal.SIGHUP, "reload complete: generation 2"),
        (signal.SIGUSR2, "reload complete: generation 3"),
    ]:
        mark = len(notify.messages)
        server.signal(sig)
        wait_until(lambda d=done: d in server.log, 30, message=lambda: server.log)
        wait_until(lambda m=mark: any("READY=1" in x for x in notify.since(m)), 10)
        assert any(x.startswith("RELOADING=1") for x in notify.since(mark))
        assert _http_get(address) == b"Hello, world!\n"
    assert listening(server.pid) == before == {address[1]}
    assert "address already in use" not in server.log and "Traceback" not in server.log


@needs_activate
@pytest.mark.parametrize("bind", [(), ("-b", "fd://4")])
def test_two_passed_sockets_reload_and_upgrade_under_load(
    serve, deploy: Path, tmp_path: Path, bind: tuple[str, ...]
):
    """A TCP and a Unix socket from systemd, named, with no bind or with fd:// naming the
    second: both serve through HUP and USR2 under load, and nothing else is bound."""
    path = str(tmp_path / "admin.sock")
    server, address = activated(
        serve, deploy, [free_port(), path], "deployed:Echo", "-w", "2", *bind,
        extra=["--fdname=web:admin"],
    )  # fmt: skip
    server.wait_ready(2)
    before = listening(server.pid)
    assert before == {address[1], path}
    with Load(address) as tcp, Load(path) as unix:
        reload_then_upgrade(server)
    assert tcp.ok > 0 and unix.ok > 0 and tcp.failed == [] and unix.failed == []
    assert listening(server.pid) == before
    assert f"{path} (admin)" in server.log and "Traceback" not in server.log


@needs_activate
def test_a_passed_udp_socket_serves_through_a_reload_and_an_upgrade(serve, deploy: Path):
    """A datagram socket from systemd (systemd-socket-activate --datagram starts the
    command at the first datagram, which waits in the socket for the first worker)."""
    port = free_port()
    launcher = [ACTIVATE, "--datagram", f"--listen={port}"]
    for name in ("PYTHONPATH", "PATH", "HOME"):
        launcher.append(f"--setenv={name}")
    server = serve("deployed:Echo", "-w", "1", launcher=launcher, cwd=deploy)
    wait_until(lambda: "Listening on" in server.log, 10, message=lambda: server.log)
    address = (port.partition(":")[0], int(port.partition(":")[2]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(20)
        client.sendto(b"first", address)
        assert client.recv(16) == b"first"  # served once prefork is up
        server.wait_ready(1)
        client.settimeout(5)

        def answered() -> None:
            client.sendto(b"after", address)
            assert client.recv(16) == b"after"

        reload_then_upgrade(server, answered)
    assert listening(server.pid) == {address[1]}
