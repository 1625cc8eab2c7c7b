"""systemd: socket activation (LISTEN_FDS) and sd_notify, as systemd would drive them."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import echo_line, wait_until

# What systemd does: the sockets at 3, 4, ...; LISTEN_PID is the pid that will exec.
LAUNCHER = """
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
for target, fd in enumerate(fds, start=3):
    os.dup2(fd, target, inheritable=True)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_socket_activation_serves_passed_tcp_unix_and_udp_sockets(serve, app_dir: Path):
    launcher = app_dir / "launch.py"
    launcher.write_text(LAUNCHER)
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(app_dir / "activated.sock"))
    unix.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    passed = [s.fileno() for s in (tcp, unix, udp)]
    for s in (tcp, unix, udp):
        s.set_inheritable(True)
    server = serve(
        "apps:Both",
        "-w",
        "2",
        pass_fds=tuple(passed),
        launcher=[sys.executable, str(launcher), ",".join(map(str, passed))],
    )
    workers = server.wait_ready(2)
    assert echo_line(tcp.getsockname(), b"tcp") == b"tcp"
    assert echo_line(str(app_dir / "activated.sock"), b"unix") == b"unix"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"udp", udp.getsockname())
        assert client.recv(16) == b"udp"
    # Nothing else was bound: no default 127.0.0.1:8000.
    listening = {
        c.laddr.port
        for c in psutil.Process(server.pid).net_connections("inet")
        if c.status in (psutil.CONN_LISTEN, psutil.CONN_NONE)
    }
    assert listening == {tcp.getsockname()[1], udp.getsockname()[1]}
    assert "127.0.0.1:8000" not in server.log
    for name in (b"LISTEN_FDS", b"LISTEN_PID"):  # a worker's child process does not get them
        assert echo_line(tcp.getsockname(), b"env " + name) == b"unset"
    assert len(workers) == 2
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert (app_dir / "activated.sock").exists()  # systemd's socket, not ours to remove
    for s in (tcp, unix, udp):
        s.close()


class NotifyListener:
    """A Unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait_for(self, key: str, after: int = 0, timeout: float = 15.0) -> int:
        """Index of the first message from ``after`` on that has ``key``."""

        def found() -> int | None:
            for i, message in enumerate(self.poll()[after:], start=after):
                if key in message:
                    return i + 1  # +1 so that index 0 is truthy for wait_until
            return None

        return wait_until(found, timeout, message=lambda: f"{key} in {self.messages}") - 1


@pytest.mark.parametrize("form", ["path", "abstract"])
def test_sd_notify_ready_reloading_stopping(serve, listener, app_dir: Path, form: str):
    if form == "path":
        bind_to = env_value = str(app_dir / "notify.sock")
    else:
        name = f"prefork-test-{os.getpid()}-{time.monotonic_ns()}"
        bind_to, env_value = "\0" + name, "@" + name
    notify = NotifyListener(bind_to)
    server = serve("apps:Echo", "-w", "2", listen_on=listener, env={"NOTIFY_SOCKET": env_value})
    ready = notify.wait_for("READY")
    assert echo_line(listener.getsockname()) == b"ping"  # READY means answering
    assert len(server.booted()) == 2
    assert "STATUS" in notify.messages[ready]
    server.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", after=ready + 1)
    assert notify.messages[reloading]["MONOTONIC_USEC"].isdigit()
    ready_again = notify.wait_for("READY", after=reloading + 1)
    assert "generation 2" in notify.messages[ready_again]["STATUS"]
    server.signal(signal.SIGTERM)
    notify.wait_for("STOPPING", after=ready_again + 1)
    assert server.wait_exit() == 0
    notify.sock.close()


def test_sd_notify_watchdog_pings(serve, listener, app_dir: Path):
    notify = NotifyListener(str(app_dir / "notify.sock"))
    serve(
        "apps:Echo",
        "-w",
        "1",
        listen_on=listener,
        env={"NOTIFY_SOCKET": str(app_dir / "notify.sock"), "WATCHDOG_USEC": "200000"},
    )
    first = notify.wait_for("WATCHDOG")
    notify.wait_for("WATCHDOG", after=first + 1, timeout=2.0)  # and again, periodically
    notify.sock.close()
