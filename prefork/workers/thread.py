"""ThreadWorker: ThreadingMixIn per connection, at most ``threads`` at once.

At the cap the worker stops accepting, so an idle sibling takes the next connection
instead of it queueing behind busy threads. A finishing thread wakes the loop (only
when the loop is paused) so accepting resumes at once.

A connection counts as busy from its accept until its ``finish_request`` returns, which
every ``process_request`` reaches, ThreadingMixIn's or an app's own (a thread pool's):
the count is kept by wrapping the server's ``finish_request`` on the instance, in front
of whatever the classes define.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..config import Config
from .base import Worker, WorkerSpec


class ThreadWorker(Worker):
    def __init__(self, spec: WorkerSpec, threads: int = Config.threads) -> None:
        super().__init__(spec)
        self.threads = threads
        self.busy = 0
        self._lock = threading.Lock()
        self._wake_when_done = False

    def boot(self) -> None:
        for server in self.servers:
            server.finish_request = self._counted(server.finish_request)
        super().boot()

    def _counted(self, finish_request: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        done = self._request_done

        def finish_and_count(request: Any, client_address: Any) -> None:
            try:
                finish_request(request, client_address)
            finally:
                done()

        return finish_and_count

    def process(self, server: Any, request: Any, client_address: Any) -> None:
        with self._lock:
            self.busy += 1
            self.spec.heartbeat.set_active(self.busy)
        try:
            server.process_request(request, client_address)  # starts the thread
        except BaseException:
            self._request_done(notify=False)
            raise

    def has_capacity(self) -> bool:
        with self._lock:
            full = self.busy >= self.threads
            self._wake_when_done = full
        return not full

    def is_idle(self) -> bool:
        with self._lock:
            self._wake_when_done = self.busy > 0  # wake the draining loop when done
            return self.busy == 0

    def _request_done(self, notify: bool = True) -> None:
        """Called as every connection's ``finish_request`` returns, in its thread."""
        with self._lock:
            self.busy -= 1
            self.spec.heartbeat.set_active(self.busy)
            wake = self._wake_when_done and notify
        if wake:
            self.wakeup.notify()
