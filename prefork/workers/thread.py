"""ThreadWorker: ThreadingMixIn's request cycle, at most ``threads`` connections at once.

At the cap the worker stops accepting, so an idle sibling takes the next connection
instead of it queueing behind busy threads. A finishing thread wakes the loop (only
when the loop is paused) so accepting resumes at once.

Connections are served by a pool of threads, started as they are first needed (up to
``threads``) and kept: ThreadingMixIn starts a thread per connection, whose start
(``Thread.start`` waits until the new thread runs) and end cost more than a small
request itself (TCP echo, -w 2: 13.5k requests a second against 7.4k; docs/design.md).
A pool thread runs the server's own ``process_request_thread`` for each connection,
so what ThreadingMixIn calls stays called (``finish_request``, ``handle_error``,
``shutdown_request``); ``daemon_threads`` and ``block_on_close`` have nothing left to
decide: the worker waits for its busy
connections as it stops (``is_idle``) and leaves by ``os._exit``. A server that
overrides ``process_request`` (its own thread pool, say) is left to it.

A connection counts as busy from its accept until its ``finish_request`` returns, which
every ``process_request`` reaches, ThreadingMixIn's or an app's own (a thread pool's):
the count is kept by wrapping the server's ``finish_request`` on the instance, in front
of whatever the classes define.
"""

from __future__ import annotations

import queue
import socketserver
import threading
from collections.abc import Callable
from typing import Any

from ..config import Config
from .base import Worker, WorkerSpec, log, stock_hook

_Connection = tuple[Callable[[Any, Any], None], Any, Any]  # process_request_thread, args


class ThreadWorker(Worker):
    def __init__(self, spec: WorkerSpec, threads: int = Config.threads) -> None:
        super().__init__(spec)
        self.threads = threads
        self.busy = 0
        self._lock = threading.Lock()
        self._wake_when_done = False
        self._pooled: set[Any] = set()  # servers whose connections the pool serves
        self._connections: queue.SimpleQueue[_Connection] = queue.SimpleQueue()
        self._started = 0  # pool threads started

    def boot(self) -> None:
        for server in self.servers:
            server.finish_request = self._counted(server.finish_request)
            # ThreadingMixIn's thread per connection: the pool serves them instead
            if stock_hook(server, "process_request", socketserver.ThreadingMixIn):
                self._pooled.add(server)
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
        pooled = server in self._pooled
        with self._lock:
            self.busy += 1
            self.spec.heartbeat.set_active(self.busy)
            # Every pool thread serves one connection at a time: with as many threads as
            # connections in progress, none waits in the queue for long.
            start = pooled and self.busy > self._started
            if start:
                self._started += 1
        try:
            if not pooled:
                server.process_request(request, client_address)  # the app's own
                return
            if start:
                self._start_pool_thread()
            self._connections.put((server.process_request_thread, request, client_address))
        except BaseException:
            self._request_done(notify=False)
            raise

    def _start_pool_thread(self) -> None:
        thread = threading.Thread(target=self._pool_thread, name="prefork-pool", daemon=True)
        try:
            thread.start()
        except BaseException:  # out of threads, say: this connection fails, not the next
            with self._lock:
                self._started -= 1
            raise

    def _pool_thread(self) -> None:
        """Serve connections as they are queued, for as long as the worker lives."""
        get = self._connections.get
        while True:
            process_request_thread, request, client_address = get()
            try:
                process_request_thread(request, client_address)  # handles what it raises
            except SystemExit:
                pass  # as a thread per connection would: the thread's work ends, silently
            except BaseException:  # KeyboardInterrupt, say: the thread must go on
                log.exception("worker %d: a handler raised out of its thread", self.spec.nr)

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
