"""Recycler: replace workers one slot at a time, the replacement ready before the old one goes.

A worker asks to be recycled when it has served --max-requests (+ jitter); the master
asks on its behalf when it uses more than --max-rss. Requests queue up, and only one
slot recycles at a time: its successor is started beside it, and the old worker is
retired (TERM: it stops accepting and finishes its requests) only once the successor
has reported ready. Capacity never dips, and workers never all restart together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .lifecycle import WorkerProcess

log = logging.getLogger("prefork.arbiter")

MEMORY_CHECK_INTERVAL = 1.0  # seconds between --max-rss checks
MB = 1024 * 1024


class Recycler:
    def __init__(
        self,
        spawn: Callable[[int, int], WorkerProcess | None],
        retire: Callable[[WorkerProcess], None],
        may_start: Callable[[int], bool],
    ) -> None:
        self._spawn = spawn  # (slot, generation) -> the successor, or None if fork failed
        self._retire = retire
        self._may_start = may_start  # slot -> not in a boot-failure backoff
        self._queue: list[WorkerProcess] = []
        self._current: tuple[WorkerProcess, WorkerProcess] | None = None  # (old, successor)
        self.next_memory_check = 0.0

    def request(self, worker: WorkerProcess, why: str) -> None:
        if worker in self._queue or (self._current and self._current[0] is worker):
            return
        log.info("worker %d (pid %d) %s; it will be replaced", worker.nr, worker.pid, why)
        self._queue.append(worker)

    def busy(self, worker: WorkerProcess) -> bool:
        """True while ``worker`` is queued or being recycled."""
        return worker in self._queue or bool(self._current and worker in self._current)

    def step(self, workers: dict[int, WorkerProcess], generation: int) -> None:
        """Advance: retire the old worker once its successor is ready, or start the next."""
        if self._current is not None:
            old, successor = self._current
            if successor.pid not in workers:  # it failed to boot: try again after backoff
                self._current = None
                if old.pid in workers and old.live:
                    self._queue.insert(0, old)
            elif successor.ready:
                log.info(
                    "worker %d (pid %d) replaced by pid %d; retiring it",
                    old.nr,
                    old.pid,
                    successor.pid,
                )
                self._retire(old)
                self._current = None
            return
        # Forget workers that left or were stopped meanwhile (reload, TTOU, stop).
        self._queue = [
            w for w in self._queue if w.pid in workers and w.live and w.generation == generation
        ]
        if self._queue and self._may_start(self._queue[0].nr):
            old = self._queue.pop(0)
            started = self._spawn(old.nr, old.generation)
            if started is not None:
                self._current = (old, started)

    def check_memory(self, workers: list[WorkerProcess], limit_mb: int) -> None:
        """Queue every ready worker whose resident memory is over ``limit_mb``."""
        import psutil  # here: only --max-rss pays for its import, at its first check

        self.next_memory_check = time.monotonic() + MEMORY_CHECK_INTERVAL
        for worker in workers:
            if not worker.ready or not worker.live or self.busy(worker):
                continue
            try:
                rss = psutil.Process(worker.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit_mb * MB:
                self.request(worker, f"uses {rss / MB:.0f} MB, over --max-rss {limit_mb} MB")
