"""Arbiter: the master. It binds nothing and serves nothing; it keeps N workers alive.

One flat loop: dispatch queued signals, reap exited workers, kill stuck ones, spawn
missing ones, then sleep on the self-pipe until the next deadline. Signals (SIGCHLD
included) and other threads only queue and wake; every decision is made in the loop.

Workers report over a status pipe each: one byte when ready, or a one-line boot error.
EOF on it means the worker is gone, which also wakes a master that has no signal
handlers (one running outside the main thread). A second pipe, which only the master
writes to, tells workers the master died: they see EOF and leave.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from . import listeners, signals
from .config import Config
from .errors import EXIT_BOOT_ERROR, BootError
from .heartbeat import Heartbeat
from .listeners import describe_address
from .process import describe_exit, get_title, set_title
from .version import __version__
from .workers import make_worker, worker_model
from .workers.base import BOOT_ERROR, READY, Loader, WorkerSpec

log = logging.getLogger("prefork.arbiter")

SHUTDOWN_CALLED = -1  # queued like a signal by shutdown() from another thread
QUICK_STOP_GRACE = 1.0  # seconds a quick-stopped worker gets before SIGKILL
BACKOFF_START, BACKOFF_CAP = 0.1, 10.0  # retry delays of a slot whose worker fails to boot


@dataclass
class WorkerProcess:
    """The master's record of one worker."""

    nr: int
    pid: int
    generation: int
    status_fd: int
    heartbeat: Heartbeat
    started: float
    ready: bool = False
    stop_sent: int = 0  # the signal we sent to stop it, if any
    boot_error: str = ""


class Arbiter:
    """Supervise a pool of workers serving ``servers`` (already bound, in this process)."""

    def __init__(
        self,
        servers: Sequence[Any],
        config: Config,
        *,
        name: str,
        loader: Loader | None = None,
        route: signals.SignalRoute | None = None,
    ) -> None:
        self.servers = list(servers)
        self.config = config
        self.name = name
        self.loader = loader
        self.target_workers = config.workers
        self.generation = 1
        self.workers: dict[int, WorkerProcess] = {}
        self._route = route or signals.SignalRoute(signals.Wakeup(), signals.MASTER_SIGNALS)
        self._wakeup = self._route.wakeup
        self._selector = selectors.DefaultSelector()
        self._stopping: int = 0  # 0 running; SIGTERM graceful; SIGQUIT quick
        self._stop_deadline: float | None = None
        self._ever_ready = False
        self._boot_error: str | None = None
        self._backoff: dict[int, tuple[float, float]] = {}  # slot -> (delay, not before)
        self._own_sockets: dict[int, list[socket.socket | None]] = {}  # slot -> reuse-port
        self._master_r = self._master_w = -1
        self._poll_interval = 0.5
        self._handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: partial(self.stop, graceful=True),
            SHUTDOWN_CALLED: partial(self.stop, graceful=True),
            signal.SIGINT: partial(self.stop, graceful=False),
            signal.SIGQUIT: partial(self.stop, graceful=False),
            signal.SIGTTIN: partial(self.resize, +1),
            signal.SIGTTOU: partial(self.resize, -1),
            signal.SIGHUP: partial(self._not_yet, "HUP (reload)"),
            signal.SIGUSR2: partial(self._not_yet, "USR2 (upgrade)"),
            signal.SIGUSR1: partial(self._not_yet, "USR1 (reopen logs)"),
            signal.SIGCHLD: lambda: None,  # only wakes us; reap_workers runs every turn
        }

    # -- public entry points ------------------------------------------------------------------
    def run(self, poll_interval: float = 0.5) -> None:
        """Spawn the pool and supervise it until stopped; return once every worker is gone."""
        self._poll_interval = poll_interval
        installed_here = not self._route.installed and self._route.install()
        title = get_title()
        set_title(f"prefork: master [{self.name}]")
        self._master_r, self._master_w = os.pipe()
        self._selector.register(self._wakeup.read_fd, selectors.EVENT_READ)
        for server in self.servers:
            server.socket.setblocking(False)  # a worker that loses the accept race moves on
        log.info(
            "prefork %s master (pid %d) serving %s with %d %s workers",
            __version__,
            os.getpid(),
            ", ".join(describe_address(s) for s in self.servers),
            self.target_workers,
            worker_model(self.servers[0]),
        )
        try:
            self._loop()
        finally:
            self._kill_remaining()
            self._selector.close()
            for fd in (self._master_r, self._master_w):
                os.close(fd)
            for own in self._own_sockets.values():
                for sock in own:
                    if sock is not None:
                        sock.close()
            self._own_sockets.clear()
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
            self._dispatch_signals()
            self.reap_workers()
            self.kill_stuck_workers()
            if not self._stopping:
                self.spawn_missing()
            elif not self.workers:
                return
            self._wait(self._seconds_to_next_deadline())

    def _wait(self, timeout: float | None) -> None:
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
        timeout = self.config.worker_timeout
        if timeout:
            deadlines.extend(
                self._last_sign_of_life(w) + timeout
                for w in self.workers.values()
                if not w.stop_sent
            )
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

    # -- workers ----------------------------------------------------------------------------------
    def spawn_missing(self) -> None:
        busy = {w.nr for w in self.workers.values()}
        now = time.monotonic()
        for nr in range(1, self.target_workers + 1):
            if nr not in busy and self._backoff.get(nr, (0.0, 0.0))[1] <= now:
                self.spawn_worker(nr)

    def spawn_worker(self, nr: int) -> None:
        heartbeat = Heartbeat()
        status_r, status_w = os.pipe()
        spec = WorkerSpec(
            nr=nr,
            generation=self.generation,
            servers=self.servers,
            sockets=self._slot_sockets(nr),
            heartbeat=heartbeat,
            status_fd=status_w,
            master_fd=self._master_r,
            poll_interval=self._poll_interval,
            max_requests=self.config.max_requests,
            name=self.name,
            loader=self.loader,
            inherited_fds=self._fds_not_for_worker(nr, status_r),
        )
        try:
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
            return
        os.close(status_w)
        worker = WorkerProcess(nr, pid, self.generation, status_r, heartbeat, time.monotonic())
        self.workers[pid] = worker
        self._selector.register(status_r, selectors.EVENT_READ, worker)
        log.debug("spawned worker %d (pid %d)", nr, pid)

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
        timeout = self.config.worker_timeout
        for worker in self.workers.values():
            if timeout and not worker.stop_sent and now - self._last_sign_of_life(worker) > timeout:
                state = "to boot" if not worker.ready else "without a heartbeat"
                log.error(
                    "worker %d (pid %d) took more than %gs %s; killing it",
                    worker.nr,
                    worker.pid,
                    timeout,
                    state,
                )
                self._signal(worker, signal.SIGKILL)

    def resize(self, delta: int) -> None:
        """TTIN/TTOU: one worker more or less, never fewer than one."""
        self.target_workers = max(1, self.target_workers + delta)
        log.info("pool size is now %d", self.target_workers)
        for worker in list(self.workers.values()):
            if worker.nr > self.target_workers and not worker.stop_sent:
                self._signal(worker, signal.SIGTERM)

    def stop(self, graceful: bool) -> None:
        """TERM: finish in-flight requests within graceful_timeout. INT/QUIT: now."""
        if graceful and self._stopping:
            return  # already stopping, at least as fast
        self._stopping = signal.SIGTERM if graceful else signal.SIGQUIT
        wait = self.config.graceful_timeout if graceful else QUICK_STOP_GRACE
        self._stop_deadline = time.monotonic() + wait
        log.info("stopping %s (%d workers)", "gracefully" if graceful else "now", len(self.workers))
        for worker in self.workers.values():
            self._signal(worker, self._stopping)

    # -- helpers ----------------------------------------------------------------------------------
    def _on_exit(self, worker: WorkerProcess, code: int) -> None:
        self._read_status(worker)  # a boot error may still sit in the pipe
        with contextlib.suppress(KeyError):
            self._selector.unregister(worker.status_fd)
        os.close(worker.status_fd)
        worker.heartbeat.close()
        how = describe_exit(code)
        if not worker.ready:
            self._on_boot_failure(worker, how)
        elif worker.stop_sent or self._stopping:
            log.info("worker %d (pid %d) %s", worker.nr, worker.pid, how)
        else:
            log.warning("worker %d (pid %d) %s unexpectedly", worker.nr, worker.pid, how)
        if worker.nr > self.target_workers:
            for sock in self._own_sockets.pop(worker.nr, []):
                if sock is not None:
                    sock.close()

    def _on_boot_failure(self, worker: WorkerProcess, how: str) -> None:
        cause = worker.boot_error or how
        if self._stopping:
            return
        if not self._ever_ready:  # nothing ever worked: fail fast, do not loop
            log.error("worker %d (pid %d) failed to boot: %s", worker.nr, worker.pid, cause)
            self._boot_error = cause
            self.stop(graceful=False)
            return
        self._back_off(worker.nr, f"worker {worker.nr} (pid {worker.pid}) failed to boot: {cause}")

    def _back_off(self, nr: int, why: str) -> None:
        """Retry slot ``nr`` later, doubling the delay each time: never a fork storm."""
        delay = min(self._backoff.get(nr, (BACKOFF_START / 2, 0.0))[0] * 2, BACKOFF_CAP)
        self._backoff[nr] = (delay, time.monotonic() + delay)
        log.error("%s; retrying in %.1fs", why, delay)

    def _read_status(self, worker: WorkerProcess) -> None:
        try:
            data = os.read(worker.status_fd, 4096)
        except OSError:
            return
        if not data:  # the worker is gone; reap_workers will collect it
            with contextlib.suppress(KeyError):
                self._selector.unregister(worker.status_fd)
            return
        if data.startswith(READY) and not worker.ready:
            worker.ready = self._ever_ready = True
            self._backoff.pop(worker.nr, None)
            worker.heartbeat.beat()
            log.info("worker %d (pid %d) booted", worker.nr, worker.pid)
        elif data.startswith(BOOT_ERROR):
            worker.boot_error = data[1:].decode("utf-8", "replace")

    def _last_sign_of_life(self, worker: WorkerProcess) -> float:
        return worker.heartbeat.last() if worker.ready else worker.started

    def _signal(self, worker: WorkerProcess, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)
        if signum != signal.SIGKILL or not worker.stop_sent:
            worker.stop_sent = signum

    def _kill_remaining(self) -> None:
        """Last resort on the way out (an exception in the loop): leave no child behind."""
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)
            os.close(worker.status_fd)
            worker.heartbeat.close()
        self.workers.clear()

    def _slot_sockets(self, nr: int) -> list[socket.socket | None]:
        """With reuse_port, every slot after the first gets its own sibling sockets."""
        if not self.config.reuse_port or nr == 1:
            return [None] * len(self.servers)
        if nr not in self._own_sockets:
            self._own_sockets[nr] = [
                listeners.open_sibling(s.socket, self.config.backlog)
                if getattr(s, "_prefork_reuse_port", False)
                else None
                for s in self.servers
            ]
        return self._own_sockets[nr]

    def _fds_not_for_worker(self, nr: int, status_r: int) -> list[int]:
        """What a new worker inherits but must close: the master's pipes, and the other
        slots' reuse-port sockets (a copy kept open in the wrong worker would hold a dead
        queue in the kernel's reuse-port group after its slot is gone)."""
        fds = [
            self._wakeup.read_fd,
            self._wakeup.write_fd,
            self._master_w,
            status_r,
            self._selector.fileno(),
        ]
        fds.extend(w.status_fd for w in self.workers.values())
        for slot, own in self._own_sockets.items():
            if slot != nr:
                fds.extend(sock.fileno() for sock in own if sock is not None)
        return fds

    def _not_yet(self, what: str) -> None:
        log.warning("%s is not supported by this version of prefork; ignored", what)
