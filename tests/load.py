"""Bounded concurrent load for reload tests: client threads in a loop, every answer checked.

Each client opens a connection (or sends a datagram), sends one line, reads one line,
and records the outcome and latency. Loops stop at a count and at a deadline, whichever
comes first, so no test can spin forever; traffic goes only to 127.0.0.1 or Unix sockets.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadReport:
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    answers: collections.Counter[bytes] = field(default_factory=collections.Counter)
    max_latency: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.requests} requests, {len(self.failures)} failed, max latency "
            f"{self.max_latency * 1000:.1f} ms, answers {dict(self.answers)}"
        )


class Load:
    """``with Load(address, kind) as load: ...`` drives traffic until the block ends."""

    def __init__(
        self,
        address: Any,
        kind: str = "tcp",
        clients: int = 4,
        max_requests: int = 200_000,
        max_seconds: float = 60.0,
        timeout: float = 5.0,
        echo: bool = False,
    ) -> None:
        """``echo``: the server answers each line with the same line; anything else is a
        wrong answer (counted apart from connection errors)."""
        self.echo = echo
        self.address, self.kind, self.timeout = address, kind, timeout
        self.report = LoadReport()
        self._clients = clients
        self._max_requests = max_requests
        self._deadline = time.monotonic() + max_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> None:
        """Block until ``count`` more requests were answered, or every client is done."""
        target = self.report.requests + count
        deadline = time.monotonic() + timeout
        while self.report.requests < target and any(t.is_alive() for t in self._threads):
            if time.monotonic() > deadline:
                raise AssertionError(f"load stalled: {self.report.summary()}")
            time.sleep(0.01)

    def _client(self, n: int) -> None:
        for i in range(self._max_requests // self._clients):
            if self._stop.is_set() or time.monotonic() > self._deadline:
                return
            payload = b"%d-%d" % (n, i)
            started = time.monotonic()
            try:
                answer = self._request(payload, n)
                error = None if answer else "empty answer"
                if answer and self.echo and answer != payload:
                    error = f"wrong answer {answer!r} to {payload!r}"
            except OSError as exc:
                answer, error = b"", f"{type(exc).__name__}: {exc}"
            latency = time.monotonic() - started
            with self._lock:
                self.report.requests += 1
                self.report.max_latency = max(self.report.max_latency, latency)
                if error:
                    self.report.failures.append(error)
                else:  # echoed payloads are all different: count them as one answer
                    self.report.answers[b"echoed" if self.echo else answer] += 1

    def _request(self, payload: bytes, n: int) -> bytes:
        if self.kind == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(self.timeout)
                sock.sendto(payload, self.address)
                return sock.recv(4096).strip()
        if self.kind == "http":  # a GET per connection: the answer is the body of a 200
            with socket.create_connection(self.address, timeout=self.timeout) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                reply = sock.makefile("rb").read()
            head, _, body = reply.partition(b"\r\n\r\n")
            return body.strip() if head.startswith(b"HTTP/1.1 200 ") else b""
        family = socket.AF_UNIX if self.kind == "unix" else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.address)
            sock.sendall(payload + b"\n")
            return sock.makefile("rb").readline().strip()
