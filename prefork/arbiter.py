"""Arbiter: the master. It serves nothing; it runs the loop and carries out decisions.

One flat loop: dispatch queued signals, reap exited workers, act on the deadlines that
have come, settle a reload, spawn what is missing, then sleep on the self-pipe until the
next deadline. Signals (SIGCHLD included) and other threads only queue and wake; every
decision is made in the loop, by the collaborators the arbiter owns:

- ``Pool`` (pool.py): the workers' records, each in one state with one deadline, the
  generations, the backoff; it decides, and calls back here (``Effects``) to fork,
  signal, read a page or close a socket.
- ``Recycler`` (recycle.py): --max-requests and --max-rss, one slot at a time.
- ``Upgrade`` (upgrade.py): USR2, the handover to the next image of this process.

Workers report over a status pipe each (``_read_status``, untrusted input). A second
pipe, which only the master writes to, tells workers the master died, and the kernel
kills them anyway (PR_SET_PDEATHSIG) if it dies in a way they could not see.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from . import log as prefork_log
from . import signals
from .access import prepare_access_log
from .config import Config
from .errors import BootError, PreforkError
from .generations import Generation, Generations
from .handover import Handover
from .heartbeat import STOPPING as PAGE_STOPPING
from .identity import Identity, file_owner
from .lifecycle import Reading, WorkerProcess
from .listeners import SlotSockets, describe_address, describe_server
from .pool import Pool
from .process import describe_exit, get_title, set_title
from .reconfigure import Reconfigurer, next_settings
from .recycle import Recycler
from .spawner import Spawner
from .statuspage import MasterPage, master_facts
from .statuspipe import StatusPipes
from .supervision import ErrorReport, ensure_descriptors, warn_about_timeouts
from .systemd import Notifier
from .upgrade import Upgrade, Upgrader
from .version import __version__
from .worker_process import WorkerInfo
from .workers import worker_model
from .workers.base import (
    STACK_DUMP_SIGNAL,
    Loader,
)

log = logging.getLogger("prefork.arbiter")

SHUTDOWN_CALLED = -1  # queued like a signal by shutdown() from another thread
# The longest sleep of the loop. Deadlines further away (any finite timeout is allowed)
# are simply slept towards in steps: select() cannot take a timeout of 30 days.
MAX_SLEEP = 10.0
LOOP_ERROR_PAUSE = 0.1  # after a failed turn of the loop: a persistent failure cannot spin


class Arbiter:
    """Supervise a pool of workers serving ``servers`` (already bound, in this process).

    ``settings``: how HUP re-reads the settings (``prefork run``); without it a HUP
    restarts the workers with the settings they have. ``reap_orphans``: this process is
    PID 1 or a subreaper, and reaps every child re-parented to it (``prefork run``; a
    library host keeps its other children). ``close_listeners_on_stop``: the sockets are
    the master's alone (``prefork run``), closed as a stop begins so that, once the
    workers have served what was queued, new connections are refused, not reset.
    ``reload_by_reexec``: the app's code is in this process (--preload, a server class
    as the app), so a HUP reloads it as USR2 does, by re-executing (with an upgrader).
    """

    def __init__(
        self,
        servers: Sequence[Any],
        config: Config,
        *,
        name: str,
        loader: Loader | None = None,
        reload_by_reexec: bool = False,
        route: signals.SignalRoute | None = None,
        upgrader: Upgrader | None = None,
        handover: Handover | None = None,
        settings: Reconfigurer | None = None,
        reap_orphans: bool = False,
        close_listeners_on_stop: bool = False,
        notify: Notifier | None = None,
    ) -> None:
        first = Generation(
            handover.generation if handover else 1, config, list(servers), config.workers
        )
        self.generations = Generations(first, newest=handover.newest if handover else 0)
        self.pool = Pool(self, self.generations)
        self.name = name
        self.notify = notify or Notifier()  # prefork run's took the environment's at start
        self._route = route or signals.SignalRoute(signals.Wakeup(), signals.MASTER_SIGNALS)
        self._wakeup = self._route.wakeup
        self._selector = selectors.DefaultSelector()
        self._settings, self._handover = settings, handover
        self._reload_by_reexec = reload_by_reexec
        self.upgrade_problem: str | None = None  # why this image runs the old settings
        self._upgrade = Upgrade(upgrader) if upgrader else None
        self._reap_orphans, self._close_on_stop = reap_orphans, close_listeners_on_stop
        self.slots = SlotSockets(config.backlog)
        self._recycler = Recycler(
            spawn=lambda nr, number: self.pool.spawn(
                nr, self._generation(number), time.monotonic()
            ),
            retire=lambda worker: self.pool.stop_worker(worker, time.monotonic()),
            may_start=lambda nr: self.pool.backoff.may_start(
                (self.generations.serving.number, nr), time.monotonic()
            ),
        )
        self.master_pipe = (-1, -1)  # the pipe only the master writes to (never does)
        # prefork status: this master's facts; workers' pages are their heartbeats
        self.board = handover.board if handover and handover.board else _new_board_id()
        self._spawner = Spawner(
            self.slots,
            name,
            loader,
            self.board,
            pre_fork=partial(self._hook, "pre_fork"),
            siblings=lambda: self.pool.workers.values(),
        )
        self.served_by_exited = handover.served_by_exited if handover else 0
        self._status_page: MasterPage | None = None
        self._status_key: tuple[Any, ...] = ()
        self._announced_ready = False
        self._poll_interval = 0.5
        self._next_watchdog = 0.0
        self._loop_errors = ErrorReport(log)
        self._status = StatusPipes(
            self.pool,
            self._selector,
            reload=self.reload,
            recycle=self._recycler.request,
            reloading=lambda: bool(self.config.reload),
        )
        Identity.resolve(config.user, config.group)  # an unknown user fails here, not at a fork
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

    @property
    def config(self) -> Config:
        """The serving generation's settings."""
        return self.generations.serving.config

    @property
    def servers(self) -> list[Any]:
        """Every server not closed yet, of any generation (what to close on the way out)."""
        return self.generations.every_server()

    # -- public entry points ------------------------------------------------------------------
    def run(self, poll_interval: float = 0.5) -> None:
        """Spawn the pool and supervise it until stopped; return once every worker is gone."""
        self._poll_interval = poll_interval
        installed_here = not self._route.installed and self._route.install()
        title = get_title()
        set_title(f"prefork: master [{self.name}]")
        self._selector.register(self._wakeup.read_fd, selectors.EVENT_READ)
        self._status_page = MasterPage()
        for server in self.generations.serving.servers:
            server.socket.setblocking(False)  # a worker that loses the accept race moves on
        if self._handover:
            self._adopt(self._handover)
        else:
            self.master_pipe = os.pipe()
        self._spawner.master_fd, self._spawner.poll_interval = self.master_pipe[0], poll_interval
        self._spawner.note_host_descriptors(self._prefork_descriptors())
        serving = self.generations.serving
        log.info(
            "prefork %s master (pid %d) serving %s with %d %s workers",
            __version__,
            os.getpid(),
            ", ".join(describe_server(s) for s in serving.servers),
            serving.size,
            worker_model(serving.servers[0]),
        )
        warn_about_timeouts(self.config, worker_model(serving.servers[0]))
        ensure_descriptors(self.config.workers, len(serving.servers))
        self._hook("on_starting")
        if self._handover:  # on_starting first, then on_reload: the order of a start
            self.start_reload()  # and settings changed in the config file meanwhile
        try:
            self._loop()
        finally:
            self._kill_remaining()
            self._close_all()
            gc.unfreeze()  # a library host goes on: its objects are collectable again
            if installed_here:
                self._route.restore()
            set_title(title)
        if self.pool.boot_error is not None:
            raise BootError(self.pool.boot_error)
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
        now = time.monotonic()
        if self._upgrade is not None:
            self._upgrade.poll(self, now)
        self.pool.check_deadlines(now)
        if self.pool.stopping:
            if not self.pool.workers:
                return True
        else:
            self._settle(now)
            self.pool.spawn_missing(now)
        if self.notify.watchdog_interval and now >= self._next_watchdog:  # in every mode
            self.notify.watchdog()
            self._next_watchdog = now + self.notify.watchdog_interval
        self._publish_status()
        return False

    def _wait(self, timeout: float | None) -> None:
        timeout = MAX_SLEEP if timeout is None else max(0.0, min(timeout, MAX_SLEEP))
        for key, _ in self._selector.select(timeout):
            if key.fd == self._wakeup.read_fd:
                self._wakeup.drain()
            else:
                self._status.read(key.data)

    def _seconds_to_next_deadline(self) -> float | None:
        """Until the nearest deadline the loop will act on in its current mode."""
        now = time.monotonic()
        deadlines = [self.pool.next_deadline(now)]
        if self._upgrade is not None:
            deadlines.append(self._upgrade.deadline())
        if self.notify.watchdog_interval:
            deadlines.append(self._next_watchdog)
        if self._memory_checked():
            deadlines.append(self._recycler.next_memory_check)
        if not self._route.installed:  # no SIGCHLD: a status-pipe EOF may come late
            deadlines.append(now + self._poll_interval)
        live = [d for d in deadlines if d is not None]
        return max(0.0, min(live) - now) if live else None

    def _memory_checked(self) -> bool:
        """--max-rss is checked only while serving: a reload replaces every worker anyway."""
        return bool(self.config.max_rss) and not self.pool.stopping and not self.pool.starting

    def _dispatch_signals(self) -> None:
        while self._wakeup.pending:
            signum = self._wakeup.pending.popleft()
            if signum == SHUTDOWN_CALLED:
                log.info("shutdown() called")
            elif signum != signal.SIGCHLD:
                log.info("master got %s", signals.signal_name(signum))
            self._handlers.get(signum, lambda: None)()

    def _settle(self, now: float) -> None:
        """Announce readiness, settle a reload, recycle, start a HUP that waited."""
        pool, generations = self.pool, self.generations
        if not self._announced_ready and pool.complete(generations.serving):
            self._announced_ready = True
            self.notify.ready(f"serving with {generations.serving.size} workers")
            self._hook("when_ready")
        pool.settle(now)
        self._spawner.forget(self.generations.known)
        if generations.starting is None:
            if self._memory_checked() and now >= self._recycler.next_memory_check:
                self._recycler.check_memory(pool.of(generations.serving), self.config.max_rss)
            self._recycler.step(pool.workers, generations.serving.number)
            checking = self._upgrade is not None and self._upgrade.checking
            if generations.pending and not checking:  # a HUP came during a reload or check
                generations.pending = False
                self.start_reload()

    # -- signals ----------------------------------------------------------------------------------
    def reap_workers(self) -> None:
        """Collect exited workers: our own pids only, unless this process is PID 1 (or a
        subreaper), where orphans of any kind end up and must be reaped too."""
        if self._reap_orphans:
            self._reap_any()
            return
        for pid in list(self.pool.workers):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else; it is gone all the same
                done, status = pid, 0
            if done:
                self._exited(pid, status)

    def _reap_any(self) -> None:
        while True:
            # Look before reaping: the upgrade's check child is subprocess's to reap.
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            check = self._upgrade.check if self._upgrade is not None else None
            if check is not None and pid == check.pid:
                self._upgrade.poll(self, time.monotonic())  # type: ignore[union-attr]
                continue
            _, status = os.waitpid(pid, os.WNOHANG)
            if pid in self.pool.workers:
                self._exited(pid, status)
            else:
                log.debug("reaped pid %d, re-parented to this PID 1", pid)

    def _exited(self, pid: int, status: int) -> None:
        worker = self.pool.workers[pid]
        self._status.read(worker)  # a boot error may still sit in the pipe
        with contextlib.suppress(KeyError):
            self._selector.unregister(worker.status_fd)
        os.close(worker.status_fd)
        if worker.heartbeat:
            self.served_by_exited += worker.heartbeat.requests_served()
            worker.heartbeat.close()
        code = os.waitstatus_to_exitcode(status)
        self.pool.exited(pid, describe_exit(code), time.monotonic())
        self._hook("child_exit", WorkerInfo(worker.nr, worker.generation, pid), code)

    def reopen_logs(self) -> None:
        """USR1: reopen the log file here and in every worker (after logrotate moved it).
        A rotated access log is created here first, for the workers' user, who then
        reopen it."""
        # At once, not at the next line: the file must be there, the workers', before
        # they reopen it (they may not create it in a directory that is root's).
        if prefork_log.reopen(eagerly=True):
            log.info(
                "reopened the log file; asking %d workers to do the same", len(self.pool.workers)
            )
        if self.config.access_log:
            try:
                owner = file_owner(Identity.resolve(self.config.user, self.config.group))
                prepare_access_log(self.config.access_log, owner)
            except PreforkError as exc:
                log.warning("%s; workers keep the access log they have", exc)
        for worker in self.pool.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGUSR1)

    def resize(self, delta: int) -> None:
        """TTIN/TTOU: one worker more or less, from one to MAX_WORKERS."""
        old = self.generations.serving.size
        self.pool.resize(delta, time.monotonic())
        if self.generations.serving.size != old:
            self._hook("nworkers_changed", self.generations.serving.size, old)

    def stop(self, graceful: bool) -> None:
        """TERM: finish in-flight requests within graceful_timeout. INT/QUIT: now."""
        if self.pool.stopping == "quick" or (graceful and self.pool.stopping):
            return  # already stopping, at least as fast
        how = "gracefully" if graceful else "now"
        log.info("stopping %s (%d workers)", how, len(self.pool.workers))
        self.notify.stopping(f"stopping {how}")
        if self._upgrade is not None:
            self._upgrade.cancel()  # an upgrade being checked does not happen
        self.pool.stop(graceful, time.monotonic())
        if self._close_on_stop:
            self.slots.close_all()
            for server in self.servers:
                with contextlib.suppress(OSError):
                    server.socket.close()  # the workers' copies close once they drained

    def reload(self) -> None:
        """HUP: a new generation beside the serving one; the old one stops once all are ready.
        A HUP during a reload is remembered, and reloads again once that one settles."""
        if self.pool.stopping:
            log.warning("stopping; HUP ignored")
        elif self.generations.starting is not None:
            self.generations.pending = True
            log.info("a reload is under way; reloading again once it settles")
        elif self._upgrade is not None and self._upgrade.checking:
            self.generations.pending = True
            log.info("an upgrade is being checked; reloading once it is decided")
        elif self._reload_by_reexec and self._upgrade is not None:
            log.info("the app's code is in the master: reloading by re-executing it")
            self.reexec()
        else:
            self.start_reload()

    def start_reload(self) -> None:
        """Re-read the settings (if we can), then start the next generation."""
        self.notify.reloading("reloading")
        serving = self.generations.serving
        config, servers = serving.config, serving.servers
        if self._settings is not None:
            try:
                config, servers = next_settings(self._settings, serving)
            except PreforkError as exc:
                log.error("reload abandoned, generation %d keeps serving: %s", serving.number, exc)
                self.notify.reload_failed(f"serving with {serving.size} workers", str(exc))
                return
        starting = self.pool.begin_reload(config, servers, time.monotonic())
        self._hook("on_reload")
        log.info(
            "reloading: starting generation %d beside generation %d",
            starting.number,
            serving.number,
        )

    def reexec(self) -> None:
        """USR2: check the new start, then re-execute this master in place (same PID)."""
        if self._upgrade is None:
            log.warning("USR2 (upgrade in place) needs `prefork run`; ignored")
        elif self._upgrade.checking:
            log.warning("an upgrade is being checked already; USR2 ignored")
        elif self.pool.stopping or self.generations.starting is not None:
            log.warning("a reload or stop is already under way; USR2 ignored")
        else:
            self._upgrade.begin(self)

    # -- Effects: what the pool's decisions call for ---------------------------------------
    def fork(self, nr: int, generation: Generation, now: float) -> WorkerProcess | None:
        worker = self._spawner.fork(nr, generation, now)
        if worker is not None:
            self._selector.register(worker.status_fd, selectors.EVENT_READ, worker)
        return worker

    def signal(self, worker: WorkerProcess, signum: int, drain: bool = False) -> None:
        # A worker whose --reuse-port socket nobody will serve after it (the new image
        # after a USR2 turned reuse_port off) serves what is queued there before leaving.
        drain = drain or (signum == signal.SIGTERM and self._slot_without_successor(worker))
        if worker.heartbeat:
            if drain:
                worker.heartbeat.request_drain()
            worker.heartbeat.set_state(PAGE_STOPPING)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)

    def dump_stack(self, worker: WorkerProcess) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, STACK_DUMP_SIGNAL)

    def read(self, worker: WorkerProcess) -> Reading:
        if worker.heartbeat is None:  # adopted without a page: nothing to go by
            return Reading(time.monotonic(), None)
        return Reading(*worker.heartbeat.reading())

    def close(self, servers: list[Any]) -> None:
        for server in servers:
            log.info("closing %s: no longer configured", describe_address(server))
            self.slots.close_server(server)
            server.server_close()

    def slot_removed(self, nr: int) -> None:
        self.slots.close_slot(nr)

    def _slot_without_successor(self, worker: WorkerProcess) -> bool:
        serving = self.generations.serving
        reuses = any(getattr(s, "_prefork_reuse_port", False) for s in serving.servers)
        return not reuses and self.slots.has_slot(worker.nr)

    def reload_settled(self, generation: Generation, cause: str | None) -> None:
        serving = self.generations.serving
        if cause is None and not any(
            getattr(s, "_prefork_reuse_port", False) for s in serving.servers
        ):
            self.slots.close_all()  # an upgrade's, unused now: the old workers drain theirs
        # An upgrade that fell back to the previous settings (cli.py) failed, even if
        # the reload after it completed: systemd is not told it succeeded.
        cause, self.upgrade_problem = cause or self.upgrade_problem, None
        if cause is None:
            self.notify.ready(f"serving with {serving.size} workers, generation {serving.number}")
        else:
            self.notify.reload_failed(f"serving with {serving.size} workers", cause)

    # -- helpers ----------------------------------------------------------------------------------
    def _generation(self, number: int) -> Generation:
        return self.generations.get(number) or self.generations.serving

    def _prefork_descriptors(self) -> set[int]:
        """Prefork's own descriptors at start, which no worker keeps (spawner.py)."""
        ours = {self._wakeup.read_fd, self._wakeup.write_fd, self._selector.fileno()}
        ours |= set(self.master_pipe)
        ours |= {s.socket.fileno() for s in self.generations.serving.servers}
        ours |= self.slots.fds()  # an upgrade's: handed over, not the host's
        if self._status_page:
            ours.add(self._status_page.fileno())
        ours |= {w.status_fd for w in self.pool.workers.values()}
        ours |= {w.heartbeat.fileno() for w in self.pool.workers.values() if w.heartbeat}
        return ours

    def _adopt(self, handover: Handover) -> None:
        """After an upgrade: take over the old image's pipe and workers, then reload."""
        self.master_pipe = (handover.master_r, handover.master_w)
        self.slots.adopt(handover.slot_sockets, self.generations.serving.servers)
        adopted = Upgrade.adopted(handover, self.generations.serving.timeouts, time.monotonic())
        for worker in adopted:
            self._selector.register(worker.status_fd, selectors.EVENT_READ, worker)
        self.pool.adopt(adopted)
        self._announced_ready = True
        log.info(
            "upgraded in place: adopted %d workers of generation %d",
            len(adopted),
            handover.generation,
        )

    def _hook(self, name: str, *args: object) -> None:
        """Call a server hook in the master; one that raises is logged, never fatal."""
        try:
            getattr(self.generations.serving.servers[0], name)(*args)
        except Exception:
            log.exception("the %s hook failed", name)

    def _publish_status(self) -> None:
        """What `prefork status` shows of the master; written only when it changed."""
        if self._status_page is None:
            return
        facts = master_facts(self, self.board, self.served_by_exited, self._announced_ready)
        key = tuple(sorted((k, str(v)) for k, v in facts.items()))
        if key != self._status_key:  # the loop turns often during a reload
            self._status_key = key
            self._status_page.publish(facts)

    def _kill_remaining(self) -> None:
        """Last resort on the way out (an exception in the loop): leave no child behind."""
        for worker in self.pool.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)
            os.close(worker.status_fd)
            if worker.heartbeat:
                worker.heartbeat.close()
        self.pool.workers.clear()

    def _close_all(self) -> None:
        if self._status_page:
            self._status_page.close()
        self._selector.close()
        self.notify.close()
        for fd in self.master_pipe:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.slots.close_all()


def _new_board_id() -> int:
    """31 bits that tell this master's status pages from another's: from the kernel
    without waiting (a master started early at boot must not block on the entropy
    pool; the clock and PID do there), not the random module (1 ms of every start)."""
    try:
        return int.from_bytes(os.getrandom(4, os.GRND_NONBLOCK), "big") >> 1
    except OSError:  # BlockingIOError: the pool is not ready yet
        return (time.time_ns() ^ os.getpid() << 16) & 0x7FFF_FFFF
