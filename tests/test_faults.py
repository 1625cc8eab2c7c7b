"""Fault injection: kill storms, crash loops at boot, recycling under load, respawn hygiene.

Real processes and real load; every loop is bounded in count and time.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest
from conftest import is_running, wait_until
from load import Load

pytestmark = pytest.mark.faults

CONNECTION_ERRORS = ("empty answer", "ConnectionResetError", "BrokenPipeError")


def test_kill_storm_under_load_loses_only_the_killed_workers_connections(serve, listener):
    server = serve("apps:Echo", "-w", "4", listen_on=listener)
    server.wait_ready(4)
    kills = 0
    deadline = time.monotonic() + 15
    with Load(listener.getsockname(), "tcp", clients=4, echo=True) as load:
        load.wait_for_requests(100)
        while time.monotonic() < deadline:
            victim = random.choice(server.worker_pids())
            os.kill(victim, signal.SIGKILL)
            kills += 1
            time.sleep(0.5)
        wait_until(lambda: len(server.booted()) == 4, message="the pool to be whole again")
        load.wait_for_requests(100)
    report = load.report
    print(f"\nkill storm: {kills} workers killed in 15 s; {report.summary()}")
    assert all(f.startswith(CONNECTION_ERRORS) for f in report.failures), report.failures
    # A sync worker holds one connection at a time: at most one lost per kill.
    assert len(report.failures) <= kills
    assert report.answers[b"echoed"] > 1000
    assert len(server.worker_pids()) == 4


CRASHY_APP = """
import os, socketserver
if os.path.exists("crash.flag"):
    raise RuntimeError("crash.flag is set")
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())
"""


def test_crash_loop_at_boot_backs_off_and_recovers(serve, listener, app_dir: Path):
    (app_dir / "crashy.py").write_text(CRASHY_APP)
    server = serve("crashy:Echo", "-w", "2", listen_on=listener)
    workers = server.wait_ready(2)
    (app_dir / "crash.flag").write_text("")
    for pid in workers:  # both die; every replacement now fails to import
        os.kill(pid, signal.SIGKILL)
    window = 4.0
    time.sleep(window)  # the storm is what we measure: let it run for a fixed time
    attempts = len(re.findall(r"failed to boot: cannot import 'crashy'", server.log))
    print(
        f"\ncrash loop: {attempts} boot attempts in {window:g} s "
        f"({attempts / window:.1f}/s) for 2 slots"
    )
    assert 2 <= attempts <= 2 * 7  # backoff 0.1 s doubling: about 6 per slot in 4 s
    assert server.proc.poll() is None  # the master survives
    assert "RuntimeError: crash.flag is set" in server.log
    (app_dir / "crash.flag").unlink()
    wait_until(
        lambda: len(server.booted()) == 2,
        timeout=15,
        message=lambda: f"the pool to refill; log:\n{server.log[-2000:]}",
    )


def test_max_requests_recycling_under_load_fails_nothing(serve, listener):
    server = serve(
        "apps:Echo",
        "-w",
        "2",
        "--max-requests",
        "40",
        "--max-requests-jitter",
        "20",
        listen_on=listener,
    )
    server.wait_ready(2)
    peak = 0

    def six_recycles() -> bool:
        nonlocal peak
        peak = max(peak, len(server.worker_pids()))
        return server.log.count("; retiring it") >= 6

    with Load(listener.getsockname(), "tcp", clients=4, echo=True) as load:
        wait_until(
            six_recycles, timeout=30, message=lambda: f"six recycles; log:\n{server.log[-2000:]}"
        )
    report = load.report
    print(
        f"\nmax-requests recycling: {server.log.count('; retiring it')} recycles, "
        f"{report.summary()}, at most {peak} workers at once"
    )
    assert report.failures == []
    assert peak <= 3  # one slot at a time: N workers plus one successor at most
    wait_until(lambda: len(server.worker_pids()) == 2, message="the pool back at 2")


def test_max_rss_recycling_under_load_fails_nothing(serve, listener):
    # 1 MB: every worker is over it, so the master recycles continuously, one at a time.
    server = serve("apps:Echo", "-w", "2", "--max-rss", "1", listen_on=listener)
    server.wait_ready(2)
    with Load(listener.getsockname(), "tcp", clients=4, echo=True) as load:
        wait_until(
            lambda: server.log.count("; retiring it") >= 3,
            timeout=30,
            message=lambda: f"three recycles; log:\n{server.log[-2000:]}",
        )
    report = load.report
    print(f"\nmax-rss recycling: {server.log.count('; retiring it')} recycles, {report.summary()}")
    assert report.failures == []
    assert re.search(r"uses \d+ MB, over --max-rss 1 MB; it will be replaced", server.log)


def test_300_respawns_leave_the_masters_descriptors_and_memory_flat(serve, listener):
    server = serve("apps:Echo", "-w", "2", listen_on=listener)
    server.wait_ready(2)
    master = psutil.Process(server.pid)

    def respawn(times: int) -> None:
        for _ in range(times):
            victim = server.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda v=victim: not is_running(v) and len(server.booted()) == 2,
                message="a replacement",
            )

    respawn(20)  # warm up: first-time allocations, log buffers
    fds, rss = master.num_fds(), master.memory_info().rss
    respawn(300)
    fds_after, rss_after = master.num_fds(), master.memory_info().rss
    print(
        f"\n300 respawns: master fds {fds} -> {fds_after}, "
        f"rss {rss / 2**20:.1f} -> {rss_after / 2**20:.1f} MB"
    )
    assert fds_after == fds
    assert rss_after - rss < 2 * 2**20
    zombies = [p for p in master.children() if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []


def test_fork_worker_kills_a_slow_connection_child_but_not_itself(serve, listener):
    server = serve("apps:Slow", "-w", "1", "-k", "fork", "--timeout", "1", listen_on=listener)
    (worker,) = server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=10) as slow:
        host, port = slow.getsockname()
        slow.sendall(b"60\n")
        assert slow.recv(8) == b"started\n"
        started = time.monotonic()
        assert slow.recv(8) == b""  # its child was killed: this connection only
        assert time.monotonic() - started < 5
    with socket.create_connection(listener.getsockname(), timeout=10) as quick:
        quick.sendall(b"0\n")
        assert quick.makefile("rb").read() == b"started\ndone\n"  # the worker serves on
    assert server.booted() == [worker]
    assert re.search(
        rf"connection child \(pid \d+\) serving {host}:{port} ran 1\.\d+s, "
        r"over --timeout 1; killing it",
        server.log,
    )
