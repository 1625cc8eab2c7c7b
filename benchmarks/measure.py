"""Supervision figures: worker replacement, HUP reload under load, start-up, memory,
and the spread of requests across workers."""

from __future__ import annotations

import json
import os
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
        while not self._stop.is_set():
            now = time.perf_counter()
            try:
                self.samples.append((now, http_get(self.port, timeout=10)))
            except OSError as exc:
                self.failures.append((now, f"{type(exc).__name__}: {exc}"))


def reload_under_load(seconds: float = 2.0) -> dict[str, Any]:
    """HUP a 2-worker prefork under a closed loop of clients: how long the reload takes,
    the worst request during it against the normal p99, and failures (want none)."""
    server = Server("prefork sync -w 2", "prefork", "hello", 2, "sync", ("--log-level", "info"))
    with running(server) as run, ClosedLoop(run.port) as load:
        time.sleep(seconds)  # the baseline: a measurement window, not a wait
        baseline = sorted(s for _, s in load.samples)
        hup_at = time.perf_counter()
        os.kill(run.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reload complete" not in run.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError("the reload did not complete in 30 s")
            time.sleep(0.002)
        done_at = time.perf_counter()
        time.sleep(seconds)  # after the reload, as long again
    window = done_at + 0.5 - hup_at
    during = [s for t, s in load.samples if hup_at <= t <= done_at + 0.5]
    p99 = baseline[int(0.99 * (len(baseline) - 1))] * 1000 if baseline else 0.0
    return {
        "requests": len(load.samples),
        "failed": len(load.failures),
        "failures": [f for _, f in load.failures][:5],
        "reload_ms": round((done_at - hup_at) * 1000, 1),
        "normal_p99_ms": round(p99, 2),
        "worst_during_ms": round(max(during) * 1000, 2) if during else None,
        # The same machine without a reload: the worst request of each window as long as
        # the reload's, before the HUP (median and max over those windows).
        "normal_window_worst_ms": _window_maxima(load.samples, hup_at - seconds, hup_at, window),
        "bound_ms": round(2 * p99, 2),  # the hello handler's own time is in p99 already
    }


def _window_maxima(
    samples: list[tuple[float, float]], start: float, end: float, window: float
) -> dict[str, float] | None:
    maxima = []
    while start + window <= end:
        inside = [s for t, s in samples if start <= t < start + window]
        if inside:
            maxima.append(max(inside) * 1000)
        start += window
    if not maxima:
        return None
    return {"median": round(statistics.median(maxima), 2), "max": round(max(maxima), 2)}


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
