"""ForkWorker: ForkingMixIn per connection, at most ``max_children`` at once.

SIGCHLD wakes the loop so finished children are collected (``service_actions``) and
accepting resumes. Each connection child resets the worker's signal handlers, closes
the worker's pipes, and asks the kernel to kill it if the worker dies, so a killed
worker never leaves connection children behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from typing import NoReturn

from ..errors import EXIT_OK
from ..process import set_title
from .base import Worker

_PR_SET_PDEATHSIG = 1


class ForkWorker(Worker):
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
        os._exit(EXIT_OK)

    def _in_connection_child(self) -> None:
        set_title(f"prefork: connection child [{self.spec.name}]")  # not a worker: no such word
        for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for fd in (self.spec.status_fd, self.wakeup.read_fd, self.wakeup.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        _die_with_parent()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
