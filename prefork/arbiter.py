"""Arbiter: the master. It binds nothing and serves nothing; it keeps N workers alive.

One flat loop: dispatch queued signals, reap exited workers, kill stuck ones, settle a
reload, spawn missing workers, then sleep on the self-pipe until the next deadline.
Signals (SIGCHLD included) and other threads only queue and wake; every decision is
made in the loop.

Workers report over a status pipe each: one byte when ready, or a one-line boot error.
EOF on it means the worker is gone, which also wakes a master that has no signal
handlers (one running outside the main thread). A second pipe, which only the master
writes to, tells workers the master died: they see EOF and leave.

Generations, reload (HUP) and the in-place upgrade (USR2) live in ``reload.py``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import resource
import selectors
import signal
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from . import listeners, signals
from . import log as prefork_log
from .access import prepare_access_log
from .config import MAX_WORKERS, Config
from .errors import EXIT_BOOT_ERROR, BootError, PreforkError
from .escape import printable
from .heartbeat import READY as PAGE_READY
from .heartbeat import Heartbeat
from .identity import Identity, file_owner
from .listeners import describe_address
from .process import describe_exit, get_title, set_title
from .recycle import Recycler
from .reload import Reconfigurer, Reloads
from .statuspage import MasterPage
from .systemd import Notifier
from .upgrade import Handover, Upgrader
from .version import __version__
from .worker_process import WorkerInfo, WorkerProcess
from .workers import make_worker, worker_model
from .workers.base import BOOT_ERROR, READY, RELOAD, RETIRE, STACK_DUMP_SIGNAL, Loader, WorkerSpec

log = logging.getLogger("prefork.arbiter")

SHUTDOWN_CALLED = -1  # queued like a signal by shutdown() from another thread
QUICK_STOP_GRACE = 1.0  # seconds a quick-stopped worker gets before SIGKILL
STACK_DUMP_GRACE = 0.5  # seconds between asking a stuck worker for its stack and SIGKILL
BACKOFF_START, BACKOFF_CAP = 0.1, 10.0  # retry delays of a slot whose worker fails to boot
# The longest sleep of the loop. Deadlines further away (any finite timeout is allowed)
# are simply slept towards in steps: select() cannot take a timeout of 30 days.
MAX_SLEEP = 10.0
SPAWNS_PER_TURN = 16  # forks between two looks at the signals: TERM is heard during -w 1024
LOOP_ERROR_PAUSE = 0.1  # after a failed turn of the loop: a persistent failure cannot spin
UNEXPECTED_LIMIT = 100  # status-pipe messages out of protocol before the worker is killed
BOOT_ERROR_MAX = 500  # characters of a worker's boot error that reach the log


class ErrorReport:
    """Unexpected errors of the loop, logged without flooding the log: the first of a
    kind with its traceback, the same again at most once a minute, with a count."""

    def __init__(self, logger: logging.Logger, every: float = 60.0) -> None:
        self._log, self._every = logger, every
        self._last: tuple[str, str] | None = None
        self._since, self._repeats = 0.0, 0

    def report(self, exc: Exception, where: str) -> None:
        kind, now = (type(exc).__name__, str(exc)), time.monotonic()
        if kind != self._last:
            self._last, self._since, self._repeats = kind, now, 0
            self._log.error("unexpected error %s; carrying on", where, exc_info=exc)
            return
        self._repeats += 1
        if now - self._since >= self._every:
            self._log.error(
                "unexpected error %s, %d more times: %s: %s", where, self._repeats, *kind
            )
            self._since, self._repeats = now, 0


class Arbiter(Reloads):
    """Supervise a pool of workers serving ``servers`` (already bound, in this process)."""

    def __init__(
        self,
        servers: Sequence[Any],
        config: Config,
        *,
        name: str,
        loader: Loader | None = None,
        route: signals.SignalRoute | None = None,
        upgrader: Upgrader | None = None,
        handover: Handover | None = None,
        settings: Reconfigurer | None = None,
    ) -> None:
        self.servers = list(servers)
        self.config = config
        self.name = name
        self.loader = loader
        self.target_workers = config.workers
        self.generation = handover.generation if handover else 1  # the serving generation
        self.reloading: int | None = None  # the generation being started by a reload
        self._newest = self.generation  # every reload attempt gets a number of its own
        self.workers: dict[int, WorkerProcess] = {}
        self.notify = Notifier()
        self._route = route or signals.SignalRoute(signals.Wakeup(), signals.MASTER_SIGNALS)
        self._wakeup = self._route.wakeup
        self._selector = selectors.DefaultSelector()
        self._upgrader, self._handover = upgrader, handover
        self._settings = settings
        self._before_reload: tuple[Config, list[Any], int] | None = None  # to restore
        self.retiring: list[Any] = []  # servers of removed binds, closed when unused
        self._stopping: int = 0  # 0 running; SIGTERM graceful; SIGQUIT quick
        self._stop_deadline: float | None = None
        self._ever_ready = self._announced_ready = False
        self._boot_error: str | None = None
        self._backoff: dict[int, tuple[float, float]] = {}  # slot -> (delay, not before)
        self._slots = listeners.SlotSockets(config.backlog)
        self._recycler = Recycler(
            spawn=self.spawn_worker,
            retire=partial(self._signal, signum=signal.SIGTERM),
            may_start=lambda nr: self._backoff.get(nr, (0.0, 0.0))[1] <= time.monotonic(),
        )
        self._master_r = self._master_w = -1
        # prefork status: this master's facts; workers' pages are their heartbeats
        self._board = handover.board if handover and handover.board else random.getrandbits(31)
        self._served_by_exited = handover.served_by_exited if handover else 0
        self._status_page: MasterPage | None = None
        self._status_key: tuple[Any, ...] = ()
        Identity.resolve(config.user, config.group)  # an unknown user fails here, not at a fork
        self._poll_interval = 0.5
        self._next_watchdog = 0.0
        self._loop_errors = ErrorReport(log)
        self._handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: partial(self.stop, graceful=True),
            SHUTDOWN_CALLED: partial(self.stop, graceful=True),
            signal.SIGINT: partial(self.stop, graceful=False),
            signal.SIGQUIT: partial(self.stop, graceful=False),
            signal.SIGTTIN: partial(self.resize, +1),
            signal.SIGTTOU: partial(self.resize, -1),
            signal.SIGHUP: self.reload,
            signal.SIGUSR2: self.reexec,
            signal.SIGUSR1: self.reopen_logs,
            signal.SIGCHLD: lambda: None,  # only wakes us; reap_workers runs every turn
        }

    # -- public entry points ------------------------------------------------------------------
    def run(self, poll_interval: float = 0.5) -> None:
        """Spawn the pool and supervise it until stopped; return once every worker is gone."""
        self._poll_interval = poll_interval
        installed_here = not self._route.installed and self._route.install()
        title = get_title()
        set_title(f"prefork: master [{self.name}]")
        self._selector.register(self._wakeup.read_fd, selectors.EVENT_READ)
        self._status_page = MasterPage()
        self._publish_status()
        for server in self.servers:
            server.socket.setblocking(False)  # a worker that loses the accept race moves on
        if self._handover:
            self._adopt(self._handover)
        else:
            self._master_r, self._master_w = os.pipe()
        log.info(
            "prefork %s master (pid %d) serving %s with %d %s workers",
            __version__,
            os.getpid(),
            ", ".join(describe_address(s) for s in self.servers),
            self.target_workers,
            worker_model(self.servers[0]),
        )
        self._warn_about_timeouts()
        self._ensure_descriptors()
        self._hook("on_starting")
        try:
            self._loop()
        finally:
            self._kill_remaining()
            self._close_all()
            gc.unfreeze()  # a library host goes on: its objects are collectable again
            if installed_here:
                self._route.restore()
            set_title(title)
        if self._boot_error is not None:
            raise BootError(self._boot_error)
        log.info("master (pid %d) stopped", os.getpid())

    def request_stop(self, graceful: bool = True) -> None:
        """Ask the loop to stop; safe from any thread and from a signal handler."""
        self._wakeup.notify(SHUTDOWN_CALLED if graceful else signal.SIGQUIT)

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                if self._turn():
                    return
                timeout = self._seconds_to_next_deadline()
            except Exception as exc:
                # Unicorn's rule: the supervisor must outlive its own bugs and a bad
                # moment (EMFILE, ENOMEM, a hook's exception); the next turn retries.
                self._loop_errors.report(exc, "in the master's loop")
                timeout = LOOP_ERROR_PAUSE
            try:
                self._wait(timeout)
            except Exception as exc:
                self._loop_errors.report(exc, "while the master waited")
                time.sleep(LOOP_ERROR_PAUSE)

    def _turn(self) -> bool:
        """One turn of the loop; True once a stop has finished."""
        self._dispatch_signals()
        self.reap_workers()
        self.kill_stuck_workers()
        if not self._stopping:
            self._settle()
            self.spawn_missing()
        elif not self.workers:
            return True
        self._publish_status()
        return False

    def _wait(self, timeout: float | None) -> None:
        timeout = MAX_SLEEP if timeout is None else min(timeout, MAX_SLEEP)
        for key, _ in self._selector.select(timeout):
            if key.fd == self._wakeup.read_fd:
                self._wakeup.drain()
            else:
                self._read_status(key.data)

    def _seconds_to_next_deadline(self) -> float | None:
        now = time.monotonic()
        deadlines = [when for _, when in self._backoff.values()]
        if self._stop_deadline is not None:
            deadlines.append(self._stop_deadline)
        deadlines.extend(
            deadline for w in self.workers.values() if (deadline := self._deadline(w)) is not None
        )
        if self.notify.watchdog_interval:
            deadlines.append(self._next_watchdog)
        if self.config.max_rss:
            deadlines.append(self._recycler.next_memory_check)
        if not self._route.installed:  # no SIGCHLD: a status-pipe EOF may come late
            deadlines.append(now + self._poll_interval)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _dispatch_signals(self) -> None:
        while self._wakeup.pending:
            signum = self._wakeup.pending.popleft()
            if signum == SHUTDOWN_CALLED:
                log.info("shutdown() called")
            elif signum != signal.SIGCHLD:
                log.info("master got %s", signals.signal_name(signum))
            self._handlers.get(signum, lambda: None)()

    def _settle(self) -> None:
        """Announce readiness, finish a reload whose workers are all ready, ping systemd."""
        serving = self._generation_workers(self.generation)
        if not self._announced_ready and self._complete(serving):
            self._announced_ready = True
            self.notify.ready(f"serving with {len(serving)} workers")
            self._hook("when_ready")
        if self.reloading is not None and self._complete(self._generation_workers(self.reloading)):
            self._finish_reload()
        if self.retiring and all(w.generation >= self.generation for w in self.workers.values()):
            for server in self.retiring:
                log.info("closing %s: no longer configured", describe_address(server))
                self._slots.close_server(server)
                server.server_close()
            self.retiring = []
        if self.reloading is None:  # a reload replaces every worker anyway
            if self.config.max_rss and time.monotonic() >= self._recycler.next_memory_check:
                serving = self._generation_workers(self.generation)
                self._recycler.check_memory(serving, self.config.max_rss)
            self._recycler.step(self.workers, self.generation)
        if self.notify.watchdog_interval and time.monotonic() >= self._next_watchdog:
            self.notify.watchdog()
            self._next_watchdog = time.monotonic() + self.notify.watchdog_interval

    # -- workers ----------------------------------------------------------------------------------
    def spawn_missing(self) -> None:
        """Fork the workers that are missing, at most SPAWNS_PER_TURN per turn (the loop
        then turns again at once, having looked at the signals)."""
        now = time.monotonic()
        generations = (
            [self.generation] if self.reloading is None else [self.generation, self.reloading]
        )
        spawned = 0
        for generation in generations:
            busy = {w.nr for w in self._generation_workers(generation)}
            for nr in range(1, self.target_workers + 1):
                if nr not in busy and self._backoff.get(nr, (0.0, 0.0))[1] <= now:
                    if spawned == SPAWNS_PER_TURN:
                        self._wakeup.notify()  # more to do: do not sleep
                        return
                    self.spawn_worker(nr, generation)
                    spawned += 1

    def spawn_worker(self, nr: int, generation: int) -> WorkerProcess | None:
        identity = Identity.resolve(self.config.user, self.config.group)  # before any fd
        try:
            heartbeat = Heartbeat()
        except OSError as exc:  # EMFILE/ENOMEM: try this slot again later, do not die
            self._back_off(nr, f"cannot make worker {nr}'s status page: {exc.strerror}")
            return None
        try:
            status_r, status_w = os.pipe()
        except OSError as exc:
            heartbeat.close()
            self._back_off(nr, f"cannot make worker {nr}'s status pipe: {exc.strerror}")
            return None
        max_requests = self.config.max_requests and self.config.max_requests + random.randint(
            0, self.config.max_requests_jitter
        )
        spec = WorkerSpec(
            nr=nr,
            generation=generation,
            servers=self.servers,
            sockets=self._slots.for_slot(nr, self.servers),
            heartbeat=heartbeat,
            status_fd=status_w,
            master_fd=self._master_r,
            poll_interval=self._poll_interval,
            max_requests=max_requests,
            name=self.name,
            request_timeout=self.config.worker_timeout,
            loader=self.loader,
            inherited_fds=self._fds_not_for_worker(nr, status_r),
            inherited_pages=[w.heartbeat for w in self.workers.values() if w.heartbeat],
            access_log=self.config.access_log,
            identity=identity,
            watch_code=self.config.reload and nr == 1,
            log_format=self.config.log_format,
        )
        self._hook("pre_fork", WorkerInfo(nr, generation))
        try:
            # The objects the worker inherits go to the collector's permanent generation:
            # the worker's collections never traverse them, which costs CPU on every
            # request otherwise (measured: 190 -> 177 us per HTTP request; a bare pre-fork
            # loop, with fewer objects, 169) and would copy their pages on write.
            gc.freeze()
            with signals.blocked():
                pid = os.fork()
                if pid == 0:
                    try:
                        make_worker(spec, self.config.threads).run()  # never returns
                    finally:
                        os._exit(EXIT_BOOT_ERROR)  # never unwind into the master's loop
        except OSError as exc:  # EAGAIN/ENOMEM: try this slot again later, do not die
            for fd in (status_r, status_w):
                os.close(fd)
            heartbeat.close()
            self._back_off(nr, f"cannot fork worker {nr}: {exc.strerror}")
            return None
        os.close(status_w)
        heartbeat.identify(pid, nr, generation, self._board)
        worker = WorkerProcess(nr, pid, generation, status_r, heartbeat, time.monotonic())
        worker.watches_code, worker.max_requests = spec.watch_code, max_requests
        self.workers[pid] = worker
        self._selector.register(status_r, selectors.EVENT_READ, worker)
        log.debug("spawned worker %d (pid %d, generation %d)", nr, pid, generation)
        return worker

    def reap_workers(self) -> None:
        """Collect exited workers. Only our own pids: the host program may own other children."""
        for pid in list(self.workers):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else; it is gone all the same
                done, status = pid, 0
            if done:
                self._on_exit(self.workers.pop(pid), os.waitstatus_to_exitcode(status))

    def kill_stuck_workers(self) -> None:
        now = time.monotonic()
        if self._stop_deadline is not None and now >= self._stop_deadline:
            for worker in self.workers.values():
                log.error(
                    "worker %d (pid %d) did not stop in time; killing it", worker.nr, worker.pid
                )
                self._signal(worker, signal.SIGKILL)
            self._stop_deadline = None
        for worker in self.workers.values():
            deadline = self._deadline(worker)
            if deadline is None or now < deadline:
                continue
            if worker.kill_at is not None:  # its stack is in the log by now
                self._signal(worker, signal.SIGKILL)
                continue
            if not worker.ready:
                worker.boot_error = f"not ready within {self.config.boot_timeout:g}s"
            log.error("%s; dumping its stack, then killing it", self._why_stuck(worker))
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, STACK_DUMP_SIGNAL)
            worker.kill_at = now + STACK_DUMP_GRACE

    def reopen_logs(self) -> None:
        """USR1: reopen the log file here and in every worker (after logrotate moved it).
        A rotated access log is created here first, for the workers' user, who then
        reopen it."""
        # At once, not at the next line: the file must be there, the workers', before
        # they reopen it (they may not create it in a directory that is root's).
        if prefork_log.reopen(eagerly=True):
            log.info("reopened the log file; asking %d workers to do the same", len(self.workers))
        if self.config.access_log:
            try:
                owner = file_owner(Identity.resolve(self.config.user, self.config.group))
                prepare_access_log(self.config.access_log, owner)
            except PreforkError as exc:
                log.warning("%s; workers keep the access log they have", exc)
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGUSR1)

    def resize(self, delta: int) -> None:
        """TTIN/TTOU: one worker more or less, from one to MAX_WORKERS."""
        self.target_workers = min(MAX_WORKERS, max(1, self.target_workers + delta))
        log.info("pool size is now %d", self.target_workers)
        for worker in list(self.workers.values()):
            if worker.nr > self.target_workers and not worker.stop_sent:
                self._signal(worker, signal.SIGTERM)

    def stop(self, graceful: bool) -> None:
        """TERM: finish in-flight requests within graceful_timeout. INT/QUIT: now."""
        if graceful and self._stopping:
            return  # already stopping, at least as fast
        self._stopping = signal.SIGTERM if graceful else signal.SIGQUIT
        self.reloading = None
        wait = self.config.graceful_timeout if graceful else QUICK_STOP_GRACE
        self._stop_deadline = time.monotonic() + wait
        how = "gracefully" if graceful else "now"
        log.info("stopping %s (%d workers)", how, len(self.workers))
        self.notify.stopping(f"stopping {how}")
        for worker in self.workers.values():
            if graceful and worker.heartbeat:
                worker.heartbeat.request_drain()
            self._signal(worker, self._stopping)

    # -- reload -----------------------------------------------------------------------------------

    # -- helpers ----------------------------------------------------------------------------------
    def _on_exit(self, worker: WorkerProcess, code: int) -> None:
        self._read_status(worker)  # a boot error may still sit in the pipe
        with contextlib.suppress(KeyError):
            self._selector.unregister(worker.status_fd)
        os.close(worker.status_fd)
        if worker.heartbeat:
            self._served_by_exited += worker.heartbeat.requests_served()
            worker.heartbeat.close()
        how = describe_exit(code)
        if not worker.ready:
            self._on_boot_failure(worker, how)
        elif worker.stop_sent or self._stopping:
            log.info("worker %d (pid %d) %s", worker.nr, worker.pid, how)
        else:
            log.warning("worker %d (pid %d) %s unexpectedly", worker.nr, worker.pid, how)
        if worker.nr > self.target_workers and not any(
            w.nr == worker.nr for w in self.workers.values()
        ):
            self._slots.close_slot(worker.nr)

    def _on_boot_failure(self, worker: WorkerProcess, how: str) -> None:
        cause = worker.boot_error or how
        if self._stopping:
            return
        if worker.generation == self.reloading:
            self._abandon_reload(
                f"worker {worker.nr} of generation {worker.generation} failed to boot: {cause}"
            )
        elif worker.generation != self.generation or (worker.stop_sent and not worker.boot_error):
            return  # stopped on purpose (TTOU, an abandoned reload): not a boot failure
        elif not self._ever_ready:  # nothing ever worked: fail fast, do not loop
            log.error("worker %d (pid %d) failed to boot: %s", worker.nr, worker.pid, cause)
            self._boot_error = cause
            self.stop(graceful=False)
        else:
            self._back_off(
                worker.nr, f"worker {worker.nr} (pid {worker.pid}) failed to boot: {cause}"
            )

    def _back_off(self, nr: int, why: str) -> None:
        """Retry slot ``nr`` later, doubling the delay each time: never a fork storm."""
        delay = min(self._backoff.get(nr, (BACKOFF_START / 2, 0.0))[0] * 2, BACKOFF_CAP)
        self._backoff[nr] = (delay, time.monotonic() + delay)
        log.error("%s; retrying in %.1fs", why, delay)

    def _read_status(self, worker: WorkerProcess) -> None:
        """A worker's status pipe, read as untrusted input (the app may be compromised,
        the master may be root): each message is honoured only where the protocol
        allows it (READY and a boot error while booting, RELOAD from the worker that
        watches code under --reload, RETIRE under --max-requests); anything else is
        ignored with one line, and a worker that keeps it up is killed."""
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
            self._on_status_message(worker, bytes((message,)))

    def _on_status_message(self, worker: WorkerProcess, message: bytes) -> None:
        if message == READY and not worker.ready:
            worker.ready = self._ever_ready = True
            self._backoff.pop(worker.nr, None)
            if worker.heartbeat:
                worker.heartbeat.beat()
                worker.heartbeat.set_state(PAGE_READY)
            log.info("worker %d (pid %d) booted", worker.nr, worker.pid)
        elif message == RELOAD and worker.ready and worker.watches_code and self.config.reload:
            current = worker.generation == self.generation and self.reloading is None
            if current and not self._stopping:
                log.info("--reload: worker %d saw the code change; reloading", worker.nr)
                self.reload()
        elif message == RETIRE and worker.ready and worker.max_requests:
            if not worker.stop_sent:
                served = worker.heartbeat.requests_served() if worker.heartbeat else 0
                self._recycler.request(worker, f"served {served} requests")
        else:
            worker.unexpected += 1
            if worker.unexpected == 1:
                log.warning(
                    "worker %d (pid %d) wrote %r to its status pipe, which it may not; ignored",
                    worker.nr,
                    worker.pid,
                    message,
                )
            elif worker.unexpected == UNEXPECTED_LIMIT and not worker.stop_sent:
                log.error(
                    "worker %d (pid %d) keeps writing to its status pipe out of turn; killing it",
                    worker.nr,
                    worker.pid,
                )
                self._signal(worker, signal.SIGKILL)

    def _why_stuck(self, worker: WorkerProcess) -> str:
        """One line naming the slot, the PID and what it was stuck on."""
        who = f"worker {worker.nr} (pid {worker.pid})"
        if not worker.ready or worker.heartbeat is None:
            return f"{who} was {worker.boot_error}"
        if worker.heartbeat.last() is None:
            return f"{who} wrote an impossible time into its heartbeat page"
        current = worker.heartbeat.current_request()
        if current is None:
            return f"{who} timed out: its loop has not run for {self.config.worker_timeout:g}s"
        seconds, client = current
        return (
            f"{who} timed out: its request from {client} has run {seconds:.1f}s "
            f"(--timeout {self.config.worker_timeout:g})"
        )

    def _deadline(self, worker: WorkerProcess) -> float | None:
        """When this worker will be overdue: heartbeat when ready, boot otherwise."""
        if worker.stop_sent or worker.heartbeat is None:
            return None
        if worker.kill_at is not None:
            return worker.kill_at
        if worker.ready:
            last = worker.heartbeat.last()
            if last is None:  # a page that is not what workers write: a stuck worker
                return worker.started
            timeout = self.config.worker_timeout
            return last + timeout if timeout else None
        timeout = self.config.boot_timeout
        return worker.started + timeout if timeout else None

    def _complete(self, workers: list[WorkerProcess]) -> bool:
        """All slots 1..N present and ready."""
        ready = {w.nr for w in workers if w.ready and not w.stop_sent}
        return ready >= set(range(1, self.target_workers + 1))

    def _publish_status(self) -> None:
        """What `prefork status` shows of the master; written only when it changed."""
        if self._status_page is None:
            return
        if self._stopping:
            state = "stopping"
        elif self.reloading is not None:
            state = "reloading"
        else:
            state = "serving" if self._announced_ready else "starting"
        # Called on every turn of the loop: compare the few facts that change before
        # building the JSON (a reload turns the loop often).
        key = (
            state,
            self.generation,
            self.reloading,
            self.target_workers,
            self._served_by_exited,
            tuple(map(id, self.servers)),
            tuple((w.pid, w.generation) for w in self.workers.values()),
        )
        if key == self._status_key:
            return
        self._status_key = key
        self._status_page.publish(
            {
                "board": self._board,
                "pid": os.getpid(),
                "name": self.name,
                "version": __version__,
                "state": state,
                "generation": self.generation,
                "reloading": self.reloading,
                "workers": self.target_workers,
                "worker_class": worker_model(self.servers[0]),
                "binds": [describe_address(s) for s in self.servers],
                "served_by_exited": self._served_by_exited,
                # Which pages are whose, by the master's own records: a worker can
                # write anything into its page, its pid included.
                "pages": [
                    [w.pid, w.nr, w.generation, w.heartbeat.fileno()]
                    for w in self.workers.values()
                    if w.heartbeat is not None
                ],
            }
        )

    def _warn_about_timeouts(self) -> None:
        config = self.config
        sync = worker_model(self.servers[0]) == "sync"
        if sync and config.worker_timeout and config.client_timeout >= config.worker_timeout:
            log.warning(
                "--client-timeout %g is not below --timeout %g: a silent client gets a sync "
                "worker killed before it is disconnected",
                config.client_timeout,
                config.worker_timeout,
            )

    def _ensure_descriptors(self) -> None:
        """Raise the soft RLIMIT_NOFILE when the pool needs more descriptors than it
        allows: each worker costs the master a status pipe and a page (two descriptors
        before Python 3.13), plus one socket per --reuse-port bind, and a reload needs
        the double."""
        per_worker = 3 + len(self.servers)
        needed = 64 + 2 * self.config.workers * per_worker
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or needed <= soft:
            return
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if needed > soft:
            log.warning(
                "%d workers need about %d descriptors in the master, and the limit is %d "
                "(ulimit -n): some workers or a reload may fail to start",
                self.config.workers,
                needed,
                soft,
            )

    def _kill_remaining(self) -> None:
        """Last resort on the way out (an exception in the loop): leave no child behind."""
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)
            os.close(worker.status_fd)
            if worker.heartbeat:
                worker.heartbeat.close()
        self.workers.clear()

    def _close_all(self) -> None:
        if self._status_page:
            self._status_page.close()
        self._selector.close()
        self.notify.close()
        for fd in (self._master_r, self._master_w):
            os.close(fd)
        self._slots.close_all()

    def _fds_not_for_worker(self, nr: int, status_r: int) -> list[int]:
        """What a new worker inherits but must close: the master's pipes and the other
        slots' reuse-port sockets."""
        fds = [
            self._wakeup.read_fd,
            self._wakeup.write_fd,
            self._master_w,
            status_r,
            self._selector.fileno(),
        ]
        fds.extend(w.status_fd for w in self.workers.values())
        if self._status_page:
            fds.append(self._status_page.fileno())
        fds.extend(self._slots.fds_except(nr))
        return fds
