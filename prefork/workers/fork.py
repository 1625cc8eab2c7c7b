"""ForkWorker: ForkingMixIn per connection, at most ``max_children`` at once.

SIGCHLD wakes the loop so finished children are collected (``service_actions``) and
accepting resumes. Each connection child resets the worker's signal handlers, closes
the worker's pipes, and asks the kernel to kill it if the worker dies, so a killed
worker never leaves connection children behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, NoReturn

from ..heartbeat import describe_client
from ..process import die_with_parent, set_title
from .base import Worker, WorkerSpec, log


class ForkWorker(Worker):
    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._children: dict[int, tuple[float, str]] = {}  # pid -> (started, client)
        self.pid = os.getpid()

    def process(self, server: Any, request: Any, client_address: Any) -> None:
        before = set(server.active_children or ())
        server.process_request(request, client_address)  # forks the connection child
        if self.plan.request_timeout:
            started, client = time.monotonic(), describe_client(client_address)
            for pid in set(server.active_children or ()) - before:
                self._children[pid] = (started, client)

    def tick(self) -> None:
        """Publish how many children serve; --timeout for slow handlers: a connection
        child running longer is killed, and only its own connection is lost (the worker
        and its other children go on)."""
        self.spec.heartbeat.set_active(sum(len(s.active_children or ()) for s in self.servers))
        if not self._children:
            return
        now, timeout = time.monotonic(), self.plan.request_timeout
        running = set().union(*(s.active_children or () for s in self.servers))
        for pid, (started, client) in list(self._children.items()):
            if pid not in running:
                del self._children[pid]
            elif now - started > timeout:
                log.error(
                    "worker %d: connection child (pid %d) serving %s ran %.1fs, over "
                    "--timeout %g; killing it",
                    self.spec.nr,
                    pid,
                    client,
                    now - started,
                    timeout,
                )
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                del self._children[pid]

    def boot(self) -> None:
        super().boot()
        signal.signal(signal.SIGCHLD, self.wakeup.handler)
        os.register_at_fork(after_in_child=self._in_connection_child)

    def has_capacity(self) -> bool:
        return all(len(s.active_children or ()) < s.max_children for s in self.servers)

    def is_idle(self) -> bool:
        for server in self.servers:
            server.collect_children()
        return not any(s.active_children for s in self.servers)

    def quit_now(self) -> NoReturn:
        for server in self.servers:
            for pid in server.active_children or ():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        super().quit_now()

    def _in_connection_child(self) -> None:
        set_title(f"prefork: connection child [{self.plan.name}]")  # not a worker: no such word
        for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the worker's pipe is not ours
        signal.set_wakeup_fd(-1)  # nor its wakeup fd, closed below
        for fd in (self.spec.status_fd, self.wakeup.read_fd, self.wakeup.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.access is not None:
            self.access.direct = True  # it exits right after its request
        die_with_parent(self.pid)
