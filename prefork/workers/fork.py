"""ForkWorker: ForkingMixIn per connection, at most ``max_children`` at once.

The worker never waits for a child. socketserver's ``collect_children`` does: at
``max_children`` it blocks in ``waitpid(-1, 0)`` until some child exits, and a worker
blocked there beats no heartbeat (the master would kill it, and every connection it
serves, at --timeout), kills no slow child and watches no master pipe. So each server's
``collect_children`` is replaced, in the worker, by one that reaps with ``WNOHANG``, and
only after a SIGCHLD; ``service_actions``, ``handle_timeout`` and the drain all reach it.
At ``max_children`` the worker stops accepting instead (``has_capacity``): the next
connection waits in the kernel's queue for a sibling or a free child.

Each connection child resets the worker's signal handlers, closes the worker's pipes,
and asks the kernel to kill it if the worker dies, so a killed worker never leaves
connection children behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from types import FrameType
from typing import Any, NoReturn

from ..heartbeat import describe_client
from ..process import die_with_parent, set_title
from .base import Worker, WorkerSpec, log


class ForkWorker(Worker):
    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._children: dict[int, tuple[float, str]] = {}  # pid -> (started, client)
        self._child_exited = False  # a SIGCHLD came since the last reap
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
        and its other children go on). Every turn of the loop comes here, at the cap and
        while draining too: the loop never waits for a child."""
        self.collect_children()  # also when an overridden service_actions skips super()
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
        for server in self.servers:
            server.max_children = self.plan.max_children  # --max-children, as of this generation
            server.collect_children = self.collect_children  # socketserver's waits at the cap
        super().boot()
        # A flag only: the wakeup fd (signals.wake_on_any_thread) already wakes the loop,
        # and no signal number is queued, so a child's exit cuts no batch of accepts short.
        signal.signal(signal.SIGCHLD, self._on_child_exit)
        os.register_at_fork(after_in_child=self._in_connection_child)

    def collect_children(self, *, blocking: bool = False) -> None:
        """socketserver's ``collect_children``, for every server of this worker, without
        its waits: ``waitpid(pid, WNOHANG)`` for each of the servers' own children (never
        ``waitpid(-1)``, which could take the app's), and only once a SIGCHLD has said one
        exited. ``blocking`` is accepted for socketserver's signature and ignored."""
        if not self._child_exited:
            return
        self._child_exited = False  # before reaping: a SIGCHLD from now on is seen next turn
        for server in self.servers:
            children = server.active_children
            for pid in list(children or ()):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere (the app's own waitpid)
                    done = pid
                if done:
                    children.discard(pid)

    def _on_child_exit(self, _signum: int, _frame: FrameType | None) -> None:
        self._child_exited = True

    def has_capacity(self) -> bool:
        return all(len(s.active_children or ()) < s.max_children for s in self.servers)

    def is_idle(self) -> bool:
        self.collect_children()
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
        # libc (for prctl) was opened by the worker at its start and is inherited: a
        # connection child neither looks it up nor runs anything to find it.
        die_with_parent(self.pid)
