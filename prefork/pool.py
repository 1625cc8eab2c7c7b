"""Pool: the master's decisions about its workers, without a system call of its own.

It keeps every worker's record (``lifecycle.WorkerProcess``: one state, one deadline),
the generations (``generations.py``) and the boot-failure backoff, and decides: which
slots need a worker, what a worker's exit means, what an expired deadline calls for,
when a reload completes or is abandoned, how to stop. What it decides, ``Effects``
carries out (fork, signal, read a page, close a socket); the master's loop feeds it the
events (a worker ready, a worker reaped, a signal) and sleeps until ``next_deadline``.
The tests drive it with fake effects and a fake clock.

Invariants (checked by tests/test_pool.py after every step of random interleavings):
every worker that is not KILLED has a deadline unless its timeout is off; the master's
sleep is bounded by the nearest live deadline; no socket is closed while a generation
with workers, or the serving or starting one, uses it; generation numbers only grow.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable
from typing import Any, Protocol

from .generations import Generation, Generations
from .lifecycle import (
    QUICK_STOP_GRACE,
    STACK_DUMP_GRACE,
    Backoff,
    Reading,
    State,
    WorkerProcess,
    serving_deadline,
    still_stuck,
    stuck_on,
)

log = logging.getLogger("prefork.arbiter")

SPAWNS_PER_TURN = 16  # forks between two looks at the signals: TERM is heard during -w 1024


class Effects(Protocol):
    """What the pool's decisions need done; the master's are system calls."""

    def fork(self, nr: int, generation: Generation, now: float) -> WorkerProcess | None:
        """A new worker of slot ``nr`` (None: the fork failed; said already)."""

    def signal(self, worker: WorkerProcess, signum: int, drain: bool = False) -> None:
        """``drain``: the final stop; serve what is queued before leaving."""

    def dump_stack(self, worker: WorkerProcess) -> None: ...

    def read(self, worker: WorkerProcess) -> Reading: ...

    def close(self, servers: list[Any]) -> None: ...

    def slot_removed(self, nr: int) -> None: ...

    def reload_settled(self, generation: Generation, cause: str | None) -> None:
        """A reload completed (``cause`` None) or was abandoned."""


class Pool:
    def __init__(self, effects: Effects, generations: Generations) -> None:
        self.effects = effects
        self.generations = generations
        self.workers: dict[int, WorkerProcess] = {}  # by pid
        self.backoff = Backoff()  # by (generation, slot)
        self.stopping: str | None = None  # "graceful" or "quick" once a stop began
        self.ever_ready = False
        self.boot_error: str | None = None  # the first generation never got ready
        self._more_to_spawn = False

    # -- queries ----------------------------------------------------------------------------
    @property
    def serving(self) -> Generation:
        return self.generations.serving

    @property
    def starting(self) -> Generation | None:
        return self.generations.starting

    def of(self, generation: Generation) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if w.generation == generation.number]

    def complete(self, generation: Generation) -> bool:
        """Every slot 1..size has a ready worker that is not on its way out."""
        ready = {w.nr for w in self.of(generation) if w.ready and w.state is State.SERVING}
        return ready >= set(range(1, generation.size + 1))

    def next_deadline(self, now: float) -> float | None:
        """The nearest moment the pool must act: a worker's deadline, a reload's, a slot
        whose backoff ends while it lacks a worker; now, when spawning must go on."""
        if self._more_to_spawn:
            return now
        deadlines = [w.deadline for w in self.workers.values() if w.deadline is not None]
        if self.starting is not None and (deadline := self.starting.deadline) is not None:
            deadlines.append(deadline)
        if not self.stopping:
            for generation in self.generations.current():
                for nr in self._missing(generation):
                    due = self.backoff.due((generation.number, nr))
                    if due is not None:
                        deadlines.append(due)
        return min(deadlines) if deadlines else None

    def _missing(self, generation: Generation) -> list[int]:
        taken = {w.nr for w in self.of(generation) if w.live}
        return [nr for nr in range(1, generation.size + 1) if nr not in taken]

    # -- spawning ---------------------------------------------------------------------------
    def spawn_missing(self, now: float) -> None:
        """Fork what is missing, at most SPAWNS_PER_TURN (next_deadline says when more)."""
        self._more_to_spawn = False
        if self.stopping:
            return
        spawned = 0
        for generation in self.generations.current():
            for nr in self._missing(generation):
                if not self.backoff.may_start((generation.number, nr), now):
                    continue
                if spawned == SPAWNS_PER_TURN:
                    self._more_to_spawn = True
                    return
                self.spawn(nr, generation, now)
                spawned += 1

    def spawn(self, nr: int, generation: Generation, now: float) -> WorkerProcess | None:
        worker = self.effects.fork(nr, generation, now)
        if worker is None:
            delay = self.backoff.failed((generation.number, nr), now)
            log.error("retrying worker %d in %.1fs", nr, delay)
            return None
        self.workers[worker.pid] = worker
        return worker

    # -- events -----------------------------------------------------------------------------
    def ready(self, worker: WorkerProcess, now: float) -> None:
        """The worker reported ready (its status pipe)."""
        if worker.ready:
            return
        worker.ready = self.ever_ready = True
        self.backoff.forget((worker.generation, worker.nr))
        if worker.state is State.BOOTING:
            worker.enter(State.SERVING, now, None)
            worker.deadline = serving_deadline(worker, self.effects.read(worker))
        log.info("worker %d (pid %d) booted", worker.nr, worker.pid)

    def exited(self, pid: int, how: str, now: float) -> WorkerProcess | None:
        """A worker was reaped; what it means (a boot failure, a crash, a stop)."""
        worker = self.workers.pop(pid, None)
        if worker is None:
            return None
        # Stopped or killed by us, for a reason other than a boot that never ended.
        on_purpose = worker.state is State.STOPPING or (
            worker.state is State.KILLED and not worker.boot_error
        )
        if not worker.ready:
            self._boot_failure(worker, worker.boot_error or how, on_purpose, now)
        elif on_purpose or self.stopping:
            log.info("worker %d (pid %d) %s", worker.nr, worker.pid, how)
        else:
            log.warning("worker %d (pid %d) %s unexpectedly", worker.nr, worker.pid, how)
        sizes = [g.size for g in self.generations.current()]
        if worker.nr > max(sizes) and not any(w.nr == worker.nr for w in self.workers.values()):
            self.effects.slot_removed(worker.nr)  # its --reuse-port sockets go with it
        return worker

    def _boot_failure(
        self, worker: WorkerProcess, cause: str, on_purpose: bool, now: float
    ) -> None:
        starting = self.starting
        if self.stopping or on_purpose:
            return  # stopped on purpose (TTOU, an abandoned reload): not a boot failure
        if starting is not None and worker.generation == starting.number:
            self.abandon_reload(
                f"worker {worker.nr} of generation {worker.generation} failed to boot: {cause}",
                now,
            )
        elif worker.generation != self.serving.number:
            return  # a generation that no longer serves
        elif not self.ever_ready:  # nothing ever worked: fail fast, do not loop
            log.error("worker %d (pid %d) failed to boot: %s", worker.nr, worker.pid, cause)
            self.boot_error = cause
            self.stop(graceful=False, now=now)
        else:
            delay = self.backoff.failed((self.serving.number, worker.nr), now)
            log.error(
                "worker %d (pid %d) failed to boot: %s; retrying in %.1fs",
                worker.nr,
                worker.pid,
                cause,
                delay,
            )

    # -- stopping workers -------------------------------------------------------------------
    def stop_worker(self, worker: WorkerProcess, now: float, quick: bool = False) -> None:
        """Stop one worker, for any reason: its stop deadline starts now. A worker that
        has not booted serves nothing (and may hang in its import): it is killed."""
        if worker.state is State.KILLED:
            return
        if not worker.ready:
            self._kill(worker, now)
            return
        deadline = now + (QUICK_STOP_GRACE if quick else worker.timeouts.graceful)
        if worker.state is State.STOPPING:
            if worker.quick or not quick:
                return  # already stopping, at least as fast
            deadline = min(deadline, worker.deadline or deadline)  # quick overtakes graceful
        worker.quick = quick
        worker.enter(State.STOPPING, now, deadline)
        drain = self.stopping == "graceful"
        self.effects.signal(worker, signal.SIGQUIT if quick else signal.SIGTERM, drain=drain)

    def _kill(self, worker: WorkerProcess, now: float) -> None:
        worker.enter(State.KILLED, now, None)
        self.effects.signal(worker, signal.SIGKILL)

    def check_deadlines(self, now: float) -> None:
        """Act on every deadline that has come: the workers', a reload's."""
        for worker in list(self.workers.values()):
            if worker.deadline is not None and worker.deadline <= now:
                self._overdue(worker, now)
        starting = self.starting
        deadline = starting.deadline if starting is not None else None
        overdue = deadline is not None and deadline <= now
        if starting is not None and overdue and not self.complete(starting):
            self.abandon_reload(f"not ready within {starting.config.boot_timeout:g}s", now)

    def _overdue(self, worker: WorkerProcess, now: float) -> None:
        if worker.state is State.STOPPING:
            log.error("worker %d (pid %d) did not stop in time; killing it", worker.nr, worker.pid)
            self._kill(worker, now)
        elif worker.state is State.KILLING:
            if still_stuck(worker, self.effects.read(worker)):
                self._kill(worker, now)
            else:
                log.warning("worker %d (pid %d) recovered; not killed", worker.nr, worker.pid)
                worker.enter(State.SERVING, now, None)
                worker.deadline = serving_deadline(worker, self.effects.read(worker))
        elif worker.state is State.BOOTING:
            worker.boot_error = f"not ready within {worker.timeouts.boot:g}s"
            self._dump(
                worker, f"worker {worker.nr} (pid {worker.pid}) was {worker.boot_error}", None, now
            )
        elif worker.state is State.SERVING:
            reading = self.effects.read(worker)
            deadline = serving_deadline(worker, reading)
            if deadline is None or deadline > now:
                worker.deadline = deadline  # it moved on since: the next deadline
                return
            self._dump(worker, self._why_stuck(worker, reading, now), reading, now)

    def _dump(self, worker: WorkerProcess, why: str, reading: Reading | None, now: float) -> None:
        log.error("%s; dumping its stack, then killing it", why)
        worker.stuck_on = stuck_on(reading) if reading is not None else ("boot", None)
        worker.enter(State.KILLING, now, now + STACK_DUMP_GRACE)
        self.effects.dump_stack(worker)

    @staticmethod
    def _why_stuck(worker: WorkerProcess, reading: Reading, now: float) -> str:
        who = f"worker {worker.nr} (pid {worker.pid})"
        timeout = worker.timeouts.request
        if reading.beat is None:
            return f"{who} wrote an impossible time into its heartbeat page"
        if reading.request_started is None:
            silent = now - reading.beat
            return (
                f"{who} timed out: its loop has not run for {silent:.1f}s (--timeout {timeout:g})"
            )
        client = worker.heartbeat.current_request() if worker.heartbeat else None
        source = f" from {client[1]}" if client else ""
        return (
            f"{who} timed out: its request{source} has run "
            f"{now - reading.request_started:.1f}s (--timeout {timeout:g})"
        )

    # -- the pool as a whole ----------------------------------------------------------------
    def resize(self, delta: int, now: float) -> None:
        """TTIN/TTOU: both generations when a reload is under way (generations.py)."""
        size = self.generations.resize(delta)
        log.info("pool size is now %d", size)
        for worker in list(self.workers.values()):
            generation = self.generations.get(worker.generation)
            if generation is not None and worker.nr > generation.size and worker.live:
                self.stop_worker(worker, now)
        self._prune_backoff()

    def stop(self, graceful: bool, now: float) -> None:
        """TERM: every worker finishes its requests (and serves what is queued) within
        --graceful-timeout. INT/QUIT: at once. A reload under way is dropped."""
        if self.stopping == "quick" or (graceful and self.stopping):
            return
        self.stopping = "graceful" if graceful else "quick"
        self.generations.pending = False
        if self.starting is not None:
            self.generations.abandon()
        for worker in list(self.workers.values()):
            self.stop_worker(worker, now, quick=not graceful)

    def begin_reload(self, config: Any, servers: list[Any], now: float) -> Generation:
        return self.generations.begin(config, servers, now)

    def settle(self, now: float) -> None:
        """Finish a reload whose generation is complete; close what nothing uses."""
        starting = self.starting
        if starting is not None and self.complete(starting):
            self.generations.finish()
            stopping = [w for w in self.workers.values() if w.generation != starting.number]
            log.info(
                "reload complete: generation %d serving; stopping %d old workers",
                starting.number,
                len(stopping),
            )
            for worker in stopping:
                self.stop_worker(worker, now)
            self._prune_backoff()
            self.effects.reload_settled(starting, None)
        unused = self.generations.unused(w.generation for w in self.workers.values())
        if unused:
            self.effects.close(unused)

    def _prune_backoff(self) -> None:
        self.backoff.keep(
            {(g.number, nr) for g in self.generations.current() for nr in range(1, g.size + 1)}
        )

    def abandon_reload(self, cause: str, now: float) -> None:
        abandoned = self.generations.abandon()
        self._prune_backoff()
        log.error("reload abandoned, generation %d keeps serving: %s", self.serving.number, cause)
        for worker in self.of(abandoned):
            # A ready worker may hold accepted connections: it finishes them. One still
            # booting serves nothing and may be stuck in its import: it goes now.
            self.stop_worker(worker, now)
        self.effects.reload_settled(abandoned, cause)

    def adopt(self, workers: Iterable[WorkerProcess]) -> None:
        """After an upgrade: the previous image's workers, ours from now on."""
        for worker in workers:
            self.workers[worker.pid] = worker
            if worker.ready:
                self.ever_ready = True
