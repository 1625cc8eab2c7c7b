"""A worker's life as the master sees it: one state at a time, one deadline for it.

    BOOTING --ready--> SERVING --stuck--> KILLING --still stuck--> KILLED
       |                  |                  \\--recovered--> SERVING
       |                  \\--stop--> STOPPING --grace over--> KILLED
       \\--stuck / stop--> (KILLING, KILLED)           (reaped: gone, in every state)

Each state says which timeout applies, measured from when it started:

- BOOTING: ``--boot-timeout`` from the fork.
- SERVING: ``--timeout`` against the request in progress, from the moment it started
  (a sync worker records it), else against the loop's silence (its last beat). A page
  holding an impossible time counts as stuck at once.
- STOPPING: ``--graceful-timeout`` from the moment it was told to stop, whatever the
  reason (HUP, TTOU, recycling, an abandoned reload, a stop), or a second for a quick
  stop.
- KILLING: its stack was asked for; after STACK_DUMP_GRACE it is killed if it is still
  stuck on the same request (or its loop still silent), and left alone if it recovered.
- KILLED: SIGKILL sent; nothing more to do but reap it. No deadline.

Everything here is decision logic on plain values (no system calls), so it runs under a
fake clock in the tests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

QUICK_STOP_GRACE = 1.0  # seconds a quick-stopped worker gets before SIGKILL
STACK_DUMP_GRACE = 0.5  # seconds between asking a stuck worker for its stack and SIGKILL


class State(enum.Enum):
    BOOTING = "booting"
    SERVING = "serving"
    STOPPING = "stopping"
    KILLING = "killing"
    KILLED = "killed"


class Timeouts(NamedTuple):
    """The timeouts of a worker's generation (0: off)."""

    boot: float
    request: float  # --timeout
    graceful: float


class Reading(NamedTuple):
    """What the worker's page says, as far as it can be believed (heartbeat.py checks)."""

    beat: float | None  # the loop's last turn; None: an impossible value
    request_started: float | None  # the request in progress, if the worker records one


@dataclass(eq=False)
class WorkerProcess:
    """The master's record of one worker."""

    nr: int
    pid: int
    generation: int
    status_fd: int
    heartbeat: Any  # its Heartbeat page; None: adopted from an image that kept none
    started: float
    timeouts: Timeouts
    state: State = State.BOOTING
    since: float = 0.0  # when it entered its state
    deadline: float | None = None  # the one live deadline of that state
    ready: bool = False  # it reported ready (once; a stopping worker may have been)
    quick: bool = False  # stopping at once (QUIT), not gracefully
    stuck_on: tuple[str, float | None] | None = None  # KILLING: what it was stuck on
    boot_error: str = ""
    watches_code: bool = False  # --reload: the one worker whose RELOAD is honoured
    max_requests: int = 0  # its --max-requests with jitter: RETIRE is honoured only then
    unexpected: int = 0  # status-pipe messages it had no business sending
    said: set[bytes] = field(default_factory=set)  # status-pipe messages honoured once

    def __post_init__(self) -> None:
        if not self.since:
            self.since = self.started
        if self.deadline is None and self.state is State.BOOTING and self.timeouts.boot:
            self.deadline = self.started + self.timeouts.boot

    @property
    def live(self) -> bool:
        """Counted in its generation: not on its way out."""
        return self.state in (State.BOOTING, State.SERVING, State.KILLING)

    def enter(self, state: State, now: float, deadline: float | None) -> None:
        self.state, self.since, self.deadline = state, now, deadline


def serving_deadline(worker: WorkerProcess, reading: Reading) -> float | None:
    """When a serving worker is overdue: its request's start, else its last beat, plus
    --timeout; at once for a page that cannot be believed; None with --timeout 0."""
    timeout = worker.timeouts.request
    if not timeout:
        return None
    if reading.beat is None:
        return worker.since  # already past: an impossible page is a stuck worker
    if reading.request_started is not None:
        return reading.request_started + timeout
    return reading.beat + timeout


def stuck_on(reading: Reading) -> tuple[str, float | None]:
    """What a stuck worker is stuck on, to tell later whether it moved on."""
    if reading.beat is None:
        return ("page", None)
    if reading.request_started is not None:
        return ("request", reading.request_started)
    return ("loop", reading.beat)


def still_stuck(worker: WorkerProcess, reading: Reading) -> bool:
    """After the stack dump: the same request, or a loop that has not turned since."""
    if not worker.ready:
        return True  # still booting
    was = worker.stuck_on or ("page", None)
    now = stuck_on(reading)
    if was[0] == "page" or now[0] == "page":
        return True
    if was[0] == "request":
        return now == was  # the same request, still running
    return now[0] == "loop" and now[1] == was[1]  # no beat since


Slot = tuple[int, int]  # (generation, slot number)


@dataclass
class Backoff:
    """Retry delays of slots whose workers failed to boot (or to fork): doubling, capped.
    An entry lives as long as its slot needs a worker: it goes when one of that slot
    becomes ready, or the slot or its generation goes."""

    start: float = 0.1
    cap: float = 10.0
    entries: dict[Slot, tuple[float, float]] = field(default_factory=dict)  # (delay, until)

    def failed(self, slot: Slot, now: float) -> float:
        delay = min(self.entries.get(slot, (self.start / 2, 0.0))[0] * 2, self.cap)
        self.entries[slot] = (delay, now + delay)
        return delay

    def may_start(self, slot: Slot, now: float) -> bool:
        return self.entries.get(slot, (0.0, 0.0))[1] <= now

    def due(self, slot: Slot) -> float | None:
        entry = self.entries.get(slot)
        return entry[1] if entry else None

    def forget(self, slot: Slot) -> None:
        self.entries.pop(slot, None)

    def keep(self, wanted: set[Slot]) -> None:
        """Forget every entry of a slot that is no longer wanted."""
        self.entries = {slot: e for slot, e in self.entries.items() if slot in wanted}
