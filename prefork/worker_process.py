"""WorkerProcess: the master's record of one worker process."""

from __future__ import annotations

from dataclasses import dataclass

from .heartbeat import Heartbeat


@dataclass(frozen=True)
class WorkerInfo:
    """What a hook (pre_fork, post_fork, worker_exit) learns about a worker."""

    nr: int  # its slot, 1..N
    generation: int  # bumped by each reload
    pid: int | None = None  # None in pre_fork: not forked yet


@dataclass
class WorkerProcess:
    """The master's record of one worker."""

    nr: int
    pid: int
    generation: int
    status_fd: int
    heartbeat: Heartbeat | None  # None: adopted across an upgrade, its page stayed behind
    started: float
    ready: bool = False
    stop_sent: int = 0  # the signal we sent to stop it, if any
    boot_error: str = ""
    kill_at: float | None = None  # stuck: its stack was asked for; SIGKILL at this time
    watches_code: bool = False  # --reload: the one worker whose RELOAD is honoured
    max_requests: int = 0  # its --max-requests with jitter: RETIRE is honoured only then
    unexpected: int = 0  # status-pipe messages it had no business sending
