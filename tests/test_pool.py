"""The master's decisions (prefork/pool.py) under random interleavings, with a fake clock
and fake processes: spawn, ready, exit, stuck pages, HUP, TERM, QUIT, TTIN/TTOU,
abandoned and completed reloads, failed forks. The invariants of docs/design.md are
checked after every step. Real-process tests cover each scenario a user sees."""

from __future__ import annotations

import signal
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from prefork.config import Config
from prefork.generations import Generation, Generations
from prefork.lifecycle import Reading, State, WorkerProcess
from prefork.pool import Pool


class FakeServer:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeEffects:
    """Processes that exist only as records; a page is a (beat, request start) pair."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.next_pid = 100
        self.pages: dict[int, Reading] = {}
        self.signals: list[tuple[int, int]] = []
        self.closed: list[Any] = []
        self.fork_fails = False
        self.settled: list[tuple[int, str | None]] = []

    def fork(self, nr: int, generation: Generation, now: float) -> WorkerProcess | None:
        if self.fork_fails:
            return None
        self.next_pid += 1
        self.pages[self.next_pid] = Reading(now, None)
        return WorkerProcess(
            nr, self.next_pid, generation.number, -1, None, now, generation.timeouts
        )

    def signal(self, worker: WorkerProcess, signum: int, drain: bool = False) -> None:
        self.signals.append((worker.pid, signum))

    def dump_stack(self, worker: WorkerProcess) -> None:
        self.signals.append((worker.pid, signal.SIGUSR2))

    def read(self, worker: WorkerProcess) -> Reading:
        return self.pages.get(worker.pid, Reading(None, None))

    def close(self, servers: list[Any]) -> None:
        self.closed.extend(servers)

    def slot_removed(self, nr: int) -> None:
        pass

    def reload_settled(self, generation: Generation, cause: str | None) -> None:
        self.settled.append((generation.number, cause))


CONFIG = Config(workers=2, boot_timeout=5.0, worker_timeout=3.0, graceful_timeout=4.0)


@settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
class PoolMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.clock = [1000.0]
        self.effects = FakeEffects(self.clock)
        self.a, self.b = FakeServer("a"), FakeServer("b")
        first = Generation(1, CONFIG, [self.a, self.b], CONFIG.workers)
        self.pool = Pool(self.effects, Generations(first))
        self.numbers = [1]
        self.turn()

    @property
    def now(self) -> float:
        return self.clock[0]

    def turn(self) -> None:
        """One turn of the master's loop, as arbiter._turn runs it."""
        self.pool.check_deadlines(self.now)
        if not self.pool.stopping:
            self.pool.settle(self.now)
            self.pool.spawn_missing(self.now)

    def live(self) -> list[WorkerProcess]:
        return list(self.pool.workers.values())

    # -- what happens -----------------------------------------------------------------------
    @rule(data=st.data())
    def a_worker_reports_ready(self, data: st.DataObject) -> None:
        booting = [w for w in self.live() if not w.ready]
        if booting:
            self.pool.ready(data.draw(st.sampled_from(booting)), self.now)
        self.turn()

    @rule(data=st.data(), how=st.sampled_from(["exited with status 1", "killed by SIGKILL"]))
    def a_worker_exits(self, data: st.DataObject, how: str) -> None:
        if self.live():
            worker = data.draw(st.sampled_from(self.live()))
            self.pool.exited(worker.pid, how, self.now)
        self.turn()

    @rule(data=st.data())
    def a_worker_gets_stuck(self, data: st.DataObject) -> None:
        serving = [w for w in self.live() if w.ready]
        if serving:
            worker = data.draw(st.sampled_from(serving))
            self.effects.pages[worker.pid] = data.draw(
                st.sampled_from([Reading(None, None), Reading(self.now, self.now)])
            )
        self.turn()

    @rule(data=st.data())
    def a_worker_beats(self, data: st.DataObject) -> None:
        if self.live():
            worker = data.draw(st.sampled_from(self.live()))
            self.effects.pages[worker.pid] = Reading(self.now, None)
        self.turn()

    @rule(seconds=st.floats(min_value=0.0, max_value=8.0))
    def time_passes(self, seconds: float) -> None:
        self.clock[0] += seconds
        self.turn()

    @rule()
    def the_loop_sleeps_until_its_next_deadline(self) -> None:
        deadline = self.pool.next_deadline(self.now)
        if deadline is not None:
            self.clock[0] = max(self.now, deadline)
        self.turn()

    @precondition(lambda self: not self.pool.stopping)
    @rule(drop_b=st.booleans(), workers=st.integers(min_value=1, max_value=4))
    def hup(self, drop_b: bool, workers: int) -> None:
        if self.pool.starting is not None:
            self.pool.generations.pending = True
        else:
            if self.b in self.effects.closed:  # as reconfigure.next_settings: a bind added
                self.b = FakeServer("b")  # back is bound anew, never the closed server
            servers = [self.a] if drop_b else [self.a, self.b]
            started = self.pool.begin_reload(replace(CONFIG, workers=workers), servers, self.now)
            self.numbers.append(started.number)
        self.turn()

    @rule(delta=st.sampled_from([1, -1]))
    def ttin_or_ttou(self, delta: int) -> None:
        before = self.pool.serving.size
        self.pool.resize(delta, self.now)
        assert self.pool.serving.size == min(1024, max(1, before + delta))
        self.turn()

    @rule(fails=st.booleans())
    def forks_fail_or_work(self, fails: bool) -> None:
        self.effects.fork_fails = fails
        self.turn()

    @rule(graceful=st.booleans())
    def stop(self, graceful: bool) -> None:
        self.pool.stop(graceful, self.now)
        self.turn()

    # -- what must always hold ---------------------------------------------------------------
    @invariant()
    def every_worker_on_its_way_out_has_a_deadline(self) -> None:
        for worker in self.live():
            if worker.state in (State.STOPPING, State.KILLING):
                assert worker.deadline is not None, worker
            if worker.state is State.BOOTING:
                assert worker.deadline == worker.started + worker.timeouts.boot

    @invariant()
    def the_sleep_is_bounded_by_a_live_deadline(self) -> None:
        deadline = self.pool.next_deadline(self.now)
        live = [w.deadline for w in self.live() if w.deadline is not None]
        if live:
            assert deadline is not None and deadline <= min(live)
        if deadline is not None:
            # after a turn, nothing due is left undone (no busy loop on a stale deadline)
            self.turn()
            again = self.pool.next_deadline(self.now)
            assert again is None or again > self.now or self.pool._more_to_spawn

    @invariant()
    def no_socket_closed_while_a_generation_uses_it(self) -> None:
        generations = self.pool.generations
        alive = {w.generation for w in self.live()} | {g.number for g in generations.current()}
        in_use = {id(s) for n in alive if (g := generations.get(n)) for s in g.servers}
        assert not in_use & {id(s) for s in self.effects.closed}

    @invariant()
    def generation_numbers_only_grow(self) -> None:
        assert self.numbers == sorted(set(self.numbers))
        generations = self.pool.generations
        assert generations.newest >= max(self.numbers)
        if generations.starting is not None:
            assert generations.starting.number > generations.serving.number

    @invariant()
    def a_stopping_pool_spawns_nothing(self) -> None:
        if self.pool.stopping:
            assert all(w.state in (State.STOPPING, State.KILLED) for w in self.live())

    @invariant()
    def killed_workers_were_sent_sigkill(self) -> None:
        killed = {pid for pid, signum in self.effects.signals if signum == signal.SIGKILL}
        for worker in self.live():
            if worker.state is State.KILLED:
                assert worker.pid in killed


TestPool = PoolMachine.TestCase


# -- a few paths spelled out ---------------------------------------------------------------------
def _pool(**config: Any) -> tuple[Pool, FakeEffects, list[float]]:
    clock = [50.0]
    effects = FakeEffects(clock)
    settings_ = replace(CONFIG, **config)
    pool = Pool(
        effects, Generations(Generation(1, settings_, [FakeServer("a")], settings_.workers))
    )
    pool.spawn_missing(clock[0])
    for worker in list(pool.workers.values()):
        pool.ready(worker, clock[0])
    return pool, effects, clock


def test_a_stopping_worker_is_killed_when_its_grace_ends_whatever_stopped_it() -> None:
    pool, effects, clock = _pool()
    worker = next(iter(pool.workers.values()))
    pool.resize(-1, clock[0])  # TTOU stops slot 2
    stopped = [w for w in pool.workers.values() if w.state is State.STOPPING]
    assert [w.nr for w in stopped] == [2] and stopped[0].deadline == clock[0] + 4.0
    clock[0] += 4.0
    effects.pages[worker.pid] = Reading(clock[0], None)  # slot 1 goes on beating
    pool.check_deadlines(clock[0])
    assert stopped[0].state is State.KILLED
    assert (stopped[0].pid, signal.SIGKILL) in effects.signals
    assert worker.state is State.SERVING


def test_the_timeout_counts_from_the_request_not_from_the_last_beat() -> None:
    pool, effects, clock = _pool(worker_timeout=2.0)
    worker = next(iter(pool.workers.values()))
    effects.pages[worker.pid] = Reading(clock[0], clock[0] + 1.0)  # a request 1 s later
    clock[0] += 2.5  # 2.5 s after the beat, 1.5 s into the request
    pool.check_deadlines(clock[0])
    assert worker.state is State.SERVING and worker.deadline == clock[0] - 2.5 + 3.0


def test_a_worker_that_recovered_during_the_grace_is_not_killed() -> None:
    pool, effects, clock = _pool(worker_timeout=2.0)
    worker = next(iter(pool.workers.values()))
    clock[0] += 2.0
    pool.check_deadlines(clock[0])
    assert worker.state is State.KILLING
    effects.pages[worker.pid] = Reading(clock[0] + 0.1, None)  # its loop turned again
    clock[0] += 0.5
    pool.check_deadlines(clock[0])
    assert worker.state is State.SERVING
    assert (worker.pid, signal.SIGKILL) not in effects.signals


def test_an_abandoned_reload_keeps_the_serving_generation_and_its_resize() -> None:
    pool, effects, clock = _pool()
    b = FakeServer("b")
    pool.begin_reload(replace(CONFIG, workers=3), [b], clock[0])
    pool.spawn_missing(clock[0])
    pool.resize(+1, clock[0])  # during the reload: both generations
    new = [w for w in pool.workers.values() if w.generation == 2]
    pool.exited(new[0].pid, "exited with status 4", clock[0])  # a boot failure: abandon
    assert pool.starting is None and pool.serving.number == 1 and pool.serving.size == 3
    pool.settle(clock[0])
    assert b not in effects.closed  # its workers are still on their way out
    for worker in [w for w in pool.workers.values() if w.generation == 2]:
        pool.exited(worker.pid, "killed by SIGKILL", clock[0])
    pool.settle(clock[0])
    assert effects.closed == [b]
    assert effects.settled[-1][0] == 2 and "failed to boot" in str(effects.settled[-1][1])


def test_a_reload_whose_workers_cannot_fork_is_abandoned_by_its_deadline() -> None:
    pool, effects, clock = _pool(boot_timeout=3.0)
    effects.fork_fails = True
    pool.begin_reload(CONFIG, pool.serving.servers, clock[0])
    for _ in range(50):
        pool.spawn_missing(clock[0])
        deadline = pool.next_deadline(clock[0])
        assert deadline is not None and deadline > clock[0]  # never a busy loop
        clock[0] = deadline
        pool.check_deadlines(clock[0])
        if pool.starting is None:
            break
    assert pool.starting is None and "not ready within" in str(effects.settled[-1][1])


@pytest.mark.parametrize("graceful", [True, False])
def test_a_stop_during_a_reload_stops_both_generations(graceful: bool) -> None:
    pool, effects, clock = _pool()
    pool.begin_reload(CONFIG, pool.serving.servers, clock[0])
    pool.spawn_missing(clock[0])
    pool.stop(graceful, clock[0])
    assert pool.starting is None
    assert all(w.state in (State.STOPPING, State.KILLED) for w in pool.workers.values())
