"""``prefork status`` against live servers: known request counts, busy workers, reloads,
upgrades, and every way of naming the wrong process."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SERVER_FIRST, echo_line, run_cli, wait_until
from hypothesis import given
from hypothesis import strategies as st

from prefork import heartbeat
from prefork.status import duration, fairness


def status_json(pid: int | str, cwd: Path, *extra: str) -> dict[str, Any]:
    result = run_cli("status", str(pid), "--json", *extra, cwd=cwd)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def served(pid: int, cwd: Path) -> int:
    return sum(w["requests"] for w in status_json(pid, cwd)["workers"])


def test_status_counts_every_request_and_describes_the_pool(serve, listener, app_dir: Path):
    server = serve("apps:Echo", "-w", "2", "--pid", "m.pid", listen_on=listener)
    pids = server.wait_ready(2)
    address = listener.getsockname()
    for n in range(25):
        assert echo_line(address, b"%d" % n) == b"%d" % n
    wait_until(lambda: served(server.pid, app_dir) == 25, message="25 requests in the status")

    status = status_json(server.pid, app_dir)
    master, workers = status["master"], status["workers"]
    assert master["pid"] == server.pid
    assert master["state"] == "serving"
    assert master["generation"] == 1 and master["reloading"] is None
    assert master["workers"] == 2 and master["worker_class"] == "sync"
    assert len(master["binds"]) == 1 and f"{address[0]}:{address[1]}" in master["binds"][0]
    assert master["requests"] == 25
    assert master["rss"] > 1_000_000 and master["uptime"] >= 0
    assert sorted(w["pid"] for w in workers) == sorted(pids)
    assert sorted(w["slot"] for w in workers) == [1, 2]
    for worker in workers:
        assert worker["state"] == "idle" and worker["active"] == 0
        assert worker["client"] is None and worker["request_age"] is None
        assert worker["generation"] == 1
        assert worker["rss"] > 1_000_000 and worker["age"] >= 0
        assert 0 <= worker["heartbeat_age"] < 5
        assert worker["cpu_percent"] >= 0
    counts = [w["requests"] for w in workers]
    assert status["fairness"] == fairness(counts)
    assert status["fairness"]["requests"] == 25

    # The pid file names the same master; the table shows every worker's row.
    text = run_cli("status", "--pid", "m.pid", cwd=app_dir)
    assert text.returncode == 0, text.stderr
    assert f"master {server.pid} [apps:Echo]  serving" in text.stdout
    assert "spread over 2 serving workers: 25 requests" in text.stdout
    rows = [line.split() for line in text.stdout.splitlines()]
    for worker in workers:
        row = next(r for r in rows if len(r) > 4 and r[1] == str(worker["pid"]))
        assert row[0] == str(worker["slot"]) and row[3] == "idle"
        assert row[4] == str(worker["requests"])


@pytest.mark.parametrize("worker_class", ["sync", "thread", "fork"])
def test_status_shows_a_busy_worker_and_its_client(serve, listener, app_dir, worker_class):
    server = serve("apps:HoldPid", "-w", "1", "-k", worker_class, *SERVER_FIRST, listen_on=listener)
    server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=10) as conn:
        assert conn.makefile("rb").readline().strip().isdigit()  # held until we close
        busy = wait_until(
            lambda: [
                w for w in status_json(server.pid, app_dir)["workers"] if w["state"] == "busy"
            ],
            message="a busy worker",
        )
        assert busy[0]["active"] == 1
        if worker_class == "sync":  # threads and children do not record their client
            host, port = conn.getsockname()
            assert busy[0]["client"] == f"{host}:{port}"
            assert busy[0]["request_age"] > 0
    wait_until(
        lambda: status_json(server.pid, app_dir)["workers"][0]["state"] == "idle",
        message="the worker to be idle once the client left",
    )


def echo_pool_that_served(count: int, serve, listener, app_dir: Path) -> Any:
    """Two echo workers that have answered ``count`` requests, as their status says."""
    server = serve("apps:Echo", "-w", "2", listen_on=listener)
    server.wait_ready(2)
    for _ in range(count):
        echo_line(listener.getsockname())
    wait_until(lambda: served(server.pid, app_dir) == count, message=f"{count} requests counted")
    return server


def test_status_follows_a_reload_and_keeps_counting(serve, listener, app_dir: Path):
    server = echo_pool_that_served(10, serve, listener, app_dir)
    server.signal(signal.SIGHUP)

    def reloaded() -> dict[str, Any] | None:
        status = status_json(server.pid, app_dir)
        workers = status["workers"]
        done = status["master"]["generation"] == 2 and len(workers) == 2
        return status if done and all(w["generation"] == 2 for w in workers) else None

    status = wait_until(reloaded, timeout=15, message="generation 2 alone in the status")
    assert status["master"]["requests"] == 10  # served by workers that have exited since
    assert {w["state"] for w in status["workers"]} == {"idle"}


def test_status_survives_an_upgrade_in_place(serve, listener, app_dir: Path):
    server = echo_pool_that_served(7, serve, listener, app_dir)
    server.signal(signal.SIGUSR2)
    wait_until(
        lambda: "reload complete: generation 2 serving" in server.log,
        timeout=20,
        message=lambda: server.log,
    )
    status = status_json(server.pid, app_dir)
    assert status["master"]["pid"] == server.pid
    assert status["master"]["requests"] == 7  # the count crossed execve


def test_watch_refreshes_count_times(serve, listener, app_dir: Path):
    server = serve("apps:Echo", "-w", "1", listen_on=listener)
    server.wait_ready(1)
    result = run_cli(
        "status", str(server.pid), "--json", "--watch", "--count", "3", "--interval", "0.1",
        cwd=app_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["master"]["pid"] == server.pid for line in lines)


def test_wrong_targets_get_one_line_and_a_failure(serve, listener, app_dir: Path):
    server = serve("apps:Echo", "-w", "1", listen_on=listener)
    (worker,) = server.wait_ready(1)
    (app_dir / "garbage.pid").write_text("not a pid\n")
    cases = {
        ("--pid", "missing.pid"): "cannot read pid file",
        ("--pid", "garbage.pid"): "does not hold a PID",
        (str(os.getpid()),): f"PID {os.getpid()} is not a prefork master",
        (str(worker),): f"it is a prefork worker; its master is PID {server.pid}",
        ("2147483647",): "no process with PID 2147483647",
        (): "give the master's PID or --pid FILE",
    }
    for args, message in cases.items():
        result = run_cli("status", *args, cwd=app_dir)
        assert result.returncode != 0, args
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


# -- pure helpers ---------------------------------------------------------------------------------
@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=64))
def test_jain_index_lies_between_one_over_n_and_one(counts: list[int]) -> None:
    result = fairness(counts)
    assert result["requests"] == sum(counts)
    if not any(counts):
        assert result["jain"] is None
    else:
        assert 1 / len(counts) - 1e-4 <= result["jain"] <= 1 + 1e-4
    if min(counts):
        assert result["max_min"] == round(max(counts) / min(counts), 3)
    else:
        assert result["max_min"] is None


def test_fairness_of_even_and_lopsided_pools() -> None:
    assert fairness([10, 10, 10])["jain"] == 1.0
    assert fairness([30, 0, 0])["jain"] == round(1 / 3, 4)
    assert fairness([]) == {"workers": 0, "requests": 0, "max_min": None, "jain": None}


def test_a_page_reads_back_what_master_and_worker_wrote() -> None:
    page = heartbeat.Heartbeat()
    try:
        page.identify(4242, 3, 7, 99)
        page.set_state(heartbeat.READY)
        page.request_started(("127.0.0.1", 5555), 12)
        data = os.pread(page.fileno(), heartbeat.PAGE_SIZE, 0)
        read = heartbeat.WorkerPage.parse(data)
        assert (read.pid, read.slot, read.generation, read.board) == (4242, 3, 7, 99)
        assert (read.state, read.requests, read.active) == ("busy", 12, 1)
        assert read.client == "127.0.0.1:5555"
        page.request_finished(12)
        page.set_state(heartbeat.STOPPING)
        read = heartbeat.WorkerPage.parse(os.pread(page.fileno(), heartbeat.PAGE_SIZE, 0))
        assert (read.state, read.client, read.request_age) == ("stopping", None, None)
    finally:
        page.close()


def test_durations_read_like_uptime() -> None:
    assert [duration(s) for s in (None, 4.26, 75, 3 * 3600 + 120, 2 * 86400 + 3600)] == [
        "-", "4.3s", "1m15s", "3h02m", "2d01h",
    ]  # fmt: skip


def test_page_layout_fits_one_page() -> None:
    assert heartbeat._IDENTITY_OFFSET + heartbeat._IDENTITY.size <= heartbeat.PAGE_SIZE
    assert heartbeat._CLIENT_OFFSET + heartbeat.CLIENT_MAX <= heartbeat._ACTIVE_OFFSET
    assert struct.calcsize("I") + heartbeat._ACTIVE_OFFSET <= heartbeat._DRAIN_OFFSET
    # The combined writes cover the same fields as the ones the master reads back.
    assert heartbeat._BEAT_AND_REQUEST.size == heartbeat._REQUEST_OFFSET + heartbeat._REQUEST.size
    assert heartbeat._REQUEST_AND_CLIENT.size == heartbeat._REQUEST.size + heartbeat.CLIENT_MAX


def test_a_finished_request_beats_and_a_long_client_is_cut() -> None:
    page = heartbeat.Heartbeat()
    try:
        os.pwrite(page.fileno(), struct.pack("d", 1.0), 0)  # a beat from long ago
        page.request_started(("unix:" + "x" * 300, 0), 3)
        read = heartbeat.WorkerPage.parse(os.pread(page.fileno(), heartbeat.PAGE_SIZE, 0))
        assert read.client == ("unix:" + "x" * 300)[: heartbeat.CLIENT_MAX]
        page.request_finished(3)
        assert page.last() is not None and time.monotonic() - page.last() < 5
        read = heartbeat.WorkerPage.parse(os.pread(page.fileno(), heartbeat.PAGE_SIZE, 0))
        assert (read.requests, read.client) == (3, None)
    finally:
        page.close()


LIBRARY_SERVER = """
import socketserver, prefork
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())
server = prefork.PreForkTCPServer(("127.0.0.1", 0), Echo, workers=2)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def test_status_of_a_library_server(app_dir: Path):
    """A program serving with PreForkTCPServer is a master too: status reads it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LIBRARY_SERVER],
        cwd=app_dir,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        ready = wait_until(
            lambda: (
                [w for w in status_json(proc.pid, app_dir)["workers"] if w["state"] == "idle"]
                if len(status_json(proc.pid, app_dir)["workers"]) == 2
                else None
            ),
            message="2 idle workers",
        )
        assert len(ready) == 2
        assert echo_line(("127.0.0.1", port)) == b"ping"
        wait_until(lambda: served(proc.pid, app_dir) == 1, message="the request counted")
        master = status_json(proc.pid, app_dir)["master"]
        assert master["pid"] == proc.pid and master["binds"] == [f"127.0.0.1:{port}"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
