"""Supervision figures: worker replacement, HUP reload under load, start-up, memory,
and the spread of requests across workers."""

from __future__ import annotations

import bisect
import json
import multiprocessing
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
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
    """Client processes sending one request per connection until stopped; every latency
    and failure is kept with its start time. Processes, not threads: a thread of a
    busy client waits for the GIL, and that wait would be counted as the server's
    (measured here: p99 3.5 ms with 4 threads, 1.4 ms with 4 processes)."""

    port: int
    clients: int = 4
    max_seconds: float = 120.0  # clients stop by then, or after max_requests each,
    max_requests: int = 500_000  # even if nobody stops them
    samples: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    failures: list[tuple[float, str]] = field(default_factory=list)

    def __enter__(self) -> ClosedLoop:
        context = multiprocessing.get_context("fork")
        stop_at = time.perf_counter() + self.max_seconds
        self._ends, self._stops, self._processes = [], [], []
        for _ in range(self.clients):
            results, send = context.Pipe(duplex=False)
            stop = context.RawValue("d", stop_at)
            process = context.Process(
                target=_closed_loop_client,
                args=(self.port, stop, self.max_requests, send),
                daemon=True,
            )
            process.start()
            send.close()
            self._ends.append(results)
            self._stops.append(stop)
            self._processes.append(process)
        return self

    def __exit__(self, *exc: object) -> None:
        now = time.perf_counter()
        for stop in self._stops:
            stop.value = now
        for results, process in zip(self._ends, self._processes, strict=True):
            if results.poll(30):
                samples, failures = results.recv()
                self.samples += samples
                self.failures += failures
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        self.samples.sort()


def _closed_loop_client(port: int, stop: Any, max_requests: int, results: Connection) -> None:
    """One client process: a request per connection, back to back, until the shared
    ``stop`` time (perf_counter: one clock for every process) or ``max_requests``; then
    it sends its (start, seconds) samples and (start, error) failures to the parent."""
    samples: list[tuple[float, float]] = []
    failures: list[tuple[float, str]] = []
    while len(samples) + len(failures) < max_requests:
        now = time.perf_counter()
        if now >= stop.value:
            break
        try:
            samples.append((now, http_get(port, timeout=10)))
        except OSError as exc:
            failures.append((now, f"{type(exc).__name__}: {exc}"))
    results.send((samples, failures))
    results.close()


def reload_under_load(server: Server, seconds: float = 1.0, reloads: int = 10) -> dict[str, Any]:
    """HUP a server ``reloads`` times, ``seconds`` apart, under a closed loop of clients.

    A reload's window runs from the HUP until every worker of the old generation has
    exited (plus ``SETTLE_S``: a server that stops the old workers before the new ones
    answer queues the requests of that gap). Reported: how long reloads took, failed
    requests (want none), the worst request overlapping each window against twice the
    normal p99 (measured before the first HUP), and, for scale on a shared machine,
    the same for quiet windows as long, cut from the time between the reloads."""
    spans = []  # (HUP, old generation gone)
    with running(server) as run, ClosedLoop(run.port) as load:
        time.sleep(2 * seconds)  # the baseline: a measurement window, not a wait
        for _ in range(reloads):
            old = wait_for_workers(run, server.workers)
            hup_at = time.perf_counter()
            os.kill(run.pid, signal.SIGHUP)
            for pid in old:
                wait_gone(pid, timeout=30)
            spans.append((hup_at, time.perf_counter()))
            time.sleep(seconds)  # serve quietly before the next one
        wait_for_workers(run, server.workers)
    samples = load.samples
    baseline = sorted(s for t, s in samples if t < spans[0][0])
    p99 = baseline[int(0.99 * (len(baseline) - 1))] * 1000 if baseline else 0.0
    bound = 2 * p99  # the hello handler's own time is inside p99 already
    longest = max((s for _, s in samples), default=0.0)
    worst_during, quiet = [], []
    for hup_at, gone_at in spans:
        end = gone_at + SETTLE_S
        worst_during.append(_worst_ms(samples, hup_at, end, longest))
        # the quiet time after this reload, cut into windows as long as this one
        length, start = end - hup_at, end + QUIET_AFTER_S
        while start + length <= end + seconds - QUIET_AFTER_S:
            quiet.append(_worst_ms(samples, start, start + length, longest))
            start += length
    return {
        "server": server.name,
        "reloads": len(spans),
        "requests": len(samples),
        "failed": len(load.failures),
        "failures": [f for _, f in load.failures][:5],
        "reload_ms": round(statistics.median((g - h) * 1000 for h, g in spans), 1),
        "normal_p99_ms": round(p99, 2),
        "bound_ms": round(bound, 2),
        "worst_during_ms": round(max(worst_during), 2),
        "worst_during_median_ms": round(statistics.median(worst_during), 2),
        "reloads_over_bound": sum(w > bound for w in worst_during),
        "quiet_windows": len(quiet),
        "quiet_over_bound": sum(w > bound for w in quiet),
        "quiet_worst_median_ms": round(statistics.median(quiet), 2) if quiet else None,
        "quiet_worst_max_ms": round(max(quiet), 2) if quiet else None,
    }


SETTLE_S = 0.02
QUIET_AFTER_S = 0.1  # a reload's last exits and reaps are over by then


def _worst_ms(
    samples: list[tuple[float, float]], start: float, end: float, longest: float
) -> float:
    """The slowest request (ms) that was in progress at some time in [start, end];
    ``samples`` sorted by start, none longer than ``longest`` seconds."""
    lo = bisect.bisect_left(samples, (start - longest,))
    hi = bisect.bisect_right(samples, (end, float("inf")))
    inside = [s for t, s in samples[lo:hi] if t + s >= start]
    return max(inside) * 1000 if inside else 0.0


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


def startup(servers: list[Server], rounds: int = 21) -> list[dict[str, Any]]:
    """Milliseconds from starting the command to its first answered request: the
    median and the fastest of ``rounds`` starts, the servers taking turns so that a
    slow moment of the machine falls on all of them alike."""
    present = [server for server in servers if not server.missing()]
    times: dict[str, list[float]] = {server.name: [] for server in present}
    for _ in range(rounds):
        for server in present:
            with running(server) as run:
                times[server.name].append(run.ready_after * 1000)
    return [
        {
            "server": name,
            "ready_ms": round(statistics.median(values), 1),
            "fastest_ms": round(min(values), 1),
            "rounds": len(values),
        }
        for name, values in times.items()
    ]


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
