"""Reload and upgrade: the master's generations, as a base class of Arbiter.

HUP starts a whole new generation beside the serving one and stops the old generation
only once every new worker is ready; if the new one cannot get ready, it is stopped
instead and the old one serves on. Before that, the settings are read again (binds
included) when ``prefork run`` gave the master a way to. USR2 re-executes the master
in place and then reloads the same way, having adopted the old workers.

The state shared with the supervision loop is declared below; Arbiter sets it up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from dataclasses import fields, replace
from typing import Any, Protocol

from .config import Config
from .errors import PreforkError
from .heartbeat import STOPPING, Heartbeat
from .identity import Identity
from .listeners import SlotSockets, describe_address
from .systemd import Notifier
from .upgrade import AdoptedWorker, Handover, Upgrader
from .worker_process import WorkerProcess

log = logging.getLogger("prefork.arbiter")

# Settings a HUP cannot change in a running master: they shape the sockets, the server
# classes or the process itself. They take effect at the next USR2 or restart.
FIXED_UNTIL_RESTART = (
    "worker_class",
    "preload",
    "server_class",
    "chdir",
    "pid",
    "reuse_port",
    "backlog",
    "tcp_nodelay",
    "defer_accept",
    "client_timeout",
    "config",
    "umask",
)


class Reconfigurer(Protocol):
    """What ``prefork run`` gives the master so that HUP re-reads its settings."""

    def read(self) -> Config:
        """The settings as they are now (config file, command line, environment)."""

    def open(self, bind: str, config: Config) -> Any:
        """Bind a new address; the server's ``prefork_bind`` is ``bind``."""


class Reloads:
    """Generations, reload (HUP) and in-place upgrade (USR2) for Arbiter."""

    config: Config
    servers: list[Any]
    workers: dict[int, WorkerProcess]
    generation: int  # the serving generation
    reloading: int | None  # the generation a reload is starting, if any
    target_workers: int
    notify: Notifier
    retiring: list[Any]  # servers of removed binds, closed once no worker uses them
    _newest: int  # every reload attempt gets a number of its own
    _settings: Reconfigurer | None
    _upgrader: Upgrader | None
    _before_reload: tuple[Config, list[Any], int] | None  # what an abandoned reload restores
    _slots: SlotSockets
    _stopping: int
    _backoff: dict[int, tuple[float, float]]
    _master_r: int
    _board: int  # the status pages' id
    _served_by_exited: int
    _master_w: int
    _selector: selectors.DefaultSelector
    _ever_ready: bool
    _announced_ready: bool

    def reload(self) -> None:
        """HUP: a new generation beside the serving one; the old one stops once all are ready."""
        if self._stopping or self.reloading is not None:
            log.warning("a reload or stop is already under way; HUP ignored")
            return
        if self.config.preload and self._upgrader is not None:
            log.info("the app is preloaded in the master: reloading by re-executing it")
            self.reexec()
            return
        self.start_reload()

    def start_reload(self) -> None:
        """Re-read the settings (if we can), then start the next generation."""
        self.notify.reloading("reloading")
        if self._settings is not None:
            try:
                self._reconfigure(self._settings)
            except PreforkError as exc:
                log.error("reload abandoned, generation %d keeps serving: %s", self.generation, exc)
                self.notify.ready(
                    f"serving with {self.target_workers} workers (reload failed: {exc})"
                )
                return
        self._newest += 1
        self.reloading = self._newest
        self._hook("on_reload")
        log.info(
            "reloading: starting generation %d beside generation %d",
            self.reloading,
            self.generation,
        )

    def reexec(self) -> None:
        """USR2: check the new code, then re-execute this master in place (same PID)."""
        if self._upgrader is None:
            log.warning("USR2 (upgrade in place) needs `prefork run`; ignored")
            return
        if self._stopping or self.reloading is not None:
            log.warning("a reload or stop is already under way; USR2 ignored")
            return
        problem = self._upgrader.check()
        if problem:
            log.error(
                "upgrade abandoned, still serving generation %d: %s", self.generation, problem
            )
            return
        self.notify.reloading("upgrading the master in place")
        log.info("upgrading: re-executing the master in place (pid %d)", os.getpid())
        handover = Handover(
            generation=self.generation,
            master_r=self._master_r,
            master_w=self._master_w,
            workers=[
                AdoptedWorker(
                    w.pid,
                    w.nr,
                    w.generation,
                    w.status_fd,
                    w.heartbeat.fileno() if w.heartbeat else -1,
                    w.max_requests,
                    w.watches_code,
                )
                for w in self.workers.values()
                if not w.stop_sent
            ],
            board=self._board,
            served_by_exited=self._served_by_exited,
            unlink=[s._prefork_unlink[1] if s._prefork_unlink else "" for s in self.servers],
            slot_sockets=self._slots.export(self.servers),
            binds=[getattr(s, "prefork_bind", None) or "" for s in self.servers],
        )
        extra = [self._master_r, self._master_w] + [w.status_fd for w in handover.workers]
        extra += [w.heartbeat_fd for w in handover.workers if w.heartbeat_fd >= 0]
        extra += [fd for fds in handover.slot_sockets.values() for fd in fds if fd >= 0]
        try:
            self._upgrader.execute(handover, [s.socket.fileno() for s in self.servers], extra)
        except OSError as exc:
            log.error("upgrade abandoned, cannot re-execute: %s", exc)
            self.notify.ready(f"serving with {self.target_workers} workers (upgrade failed)")

    def _reconfigure(self, settings: Reconfigurer) -> None:
        """Apply re-read settings for the coming generation; open binds that were added.

        Removed binds keep serving the old generation and close once it is gone. The
        previous state is kept so that an abandoned reload can put it back.
        """
        new = settings.read()
        Identity.resolve(new.user, new.group)  # an unknown user abandons the reload here
        kept = {
            f.name: getattr(self.config, f.name)
            for f in fields(Config)
            if f.name in FIXED_UNTIL_RESTART
            and getattr(new, f.name) != getattr(self.config, f.name)
        }
        for name in kept:
            log.warning("%s changed; it takes effect at the next USR2 or restart", name)
        new = replace(new, **kept)
        current = {getattr(s, "prefork_bind", None) for s in self.servers}
        added: list[Any] = []
        try:
            for bind in new.binds:
                if bind not in current:
                    added.append(settings.open(bind, new))
                    added[-1].socket.setblocking(False)
        except BaseException:
            for server in added:
                server.server_close()
            raise
        configured = set(new.binds)
        removed = [
            s
            for s in self.servers
            if getattr(s, "prefork_bind", None) and s.prefork_bind not in configured
        ]
        self._before_reload = (self.config, self.servers, self.target_workers)
        self.config, self.target_workers = new, new.workers
        self.servers = [s for s in self.servers if s not in removed] + added
        self.retiring = removed
        for server in added:
            log.info("added %s", describe_address(server))

    def _finish_reload(self) -> None:
        old = [w for w in self.workers.values() if w.generation != self.reloading]
        self.generation, self.reloading = self.reloading or self.generation, None
        self._before_reload = None
        self._backoff.clear()
        log.info(
            "reload complete: generation %d serving; stopping %d old workers",
            self.generation,
            len(old),
        )
        for worker in old:
            self._signal(worker, signal.SIGTERM)
        self.notify.ready(
            f"serving with {self.target_workers} workers, generation {self.generation}"
        )

    def _abandon_reload(self, cause: str) -> None:
        abandoned, self.reloading = self.reloading, None
        assert abandoned is not None
        log.error("reload abandoned, generation %d keeps serving: %s", self.generation, cause)
        if self._before_reload is not None:  # put back the settings and binds of before
            config, servers, self.target_workers = self._before_reload
            for server in self.servers:
                if server not in servers:
                    self._slots.close_server(server)
                    server.server_close()
            self.config, self.servers, self.retiring = config, servers, []
            self._before_reload = None
        for worker in self._generation_workers(abandoned):
            # A ready worker may hold accepted connections: it finishes them. One still
            # booting serves nothing and may be stuck in its import: it goes now.
            self._signal(worker, signal.SIGTERM if worker.ready else signal.SIGKILL)
        self.notify.ready(f"serving with {self.target_workers} workers (reload failed: {cause})")

    def _adopt(self, handover: Handover) -> None:
        """After an upgrade: take over the old image's pipe and workers, then reload."""
        self._master_r, self._master_w = handover.master_r, handover.master_w
        self._slots.adopt(handover.slot_sockets, self.servers)
        now = time.monotonic()
        for old in handover.workers:
            heartbeat = Heartbeat(old.heartbeat_fd) if old.heartbeat_fd >= 0 else None
            worker = WorkerProcess(
                old.nr, old.pid, old.generation, old.status_fd, heartbeat, now, ready=True
            )
            worker.max_requests, worker.watches_code = old.max_requests, old.watches_code
            self.workers[old.pid] = worker
            self._selector.register(old.status_fd, selectors.EVENT_READ, worker)
        self._ever_ready = self._announced_ready = True
        log.info(
            "upgraded in place: adopted %d workers of generation %d",
            len(handover.workers),
            handover.generation,
        )
        self.start_reload()  # and settings changed in the config file meanwhile

    def _generation_workers(self, generation: int) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if w.generation == generation]

    def _hook(self, name: str, *args: object) -> None:
        """Call a server hook in the master; one that raises is logged, never fatal."""
        try:
            getattr(self.servers[0], name)(*args)
        except Exception:
            log.exception("the %s hook failed", name)

    def _signal(self, worker: WorkerProcess, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)
        if signum != signal.SIGKILL or not worker.stop_sent:
            worker.stop_sent = signum
        if worker.heartbeat:
            worker.heartbeat.set_state(STOPPING)
