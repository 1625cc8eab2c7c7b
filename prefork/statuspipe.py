"""The workers' status pipes, read by the master as untrusted input.

A worker writes one byte per message: READY once it has booted, RELOAD when --reload
saw its code change, RETIRE when it has served --max-requests; or, while booting, a
boot error (BOOT_ERROR and one line). EOF means it is gone. The app in a worker may be
compromised and the master may be root, so each message is honoured only where the
protocol allows it: READY and a boot error while booting, RELOAD from the one worker
that watches code and only under --reload, RETIRE only under --max-requests; READY
and RETIRE once. Anything else is ignored with one line, and a worker that keeps it up
is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable

from .escape import printable
from .heartbeat import READY as PAGE_READY
from .lifecycle import State, WorkerProcess
from .pool import Pool
from .workers.base import BOOT_ERROR, READY, RELOAD, RETIRE

log = logging.getLogger("prefork.arbiter")

UNEXPECTED_LIMIT = 100  # status-pipe messages out of protocol before the worker is killed
BOOT_ERROR_MAX = 500  # characters of a worker's boot error that reach the log


class StatusPipes:
    def __init__(
        self,
        pool: Pool,
        selector: selectors.BaseSelector,
        *,
        reload: Callable[[], None],
        recycle: Callable[[WorkerProcess, str], None],
        reloading: Callable[[], bool],
    ) -> None:
        self._pool, self._selector = pool, selector
        self._reload, self._recycle, self._reloading = reload, recycle, reloading

    def read(self, worker: WorkerProcess) -> None:
        """What the worker wrote since the last read, message by message."""
        try:
            data = os.read(worker.status_fd, 4096)
        except OSError:
            return
        if not data:  # the worker is gone; reap_workers will collect it
            with contextlib.suppress(KeyError):
                self._selector.unregister(worker.status_fd)
            return
        if not worker.ready and data.startswith(BOOT_ERROR):
            text = data[1:].decode("utf-8", "replace")[:BOOT_ERROR_MAX]
            worker.boot_error = printable(" ".join(text.split()))
            return
        for message in data:
            self._on_message(worker, bytes((message,)))
            if worker.state is State.KILLED:
                return  # the rest of a flood is not worth reading

    def _on_message(self, worker: WorkerProcess, message: bytes) -> None:
        # READY and RETIRE are honoured once: a worker has one boot and one retirement
        # (it is stopping then). RELOAD comes with each code change the watcher sees (a
        # broken edit, then its fix), and the arbiter runs one reload at a time.
        pool, now = self._pool, time.monotonic()
        if message in worker.said:
            self._unexpected(worker, message, now)
            return
        if message != RELOAD:
            worker.said.add(message)
        if message == READY and not worker.ready:
            pool.ready(worker, now)
            if worker.heartbeat:
                worker.heartbeat.beat()
                worker.heartbeat.set_state(PAGE_READY)
        elif message == RELOAD and worker.ready and worker.watches_code and self._reloading():
            if worker.generation == pool.serving.number and not pool.stopping:
                log.info("--reload: worker %d saw the code change; reloading", worker.nr)
                self._reload()
        elif message == RETIRE and worker.ready and worker.max_requests:
            if worker.state is State.SERVING:  # else it is on its way out already
                served = worker.heartbeat.requests_served() if worker.heartbeat else 0
                self._recycle(worker, f"served {served} requests")
        else:
            self._unexpected(worker, message, now)

    def _unexpected(self, worker: WorkerProcess, message: bytes, now: float) -> None:
        worker.unexpected += 1
        if worker.unexpected == 1:
            log.warning(
                "worker %d (pid %d) wrote %r to its status pipe, which it may not; ignored",
                worker.nr,
                worker.pid,
                message,
            )
        elif worker.unexpected == UNEXPECTED_LIMIT and worker.state is not State.KILLED:
            log.error(
                "worker %d (pid %d) keeps writing to its status pipe out of turn; killing it",
                worker.nr,
                worker.pid,
            )
            worker.enter(State.KILLED, now, None)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
