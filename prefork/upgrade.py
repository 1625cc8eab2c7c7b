"""USR2: check the new start, then re-execute the master in place (same PID).

1. ``prefork run ... --check-config`` runs in a child (``Check``), with the same
   arguments, directory and environment the new image will have: every check of a
   start, nothing bound. The master's loop goes on meanwhile (it reaps, respawns, answers
   signals, pings the watchdog) and polls the child; a TERM during the check stops the
   server (the check is killed), a second USR2 is ignored with a line. The check has a
   deadline: --boot-timeout, or target.CHECK_TIMEOUT when that is 0.
2. A failed check changes nothing: one line in the log and in systemd's STATUS=.
3. Otherwise the handover (handover.py) is written and the image re-executed; the new
   image adopts the workers and starts a generation as HUP does. It does not import the
   app again before it supervises: the check's list of the standard library it needs
   travels in the handover.

The workers stay where they are: they are children of this PID before and after
``execve``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from . import signals
from .handover import HANDOVER_FD_ENV, AdoptedWorker, Handover, checked, write_handover
from .heartbeat import Heartbeat
from .lifecycle import State, Timeouts, WorkerProcess
from .systemd import LISTEN_FDS_START
from .target import CHECK_TIMEOUT

if TYPE_CHECKING:
    import subprocess

log = logging.getLogger("prefork.upgrade")

CHECK_LISTENERS_ENV = "PREFORK_CHECK_LISTENERS"  # the check: how many sockets are systemd's
CHECK_REPORT_ENV = "PREFORK_CHECK_REPORT"  # the check: print the standard library it needs
CHECK_TIMEOUT_MAX = 86400.0  # seconds the check may take at most, whatever the settings

# How the new image starts: as ``python -m prefork`` would, but without the directory
# it starts in at the head of sys.path (``-m`` and ``-c`` put it there). That directory
# is the app's, which the workers' user may be able to write to, and the master that
# imports prefork, click and the rest here may be root.
_REEXEC = "import sys; del sys.path[0]; from prefork.__main__ import main; main()"


class Outcome(NamedTuple):
    problem: str | None  # None: the new start would work
    stdlib: list[str]


class Check:
    """``prefork run ... --check-config`` in a child the loop polls."""

    def __init__(self, argv: list[str], cwd: str, timeout: float, inherited: int) -> None:
        import subprocess  # here: 7 ms that a start that never upgrades need not pay
        import tempfile

        # Files, not pipes: nothing to drain while the child runs (closed in _done).
        self._out: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        env = {**os.environ, CHECK_LISTENERS_ENV: str(inherited), CHECK_REPORT_ENV: "1"}
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._proc: subprocess.Popen[bytes] = subprocess.Popen(
            [sys.executable, "-c", _REEXEC, *argv, "--check-config"],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def poll(self, now: float) -> Outcome | None:
        """The outcome once the child has exited (or overran and was killed); None
        while it runs."""
        code = self._proc.poll()
        if code is None:
            if now < self.deadline:
                return None
            self.cancel()
            return self._done(f"checking the new start took more than {self.timeout:g}s")
        if code == 0:
            self._out.seek(0)
            names = self._out.read(1 << 20).decode("ascii", "replace").split()
            return self._done(None, names)
        self._err.seek(0)
        lines = self._err.read(1 << 16).decode("utf-8", "replace").strip().splitlines()
        last = lines[-1].removeprefix("Error: ") if lines else ""
        return self._done(last or f"the check exited with status {code}")

    def cancel(self) -> None:
        import subprocess

        with contextlib.suppress(OSError):
            self._proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            self._proc.wait(5)

    def _done(self, problem: str | None, stdlib: list[str] | None = None) -> Outcome:
        for stream in (self._out, self._err):
            stream.close()
        return Outcome(problem, stdlib or [])


class Upgrader:
    """Starts the check of the new image, and replaces this process's image."""

    def __init__(self, argv: list[str], cwd: str, timeout: float) -> None:
        self.argv = argv  # the arguments after "prefork", as first given
        self.cwd = cwd  # where they were given (before --chdir)
        self.timeout = min(timeout or CHECK_TIMEOUT, CHECK_TIMEOUT_MAX)

    def check(self, inherited: int = 0) -> Check:
        return Check(self.argv, self.cwd, self.timeout, inherited)

    def execute(
        self,
        handover: Handover,
        socket_fds: list[int],
        environment: dict[str, str] | None = None,
        names: list[str] | None = None,
    ) -> None:
        """Replace this image. Returns only if execve failed, with everything as it was.
        ``names``: the sockets' LISTEN_FDNAMES, which the new image reports as systemd's."""
        plan = socket_fds + handover.descriptors()
        with signals.blocked():  # stay blocked across execve; the new image unblocks
            undo = _place_at_listen_fds(plan)
            handover.renumber(
                dict(zip(plan, range(LISTEN_FDS_START, LISTEN_FDS_START + len(plan)), strict=True))
            )
            payload = write_handover(handover)
            env = {**os.environ, **(environment or {})}  # systemd's, taken out of os.environ
            env.update(LISTEN_FDS=str(len(socket_fds)), LISTEN_PID=str(os.getpid()))
            env.pop("LISTEN_FDNAMES", None)
            if names and any(names):
                env["LISTEN_FDNAMES"] = ":".join(names)
            env[HANDOVER_FD_ENV] = str(payload)
            for handler in logging.getLogger("prefork").handlers:
                handler.flush()
            try:
                os.chdir(self.cwd)
                os.execve(sys.executable, [sys.executable, "-c", _REEXEC, *self.argv], env)
            except OSError:
                os.close(payload)
                undo()
                raise


class Upgrade:
    """USR2 for the arbiter: the check, the handover, the exec; and the adoption on the
    other side. It reads the pool and the generations, and changes nothing of them."""

    def __init__(self, upgrader: Upgrader) -> None:
        self.upgrader = upgrader
        self.check: Check | None = None

    @property
    def checking(self) -> bool:
        return self.check is not None

    def begin(self, arbiter: Any) -> None:
        serving = arbiter.generations.serving
        inherited = sum(1 for s in serving.servers if not getattr(s, "prefork_bind", None))
        try:
            self.check = self.upgrader.check(inherited)
        except OSError as exc:
            self._refused(arbiter, f"cannot run {sys.executable}: {exc.strerror}")
            return
        log.info("upgrading: checking the new start first (pid %d)", self.check.pid)
        arbiter.notify.status(f"serving generation {serving.number}; checking an upgrade")

    def poll(self, arbiter: Any, now: float) -> None:
        """Once per turn while a check runs: act on its outcome."""
        if self.check is None:
            return
        outcome = self.check.poll(now)
        if outcome is None:
            return
        self.check = None
        if outcome.problem:
            self._refused(arbiter, outcome.problem)
        else:
            self._reexec(arbiter, outcome.stdlib)

    def cancel(self) -> None:
        if self.check is not None:
            self.check.cancel()
            self.check = None

    def deadline(self) -> float | None:
        return self.check.deadline if self.check is not None else None

    @staticmethod
    def _refused(arbiter: Any, problem: str) -> None:
        serving = arbiter.generations.serving
        log.error("upgrade abandoned, still serving generation %d: %s", serving.number, problem)
        arbiter.notify.status(f"serving generation {serving.number} (upgrade refused: {problem})")

    def _reexec(self, arbiter: Any, stdlib: list[str]) -> None:
        serving = arbiter.generations.serving
        arbiter.notify.reloading("upgrading the master in place")
        log.info("upgrading: re-executing the master in place (pid %d)", os.getpid())
        servers = serving.servers
        handover = Handover(
            generation=serving.number,
            master_r=arbiter.master_pipe[0],
            master_w=arbiter.master_pipe[1],
            workers=self._handed_over(arbiter.pool.workers.values(), time.monotonic()),
            board=arbiter.board,
            served_by_exited=arbiter.served_by_exited,
            unlink=[s._prefork_unlink[1] if s._prefork_unlink else "" for s in servers],
            slot_sockets=arbiter.slots.export(servers),
            binds=[getattr(s, "prefork_bind", None) or "" for s in servers],
            newest=arbiter.generations.newest,
            stdlib=stdlib,
            settings=asdict(serving.config),
            app_dir=_app_dir(),
        )
        try:
            self.upgrader.execute(
                handover,
                [s.socket.fileno() for s in servers],
                arbiter.notify.environment(),
                [getattr(s, "prefork_fdname", "") for s in servers],
            )
        except OSError as exc:
            log.error("upgrade abandoned, cannot re-execute: %s", exc)
            arbiter.notify.reload_failed(f"serving with {serving.size} workers", str(exc))

    @staticmethod
    def _handed_over(workers: Any, now: float) -> list[AdoptedWorker]:
        return [
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
            if w.state is not State.KILLED
        ]

    @staticmethod
    def adopted(handover: Handover, timeouts: Timeouts, now: float) -> list[WorkerProcess]:
        """The previous image's workers that check out (handover.checked), as records of
        this one, each in the state it was in with what was left of its deadline."""
        adopted = []
        for old in checked(handover).workers:
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


def _app_dir() -> str:
    """The master's working directory (--chdir's); '' if it is gone. Named ``app_dir``
    in the handover, from when --chdir was also where the app was imported from."""
    try:
        return os.getcwd()
    except OSError:
        return ""
