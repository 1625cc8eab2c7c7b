"""USR2: re-execute the master in place (same PID), handing over sockets and workers.

The old image puts the listening sockets at descriptors 3, 4, ... and describes them
with the systemd protocol (``LISTEN_FDS``/``LISTEN_PID``); everything else the new image
needs (the master pipe, each worker's pid, slot, generation and status pipe) travels as
inheritable descriptors named in one environment variable. The workers themselves stay
where they are: they are children of this PID before and after ``execve``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, MutableMapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import signals
from .heartbeat import Heartbeat
from .lifecycle import State, Timeouts, WorkerProcess
from .systemd import LISTEN_FDS_START

log = logging.getLogger("prefork.upgrade")

HANDOVER_ENV = "PREFORK_HANDOVER"
CHECK_TIMEOUT_MAX = 86400.0  # seconds the pre-upgrade check may take, whatever the settings

# How the new image starts: as ``python -m prefork`` would, but without the directory
# it starts in at the head of sys.path (``-m`` and ``-c`` put it there). That directory
# is the app's, which the workers' user may be able to write to, and the master that
# imports prefork, click and the rest here may be root.
_REEXEC = "import sys; del sys.path[0]; from prefork.cli import main; main()"


@dataclass
class AdoptedWorker:
    pid: int
    nr: int
    generation: int
    status_fd: int
    heartbeat_fd: int = -1  # its status page (-1: an image that did not hand one over)
    max_requests: int = 0  # its --max-requests with jitter, so its RETIRE is honoured
    watches_code: bool = False  # the --reload watcher, so its RELOAD is honoured
    ready: bool = True  # it had reported ready
    state: str = "serving"  # lifecycle.State's value: a stopping worker stays stopping
    remaining: float | None = None  # seconds left of its state's deadline, if it has one


@dataclass
class Handover:
    """What the old image tells the new one, besides the sockets at 3, 4, ..."""

    generation: int
    master_r: int
    master_w: int
    workers: list[AdoptedWorker] = field(default_factory=list)
    unlink: list[str] = field(default_factory=list)  # per socket: Unix path we own, or ""
    # --reuse-port: each slot's own sockets (-1 where a server shares its socket), so
    # connections queued on them survive the upgrade
    slot_sockets: dict[str, list[int]] = field(default_factory=dict)
    binds: list[str] = field(default_factory=list)  # per socket: the --bind it came from
    board: int = 0  # the status pages' id, which adopted workers' pages carry
    served_by_exited: int = 0  # requests served by workers gone before the upgrade
    newest: int = 0  # the highest generation number given: numbers never repeat

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Handover:
        """Fields this version does not know are left out, and missing ones take their
        defaults: another version of prefork may be on the other side."""
        data = _known(cls, json.loads(text))
        data["workers"] = [AdoptedWorker(**_known(AdoptedWorker, w)) for w in data["workers"]]
        return cls(**data)


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


def take_handover(environ: MutableMapping[str, str] | None = None) -> Handover | None:
    env = os.environ if environ is None else environ
    text = env.pop(HANDOVER_ENV, None)
    return Handover.from_json(text) if text else None


class Upgrader:
    """Checks the new image's start, then replaces this process's image."""

    def __init__(self, argv: list[str], cwd: str, timeout: float) -> None:
        self.argv = argv  # the arguments after "prefork", as first given
        self.cwd = cwd  # where they were given (before --chdir)
        # subprocess cannot wait longer than select() can (about 24 days); a check that
        # takes a day is a hung one.
        self.timeout = min(timeout, CHECK_TIMEOUT_MAX) if timeout else CHECK_TIMEOUT_MAX

    def check(self) -> str | None:
        """Run the new image's start up to its binds, ``prefork run ... --check-config``,
        in a fresh interpreter, as the new image would run it (same arguments, directory,
        environment and prefork): the config file, --user, --chdir, --server-class, the
        log paths, the app's import as the workers' user. The problem, or None."""
        try:
            result = subprocess.run(
                [sys.executable, "-c", _REEXEC, *self.argv, "--check-config"],
                cwd=self.cwd,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return f"checking the new start took more than {self.timeout:g}s"
        except OSError as exc:
            return f"cannot run {sys.executable}: {exc.strerror}"
        if result.returncode == 0:
            return None
        lines = result.stderr.strip().splitlines()
        last = lines[-1].removeprefix("Error: ") if lines else ""
        return last or f"the check exited with status {result.returncode}"

    def execute(self, handover: Handover, socket_fds: list[int], extra_fds: list[int]) -> None:
        """Replace this image. Returns only if execve failed, with everything as it was."""
        plan = socket_fds + extra_fds
        with signals.blocked():  # stay blocked across execve; the new image unblocks
            undo = _place_at_listen_fds(plan)
            moved = dict(
                zip(plan, range(LISTEN_FDS_START, LISTEN_FDS_START + len(plan)), strict=True)
            )
            handover.master_r, handover.master_w = (
                moved[handover.master_r],
                moved[handover.master_w],
            )
            for worker in handover.workers:
                worker.status_fd = moved[worker.status_fd]
                if worker.heartbeat_fd >= 0:
                    worker.heartbeat_fd = moved[worker.heartbeat_fd]
            for fds in handover.slot_sockets.values():
                fds[:] = [moved[fd] if fd >= 0 else -1 for fd in fds]
            env = dict(os.environ, LISTEN_FDS=str(len(socket_fds)), LISTEN_PID=str(os.getpid()))
            env[HANDOVER_ENV] = handover.to_json()
            for handler in logging.getLogger("prefork").handlers:
                handler.flush()
            try:
                os.chdir(self.cwd)
                os.execve(sys.executable, [sys.executable, "-c", _REEXEC, *self.argv], env)
            except OSError:
                undo()
                raise


class Upgrade:
    """USR2 for the arbiter: check, hand over, re-execute; and the adoption on the other
    side. (A collaborator of the arbiter: it reads the pool and the generations, and
    changes nothing of them unless the exec fails, when it changes nothing at all.)"""

    def __init__(self, upgrader: Upgrader) -> None:
        self.upgrader = upgrader

    def reexec(self, arbiter: Any, master_r: int, master_w: int, slots: Any) -> None:
        serving = arbiter.generations.serving
        problem = self.upgrader.check()
        if problem:
            log.error("upgrade abandoned, still serving generation %d: %s", serving.number, problem)
            arbiter.notify.status(
                f"serving generation {serving.number} (upgrade refused: {problem})"
            )
            return
        arbiter.notify.reloading("upgrading the master in place")
        log.info("upgrading: re-executing the master in place (pid %d)", os.getpid())
        now = time.monotonic()
        workers = [w for w in arbiter.pool.workers.values() if w.state.value != "killed"]
        servers = serving.servers
        handover = Handover(
            generation=serving.number,
            master_r=master_r,
            master_w=master_w,
            workers=[
                AdoptedWorker(
                    w.pid,
                    w.nr,
                    w.generation,
                    w.status_fd,
                    w.heartbeat.fileno() if w.heartbeat else -1,
                    w.max_requests,
                    w.watches_code,
                    w.ready,
                    w.state.value,
                    None if w.deadline is None else max(0.0, w.deadline - now),
                )
                for w in workers
            ],
            board=arbiter._board,
            served_by_exited=arbiter._served_by_exited,
            unlink=[s._prefork_unlink[1] if s._prefork_unlink else "" for s in servers],
            slot_sockets=slots.export(servers),
            binds=[getattr(s, "prefork_bind", None) or "" for s in servers],
            newest=arbiter.generations.newest,
        )
        extra = [master_r, master_w] + [w.status_fd for w in handover.workers]
        extra += [w.heartbeat_fd for w in handover.workers if w.heartbeat_fd >= 0]
        extra += [fd for fds in handover.slot_sockets.values() for fd in fds if fd >= 0]
        try:
            self.upgrader.execute(handover, [s.socket.fileno() for s in servers], extra)
        except OSError as exc:
            log.error("upgrade abandoned, cannot re-execute: %s", exc)
            arbiter.notify.ready(f"serving with {serving.size} workers (upgrade failed)")

    @staticmethod
    def adopted(handover: Handover, timeouts: Timeouts, now: float) -> list[WorkerProcess]:
        """The previous image's workers, as records of this one, each in the state it
        was in with what was left of its deadline."""
        adopted = []
        for old in handover.workers:
            heartbeat = Heartbeat(old.heartbeat_fd) if old.heartbeat_fd >= 0 else None
            try:
                state = State(old.state)
            except ValueError:
                state = State.SERVING
            worker = WorkerProcess(
                old.nr,
                old.pid,
                old.generation,
                old.status_fd,
                heartbeat,
                now,
                timeouts,
                state=state,
                ready=old.ready,
                deadline=None if old.remaining is None else now + old.remaining,
            )
            worker.max_requests, worker.watches_code = old.max_requests, old.watches_code
            adopted.append(worker)
        return adopted


def _place_at_listen_fds(fds: list[int]) -> Callable[[], None]:
    """dup2 ``fds`` onto 3, 4, ... (inheritable); return a function that puts back
    whatever those numbers held, so a failed execve leaves the master intact."""
    top = LISTEN_FDS_START + len(fds)
    sources = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in fds]
    saved: dict[int, int | None] = {}
    for target in range(LISTEN_FDS_START, top):
        try:
            saved[target] = fcntl.fcntl(target, fcntl.F_DUPFD_CLOEXEC, top)
        except OSError:
            saved[target] = None  # nothing open there
    for target, source in zip(range(LISTEN_FDS_START, top), sources, strict=True):
        os.dup2(source, target, inheritable=True)

    def undo() -> None:
        for target, copy in saved.items():
            if copy is None:
                os.close(target)
            else:
                os.dup2(copy, target, inheritable=False)
                os.close(copy)
        for source in sources:
            with contextlib.suppress(OSError):
                os.close(source)

    return undo
