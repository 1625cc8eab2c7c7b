"""The supervisor's combined events, with real processes: every worker bounded, no request
killed by a timeout misfire, a master that never spins, never drops a HUP and never
crashes, workers that die with it, a stop that drains under load, PID 1."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import SERVER_FIRST, echo_line, is_running, run_cli, wait_until

APP = r'''
import os, socketserver, time

def setting(name, default):
    try:
        with open(name) as f:
            return f.read().strip()
    except OSError:
        return default

VERSION = setting("version", "1")
time.sleep(float(setting("boot_delay", "0")))
if os.path.exists("broken"):
    raise RuntimeError("broken on purpose")

class Info(socketserver.StreamRequestHandler):
    """'sleep S': started, S seconds, done. 'hold': its pid, then held until the client
    closes. 'orphan': a background process left to PID 1. Else: pid and version."""
    def handle(self):
        words = self.rfile.readline().split()
        command = words[0] if words else b""
        if command == b"sleep":
            self.wfile.write(b"started\n"); self.wfile.flush()
            time.sleep(float(words[1]))
            self.wfile.write(b"done\n")
        elif command == b"hold":
            self.wfile.write(b"%d\n" % os.getpid()); self.wfile.flush()
            self.rfile.read()
        elif command == b"orphan":
            import subprocess
            subprocess.run(["sh", "-c", "sleep 0.3 &"])
            self.wfile.write(b"ok\n")
        else:
            self.wfile.write(f"{os.getpid()} {VERSION}\n".encode())
'''


@pytest.fixture
def life(app_dir: Path) -> Path:
    (app_dir / "life.py").write_text(APP)
    return app_dir


def ask(address: object, line: bytes = b"who", timeout: float = 10.0) -> bytes:
    return echo_line(address, line, timeout).strip()


def pid_of_slot(server, nr: int) -> int:
    booted = re.findall(rf"worker {nr} \(pid (\d+)\) booted", server.log)
    return int(booted[-1])


def master_cpu(pid: int, seconds: float) -> float:
    """CPU seconds the master used over a window of ``seconds`` (a measurement window,
    not a wait for anything)."""
    process = psutil.Process(pid)
    before = sum(process.cpu_times()[:2])
    time.sleep(seconds)
    return sum(process.cpu_times()[:2]) - before


# -- every worker bounded ------------------------------------------------------------------------
@pytest.mark.parametrize("holding", [b"hold", b"sleep 60"])
def test_an_old_worker_is_killed_when_the_graceful_timeout_after_a_hup_ends(
    serve, listener, life: Path, holding: bytes
):
    """An idle keep-alive client kept an old-code worker alive 23 s after a HUP with
    --graceful-timeout 5; a stuck handler in the old generation ran on and on."""
    server = serve(
        "life:Info", "-w", "1", "--graceful-timeout", "2", "--client-timeout", "0",
        *SERVER_FIRST, listen_on=listener,
    )  # fmt: skip
    (old,) = server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=20) as conn:
        conn.sendall(holding + b"\n")
        assert conn.recv(10)  # it is being served by the old worker
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload complete: generation 2" in server.log, 10)
        stopped_at = time.monotonic()
        wait_until(lambda: not is_running(old), 6, message=lambda: server.log)
        assert time.monotonic() - stopped_at < 4.5
    assert f"worker 1 (pid {old}) did not stop in time; killing it" in server.log


def test_a_worker_removed_by_ttou_is_bounded_too(serve, listener, life: Path):
    server = serve(
        "life:Info", "-w", "2", "--graceful-timeout", "1", "--client-timeout", "0",
        *SERVER_FIRST, listen_on=listener,
    )  # fmt: skip
    server.wait_ready(2)
    second = pid_of_slot(server, 2)
    with contextlib.ExitStack() as stack:
        holds = []
        for _ in range(2):  # one on each sync worker
            conn = stack.enter_context(socket.create_connection(listener.getsockname(), timeout=10))
            conn.sendall(b"hold\n")
            holds.append(int(conn.makefile("rb").readline()))
        assert second in holds
        server.signal(signal.SIGTTOU)
        wait_until(lambda: not is_running(second), 5, message=lambda: server.log)
    assert f"worker 2 (pid {second}) did not stop in time" in server.log


def test_a_worker_retired_by_max_requests_is_bounded_too(serve, listener, life: Path):
    server = serve(
        "life:Info", "-w", "1", "-k", "thread", "--max-requests", "1",
        "--graceful-timeout", "1", "--client-timeout", "0", *SERVER_FIRST, listen_on=listener,
    )  # fmt: skip
    (first,) = server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=10) as conn:
        conn.sendall(b"hold\n")
        assert int(conn.makefile("rb").readline()) == first
        wait_until(lambda: f"worker 1 (pid {first}) replaced by" in server.log, 10)
        wait_until(lambda: not is_running(first), 4, message=lambda: server.log)


def test_the_timeout_counts_from_the_request_so_no_request_is_killed_by_mistake(
    serve, listener, life: Path
):
    """With --timeout 2 a 1.7 s request was flagged, and the SIGKILL half a second later
    landed on the next request: 5 of 6 such requests were lost."""
    server = serve("life:Info", "-w", "1", "--timeout", "2", listen_on=listener)
    (worker,) = server.wait_ready(1)
    for _ in range(6):
        time.sleep(0.4)  # the client's pace: it comes a while after the loop's last beat
        with socket.create_connection(listener.getsockname(), timeout=10) as conn:
            conn.sendall(b"sleep 1.7\n")
            assert conn.makefile("rb").read() == b"started\ndone\n"
    assert "timed out" not in server.log and server.booted() == [worker]


def test_a_stuck_request_is_killed_and_the_line_says_how_long_it_ran(serve, listener, life: Path):
    server = serve("life:Info", "-w", "1", "--timeout", "1", listen_on=listener)
    (stuck,) = server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=10) as conn:
        conn.sendall(b"sleep 30\n")
        assert conn.recv(8) == b"started\n"
        wait_until(lambda: not is_running(stuck), 5, message=lambda: server.log)
    line = next(x for x in server.log.splitlines() if "timed out" in x)
    seconds = float(re.search(r"has run (\d+\.\d)s \(--timeout 1\)", line).group(1))
    assert 1.0 <= seconds < 1.6, line


# -- a master that never spins -----------------------------------------------------------------
def test_no_spin_while_a_slot_out_of_backoff_boots(serve, listener, life: Path):
    """A backoff entry in the past while its slot's worker boots: 1.97 s CPU in 2 s."""
    server = serve("life:Info", "-w", "2", listen_on=listener)
    server.wait_ready(2)
    (life / "broken").write_text("")
    victim = pid_of_slot(server, 2)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "retrying in" in server.log, 5)
    (life / "boot_delay").write_text("4")
    (life / "broken").unlink()
    wait_until(lambda: len(server.worker_pids()) == 2, 5)  # slot 2 boots again, slowly
    assert master_cpu(server.pid, 2.0) < 0.3


def test_no_spin_after_ttou_removes_a_slot_in_backoff(serve, listener, life: Path):
    server = serve("life:Info", "-w", "2", listen_on=listener)
    server.wait_ready(2)
    (life / "broken").write_text("")
    os.kill(pid_of_slot(server, 2), signal.SIGKILL)
    wait_until(lambda: "retrying in" in server.log, 5)
    server.signal(signal.SIGTTOU)
    wait_until(lambda: "pool size is now 1" in server.log, 5)
    assert master_cpu(server.pid, 2.0) < 0.3


def test_no_spin_during_a_reload_or_a_stop_with_max_rss_and_the_watchdog(
    serve, listener, life: Path, tmp_path: Path
):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"}
    try:
        server = serve(
            "life:Info", "-w", "2", "--max-rss", "100000", "--graceful-timeout", "10",
            listen_on=listener, env=env,
        )  # fmt: skip
        server.wait_ready(2)
        (life / "boot_delay").write_text("3")
        server.signal(signal.SIGHUP)  # a reload whose workers boot for 3 s
        wait_until(lambda: "reloading: starting generation 2" in server.log, 5)
        assert master_cpu(server.pid, 1.5) < 0.3
        wait_until(lambda: "reload complete" in server.log, 10)
        with socket.create_connection(listener.getsockname(), timeout=10) as conn:
            conn.sendall(b"sleep 4\n")
            assert conn.recv(8) == b"started\n"
            server.signal(signal.SIGTERM)  # a stop that waits for that request
            wait_until(lambda: "stopping gracefully" in server.log, 5)
            assert master_cpu(server.pid, 1.5) < 0.3
            assert conn.makefile("rb").readline() == b"done\n"
        assert server.wait_exit(10) == 0
    finally:
        notify.close()


# -- generations own their settings and sockets ------------------------------------------------
def test_an_abandoned_reload_that_removed_a_bind_leaves_respawning_intact(serve, life: Path):
    """The removed socket was closed at the start of the reload and the abandon put the
    closed server back: every later worker failed with "file descriptor cannot be a
    negative integer (-1)"."""
    a, b = str(life / "a.sock"), str(life / "b.sock")
    config = life / "prefork.toml"
    config.write_text(f'bind = ["unix:{a}", "unix:{b}"]\nworkers = 1\n')
    server = serve("life:Info", "--config", str(config))
    server.wait_ready(1)
    (life / "broken").write_text("")
    config.write_text(f'bind = ["unix:{a}"]\nworkers = 1\n')
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload abandoned" in server.log, 10, message=lambda: server.log)
    (life / "broken").unlink()
    os.kill(pid_of_slot(server, 1), signal.SIGKILL)
    wait_until(lambda: len(server.booted()) == 1, 10, message=lambda: server.log)
    assert ask(a).endswith(b" 1") and ask(b).endswith(b" 1")
    assert "negative integer" not in server.log


def test_a_respawn_during_a_reload_keeps_its_own_generation_and_an_abandon_closes_the_new_bind(
    serve, life: Path
):
    """An old worker respawned during a reload got the reload's binds and settings, and
    after an abandon went on answering on a bind the master had closed."""
    a, c = str(life / "a.sock"), str(life / "c.sock")
    config = life / "prefork.toml"
    config.write_text(f'bind = ["unix:{a}"]\nworkers = 1\n')
    server = serve("life:Info", "--config", str(config))
    (first,) = server.wait_ready(1)
    (life / "boot_delay").write_text("2.5")
    # The new generation: one more bind, and a boot timeout its workers cannot meet.
    config.write_text(f'bind = ["unix:{a}", "unix:{c}"]\nworkers = 1\nboot_timeout = 1\n')
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reloading: starting generation 2" in server.log, 5)
    os.kill(first, signal.SIGKILL)  # generation 1's replacement boots with 1's settings
    wait_until(lambda: "reload abandoned" in server.log, 10, message=lambda: server.log)
    wait_until(lambda: len(server.booted()) == 1, 10, message=lambda: server.log)
    assert ask(a).endswith(b" 1")  # generation 1, with its 30 s boot timeout, booted
    wait_until(lambda: f"closing unix:{c}: no longer configured" in server.log, 5)
    with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as probe:
        probe.connect(c)
    (replacement,) = server.booted()
    assert not any(s.laddr == c for s in psutil.Process(replacement).net_connections("unix")), (
        "the old generation's worker holds the new generation's socket"
    )


def test_ttin_during_a_reload_is_kept_when_it_is_abandoned(serve, listener, life: Path):
    config = life / "prefork.toml"
    config.write_text("workers = 1\n")
    server = serve("life:Info", "--config", str(config), listen_on=listener)
    server.wait_ready(1)
    (life / "boot_delay").write_text("2.5")
    config.write_text("workers = 1\nboot_timeout = 1\n")
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reloading: starting generation 2" in server.log, 5)
    server.signal(signal.SIGTTIN)
    wait_until(lambda: "reload abandoned" in server.log, 10, message=lambda: server.log)
    wait_until(lambda: len(server.booted()) == 2, 15, message=lambda: server.log)
    status = run_cli("status", "--json", str(server.pid), cwd=life)
    assert '"workers": 2' in status.stdout


def test_a_hup_during_a_reload_is_acted_on_once_it_settles(serve, listener, life: Path):
    """A HUP during a reload was dropped ("HUP ignored"): a deploy that signals after each
    sync could end up serving stale code."""
    server = serve("life:Info", "-w", "1", listen_on=listener)
    server.wait_ready(1)
    (life / "boot_delay").write_text("1.5")
    server.signal(signal.SIGHUP)  # generation 2 reads version 1, then boots for 1.5 s
    wait_until(lambda: "reloading: starting generation 2" in server.log, 5)
    time.sleep(0.3)  # let generation 2's workers read the version before it changes
    (life / "version").write_text("2")
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reloading again once it settles" in server.log, 5)
    wait_until(
        lambda: "reload complete: generation 3" in server.log, 15, message=lambda: server.log
    )
    # (a connection made just then may still reach an old worker that is stopping)
    wait_until(lambda: ask(listener.getsockname()).endswith(b" 2"), 5)


def test_generation_numbers_never_repeat_across_an_abandoned_hup_and_usr2(
    serve, listener, life: Path
):
    server = serve("life:Info", "-w", "1", listen_on=listener)
    server.wait_ready(1)
    (life / "broken").write_text("")
    server.signal(signal.SIGHUP)  # generation 2, abandoned
    wait_until(lambda: "reload abandoned" in server.log, 10)
    (life / "broken").unlink()
    server.signal(signal.SIGUSR2)
    wait_until(lambda: "upgraded in place" in server.log, 15, message=lambda: server.log)
    wait_until(
        lambda: "reload complete: generation 3" in server.log, 15, message=lambda: server.log
    )
    assert "starting generation 2 beside generation 1" in server.log
    assert server.log.count("starting generation 2") == 1


# -- a failure in the loop is not the end -------------------------------------------------------
def test_out_of_descriptors_during_a_reload_abandons_it_and_the_master_lives(
    serve, listener, life: Path
):
    """ulimit -n 64 and one HUP crashed the master and SIGKILLed every worker."""
    server = serve("life:Info", "-w", "2", "--boot-timeout", "2", listen_on=listener)
    server.wait_ready(2)
    used = psutil.Process(server.pid).num_fds()
    limit = f"--nofile={used + 2}:"  # the soft limit: what a fork of the master meets
    subprocess.run(["prlimit", "--pid", str(server.pid), limit], check=True)
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload abandoned" in server.log, 10, message=lambda: server.log)
    assert server.proc.poll() is None and "Traceback" not in server.log
    assert ask(listener.getsockname()).endswith(b" 1")
    subprocess.run(["prlimit", "--pid", str(server.pid), "--nofile=1024:"], check=True)
    server.signal(signal.SIGHUP)  # and the next reload is not blocked
    wait_until(lambda: "reload complete" in server.log, 10, message=lambda: server.log)


# -- workers die with their master --------------------------------------------------------------
def test_kill_9_of_the_master_during_a_reload_takes_its_booting_workers(
    serve, listener, life: Path
):
    """Workers still importing the app outlived a SIGKILLed master and held the port."""
    server = serve("life:Info", "-w", "2", listen_on=listener)
    server.wait_ready(2)
    (life / "boot_delay").write_text("20")
    server.signal(signal.SIGHUP)
    wait_until(lambda: len(server.worker_pids()) == 4, 5)  # two serving, two importing
    children = server.worker_pids()
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(5)
    wait_until(lambda: not any(is_running(p) for p in children), 3)


def test_a_fork_worker_at_its_max_children_dies_with_its_master(serve, listener, life: Path):
    server = serve(
        "life:Info", "-w", "1", "-k", "fork", "--max-children", "1", listen_on=listener,
    )  # fmt: skip
    (worker,) = server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=10) as conn:
        conn.sendall(b"sleep 30\n")
        assert conn.recv(8) == b"started\n"
        child = psutil.Process(worker).children()[0].pid
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(5)
        wait_until(lambda: not is_running(worker) and not is_running(child), 3)


# -- a stop that drains --------------------------------------------------------------------------
LOAD = r"""
import socket, sys, threading, time
address, seconds = ("127.0.0.1", int(sys.argv[1])), float(sys.argv[2])
line = sys.argv[3].encode() + b"\n"
counts = {"ok": 0, "refused": 0, "reset": 0, "other": 0}
deadline = time.monotonic() + seconds

def client():
    while time.monotonic() < deadline:
        try:
            left = max(0.1, deadline - time.monotonic())
            with socket.create_connection(address, timeout=left) as conn:
                conn.sendall(line)
                outcome = "ok" if conn.makefile("rb").readline() else "reset"
        except ConnectionRefusedError:
            outcome = "refused"
            time.sleep(0.01)
        except ConnectionResetError:
            outcome = "reset"
        except OSError:
            outcome = "other"
        counts[outcome] += 1

threads = [threading.Thread(target=client) for _ in range(10)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(counts, flush=True)
"""


@contextlib.contextmanager
def load(port: int, seconds: float, processes: int = 4, line: str = "who"):
    """Client processes of 10 threads each, one request per connection, for ``seconds``:
    more clients than workers, so a queue is never empty. Yields their counts' list,
    filled on the way out."""
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD, str(port), str(seconds), line],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results: list[str] = []
    try:
        yield results
    finally:
        results.extend(c.communicate(timeout=seconds + 20)[0].strip() for c in clients)


def test_a_graceful_stop_under_sustained_load_ends_in_seconds_without_sigkill(
    serve, listener, life: Path
):
    """The drain accepted until one accept found nothing, which never happens with more
    clients than workers: every TERM under load ran into --graceful-timeout."""
    server = serve("life:Info", "-w", "2", "--graceful-timeout", "20", listen_on=listener)
    server.wait_ready(2)
    # Requests of 50 ms from 40 clients: more than two workers can keep up with.
    with load(listener.getsockname()[1], 8, line="sleep 0.05") as results:
        wait_until(lambda: psutil.Process(server.pid).children() and True, 1)
        time.sleep(1.0)  # the load runs for a second: a measurement window
        server.signal(signal.SIGTERM)
        started = time.monotonic()
        assert server.wait_exit(15) == 0
        took = time.monotonic() - started
    assert took < 6.0, took
    assert "did not stop in time" not in server.log
    print(f"TERM under load: {took:.2f}s; clients saw {results}")


def test_quit_during_a_drain_under_load_is_noticed(serve, listener, life: Path):
    """Requests of 0.1 s each, 100 clients, one worker: the drain has seconds of queue
    before it, and QUIT must end it, not wait for it (nor for a SIGKILL)."""
    server = serve("life:Info", "-w", "1", "--graceful-timeout", "20", listen_on=listener)
    server.wait_ready(1)
    with load(listener.getsockname()[1], 4, processes=10, line="sleep 0.1"):
        time.sleep(1.0)  # the load runs for a second: a measurement window
        server.signal(signal.SIGTERM)
        wait_until(lambda: "stopping gracefully" in server.log, 5)
        server.signal(signal.SIGQUIT)
        started = time.monotonic()
        assert server.wait_exit(10) == 0
        assert time.monotonic() - started < 3.0
    assert "did not stop in time" not in server.log  # it left by itself, not by SIGKILL


# -- PID 1 ---------------------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace needs root")
def test_as_pid_1_the_master_reaps_orphans(serve, life: Path):
    """As a container's PID 1, 10 requests to a handler that starts a background shell
    left 10 zombies."""
    path = str(life / "app.sock")
    server = serve(
        "life:Info", "-w", "1", "-b", f"unix:{path}",
        launcher=["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
    )  # fmt: skip
    wait_until(lambda: "booted" in server.log, 10, message=lambda: server.log)
    for _ in range(10):
        assert ask(path, b"orphan") == b"ok"
    master = psutil.Process(server.pid).children()[0]

    def zombies() -> list[int]:
        found = []
        for process in master.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # reaped as we look: no zombie
                if process.status() == psutil.STATUS_ZOMBIE:
                    found.append(process.pid)
        return found

    wait_until(lambda: not zombies() and len(master.children(recursive=True)) == 1, 5)
    assert ask(path).endswith(b" 1")
