"""Supervision figures: worker replacement, HUP reload under load, start-up, memory,
and the spread of requests across workers."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from benchmarks.servers import ROOT, Running, Server, running

HELLO = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def http_get(port: int, timeout: float = 10.0) -> float:
    """One request on a new connection; its latency in seconds (OSError if it fails)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(HELLO)
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    if not data.startswith(b"HTTP/1.1 200") and not data.startswith(b"HTTP/1.0 200"):
        raise OSError(f"bad answer: {data[:40]!r}")
    return time.perf_counter() - started


def respawn(server: Server, kills: int) -> dict[str, Any]:
    """SIGKILL the only worker, send a request at once: it waits in the listen queue
    until the replacement accepts it. Its latency is the replacement time."""
    times = []
    with running(server) as run:
        for _ in range(kills):
            (worker,) = wait_for_workers(run, 1)
            os.kill(worker, signal.SIGKILL)
            times.append(http_get(run.port) * 1000)
            wait_gone(worker)
    return {
        "server": server.name,
        "kills": kills,
        "median_ms": round(statistics.median(times), 2),
        "max_ms": round(max(times), 2),
    }


def wait_for_workers(run: Running, count: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [
            pid for pid in run.workers() if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
        if len(workers) == count:
            return workers
        time.sleep(0.005)
    raise RuntimeError(f"{run.server.name}: not {count} workers after {timeout}s")


def wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                time.sleep(0.002)
                continue
        except psutil.Error:
            return
        time.sleep(0.002)


@dataclass
class ClosedLoop:
    """Client threads sending one request per connection until stopped; every latency
    and failure is kept with its time."""

    port: int
    clients: int = 4
    max_seconds: float = 120.0  # clients stop by then, or after max_requests, even if
    max_requests: int = 2_000_000  # nobody stops them
    samples: list[tuple[float, float]] = field(default_factory=list)  # (time, seconds)
    failures: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> ClosedLoop:
        self._threads = [threading.Thread(target=self._client) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self) -> None:
        deadline = time.perf_counter() + self.max_seconds
        while not self._stop.is_set() and time.perf_counter() < deadline:
            if len(self.samples) + len(self.failures) >= self.max_requests:
                return
            now = time.perf_counter()
            try:
                self.samples.append((now, http_get(self.port, timeout=10)))
            except OSError as exc:
                self.failures.append((now, f"{type(exc).__name__}: {exc}"))


def reload_under_load(seconds: float = 2.0, reloads: int = 5) -> dict[str, Any]:
    """HUP a 2-worker prefork ``reloads`` times under a closed loop of clients, ``seconds``
    apart: how long each reload takes, the worst request during each (from the HUP to
    half a second after the old generation was told to stop) against the normal p99, and
    failures (want none). For scale on a shared machine, also the worst request of the
    quiet windows of the same length between reloads."""
    server = Server("prefork sync -w 2", "prefork", "hello", 2, "sync", ("--log-level", "info"))
    spans = []  # (HUP, reload complete)
    with running(server) as run, ClosedLoop(run.port) as load:
        time.sleep(seconds)  # the baseline: a measurement window, not a wait
        for generation in range(2, reloads + 2):
            hup_at = time.perf_counter()
            os.kill(run.pid, signal.SIGHUP)
            deadline = time.monotonic() + 30
            done = f"reload complete: generation {generation} serving"
            while done not in run.log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise RuntimeError("a reload did not complete in 30 s")
                time.sleep(0.002)
            spans.append((hup_at, time.perf_counter()))
            time.sleep(seconds)  # serve quietly before the next one
    first = spans[0][0]
    baseline = sorted(s for t, s in load.samples if t < first)
    p99 = baseline[int(0.99 * (len(baseline) - 1))] * 1000 if baseline else 0.0
    worst_during, quiet = [], []
    for hup_at, done_at in spans:
        end = done_at + 0.5
        inside = [s for t, s in load.samples if hup_at <= t <= end]
        if inside:
            worst_during.append(max(inside) * 1000)
        # the quiet time after this reload, cut into windows as long as it took
        maxima = _window_maxima(load.samples, end, end + seconds - 0.5, end - hup_at)
        quiet.extend(maxima)
    return {
        "reloads": len(spans),
        "requests": len(load.samples),
        "failed": len(load.failures),
        "failures": [f for _, f in load.failures][:5],
        "reload_ms": round(statistics.median((d - h) * 1000 for h, d in spans), 1),
        "normal_p99_ms": round(p99, 2),
        "worst_during_ms": round(max(worst_during), 2) if worst_during else None,
        "worst_during_median_ms": round(statistics.median(worst_during), 2)
        if worst_during
        else None,
        "normal_window_worst_ms": {
            "median": round(statistics.median(quiet), 2),
            "max": round(max(quiet), 2),
        }
        if quiet
        else None,
        "bound_ms": round(2 * p99, 2),  # the hello handler's own time is in p99 already
    }


def _window_maxima(
    samples: list[tuple[float, float]], start: float, end: float, window: float
) -> list[float]:
    """The worst latency (ms) of each ``window``-long slice of [start, end)."""
    maxima = []
    while start + window <= end:
        inside = [s for t, s in samples if start <= t < start + window]
        if inside:
            maxima.append(max(inside) * 1000)
        start += window
    return maxima


def keepalive_clients(server: Server, clients: int = 16, wait: float = 2.0) -> dict[str, Any]:
    """``clients`` keep-alive connections each send one request: how many are answered
    within ``wait`` seconds. A sync worker holds one connection for as long as the
    client keeps it: the others wait (wrk would report their absence as nothing)."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    with running(server) as run:
        conns = [
            socket.create_connection(("127.0.0.1", run.port), timeout=5) for _ in range(clients)
        ]
        try:
            for conn in conns:
                conn.sendall(request)
                conn.setblocking(False)
            answered: set[int] = set()
            deadline = time.monotonic() + wait
            while len(answered) < clients and time.monotonic() < deadline:
                waiting = [c for i, c in enumerate(conns) if i not in answered]
                readable, _, _ = select.select(waiting, [], [], 0.05)
                for conn in readable:
                    if conn.recv(4096):
                        answered.add(conns.index(conn))
        finally:
            for conn in conns:
                conn.close()
    return {"server": server.name, "clients": clients, "answered": len(answered), "within_s": wait}


def startup(servers: list[Server]) -> list[dict[str, Any]]:
    """Seconds from starting the command to its first answered request."""
    rows = []
    for server in servers:
        if server.missing():
            continue
        with running(server) as run:
            rows.append({"server": server.name, "ready_ms": round(run.ready_after * 1000, 1)})
    return rows


def memory(workers: int = 2) -> list[dict[str, Any]]:
    """USS (memory only this process holds) per worker, with and without --preload."""
    rows = []
    for preload in (False, True):
        extra = ("--preload",) if preload else ()
        server = Server(
            f"prefork sync -w {workers}{' --preload' if preload else ''}",
            "prefork", "hello", workers, "sync", extra,
        )  # fmt: skip
        with running(server) as run:
            pids = wait_for_workers(run, workers)
            for _ in range(200):  # touch every worker a little
                http_get(run.port)
            uss = [psutil.Process(pid).memory_full_info().uss for pid in pids]
            rows.append(
                {
                    "server": server.name,
                    "uss_per_worker_mb": round(statistics.mean(uss) / 2**20, 2),
                    "master_uss_mb": round(
                        psutil.Process(run.pid).memory_full_info().uss / 2**20, 2
                    ),
                }
            )
    return rows


def fairness(run: Running) -> dict[str, Any] | None:
    """Jain's index of the requests the workers served so far (from prefork status)."""
    result = subprocess.run(
        [sys.executable, "-m", "prefork", "status", str(run.pid), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
    )
    if result.returncode != 0:
        return None
    spread: dict[str, Any] = json.loads(result.stdout)["fairness"]
    return spread
