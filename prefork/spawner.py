"""Spawner: forks a worker of a generation, with what it is handed across the fork.

A worker gets its generation's plan (its settings and sockets, the same for every
worker of that generation: a respawn during a reload gets its own generation's, not the
reload's), its own page and status pipe, its slot's --reuse-port sockets, and the list
of descriptors it may keep: the host's from before the master started (what any fork
would give it), never what the master opened since (other workers' pipes and pages,
other generations' sockets, the selector, systemd's socket).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Callable, Iterable

from . import signals
from .errors import EXIT_BOOT_ERROR
from .generations import Generation
from .heartbeat import Heartbeat
from .identity import Identity
from .lifecycle import WorkerProcess
from .listeners import SlotSockets
from .process import open_descriptors, thread_count
from .worker_process import WorkerInfo
from .workers import make_worker
from .workers.base import Loader, WorkerPlan, WorkerSpec

log = logging.getLogger("prefork.arbiter")


class Spawner:
    def __init__(
        self,
        slots: SlotSockets,
        name: str,
        loader: Loader | None,
        board: int,
        pre_fork: Callable[[WorkerInfo], None],
        siblings: Callable[[], Iterable[WorkerProcess]],
    ) -> None:
        self.slots, self.name, self.loader, self.board = slots, name, loader, board
        self._pre_fork, self._siblings = pre_fork, siblings
        self.master_fd = -1  # the read end of the master pipe
        self.poll_interval = 0.5
        self.host_fds: frozenset[int] = frozenset()
        self._plans: dict[int, WorkerPlan] = {}
        self._said_threads = False  # the host's threads at a fork are named once per master

    def note_host_descriptors(self, ours: set[int]) -> None:
        """At start: every descriptor open now that is not in ``ours`` (prefork's) is the
        host's, which workers keep."""
        self.host_fds = frozenset(open_descriptors() - ours)

    def fork(self, nr: int, generation: Generation, now: float) -> WorkerProcess | None:
        """A new worker of slot ``nr``; None if it cannot be made (said in one line)."""
        plan = self.plan(generation)
        try:
            heartbeat = Heartbeat()
        except OSError as exc:  # EMFILE/ENOMEM: the pool retries this slot later
            log.error("cannot make worker %d's status page: %s", nr, exc.strerror)
            return None
        try:
            status_r, status_w = os.pipe()
        except OSError as exc:
            heartbeat.close()
            log.error("cannot make worker %d's status pipe: %s", nr, exc.strerror)
            return None
        config = generation.config
        max_requests = config.max_requests and config.max_requests + _jitter(
            config.max_requests_jitter
        )
        spec = WorkerSpec(
            nr=nr,
            generation=generation.number,
            plan=plan,
            sockets=self.slots.for_slot(nr, generation.servers),
            heartbeat=heartbeat,
            status_fd=status_w,
            max_requests=max_requests,
            watch_code=config.reload and nr == 1,
            keep_fds=self.host_fds,
            sibling_pages=[w.heartbeat for w in self._siblings() if w.heartbeat],
        )
        self._pre_fork(WorkerInfo(nr, generation.number))
        if not self._said_threads:
            self._say_if_threaded()
        try:
            pid = _fork(spec)
        except OSError as exc:  # EAGAIN/ENOMEM: the pool retries this slot later
            for fd in (status_r, status_w):
                os.close(fd)
            heartbeat.close()
            log.error("cannot fork worker %d: %s", nr, exc.strerror)
            return None
        os.close(status_w)
        heartbeat.identify(pid, nr, generation.number, self.board)
        worker = WorkerProcess(
            nr, pid, generation.number, status_r, heartbeat, now, generation.timeouts
        )
        worker.watches_code, worker.max_requests = spec.watch_code, max_requests
        log.debug("spawned worker %d (pid %d, generation %d)", nr, pid, generation.number)
        return worker

    def _say_if_threaded(self) -> None:
        """One line, the first time a worker is forked while other threads run here (a
        host that runs ``serve_forever()`` beside threads of its own): prefork cannot
        avoid that fork, and a worker holds a copy of those threads' memory, locks
        included, without the threads. CPython 3.12+ also warns, a DeprecationWarning
        at every fork that its default filters hide; prefork leaves the filters alone."""
        others = thread_count() - 1
        if others > 0:
            self._said_threads = True
            log.warning(
                "master (pid %d) forks its workers beside %d other thread%s of this "
                "process: a worker gets none of them, and a lock one held at the fork stays "
                'held in the worker (docs/design.md, "Forking from a threaded host")',
                os.getpid(),
                others,
                "" if others == 1 else "s",
            )

    def plan(self, generation: Generation) -> WorkerPlan:
        """What every worker of ``generation`` is handed: its settings and sockets."""
        plan = self._plans.get(generation.number)
        if plan is None:
            config = generation.config
            plan = WorkerPlan(
                servers=generation.servers,
                name=self.name,
                master_pid=os.getpid(),
                master_fd=self.master_fd,
                poll_interval=self.poll_interval,
                loader=self.loader,
                identity=Identity.resolve(config.user, config.group),
                request_timeout=config.worker_timeout,
                graceful_timeout=config.graceful_timeout,
                threads=config.threads,
                max_children=config.max_children,
                access_log=config.access_log,
                access_log_format=config.access_log_format,
                log_format=config.log_format,
                forked_off_main_thread=threading.current_thread() is not threading.main_thread(),
            )
            self._plans[generation.number] = plan
        return plan

    def forget(self, numbers: Iterable[int]) -> None:
        """Keep the plans of these generations only."""
        keep = set(numbers)
        self._plans = {n: p for n, p in self._plans.items() if n in keep}


def _fork(spec: WorkerSpec) -> int:
    # The objects the worker inherits go to the collector's permanent generation: the
    # worker's collections never traverse them, which costs CPU on every request
    # otherwise (measured: 190 -> 177 us per HTTP request; a bare pre-fork loop, with
    # fewer objects, 169) and would copy their pages on write.
    gc.freeze()
    with signals.blocked():
        pid = os.fork()
        if pid == 0:
            try:
                make_worker(spec).run()  # never returns
            finally:
                os._exit(EXIT_BOOT_ERROR)  # never unwind into the master's loop
    return pid


def _jitter(most: int) -> int:
    """0..most, drawn for each worker, so that a pool does not recycle all at once."""
    if not most:
        return 0
    import random  # only with --max-requests-jitter: 1 ms of a start otherwise

    return random.randint(0, most)
