"""WorkerInfo: what a hook (pre_fork, post_fork, worker_exit) learns about a worker.

The master's own record of a worker is ``lifecycle.WorkerProcess``.
"""

from __future__ import annotations

from typing import NamedTuple


class WorkerInfo(NamedTuple):
    nr: int  # its slot, 1..N
    generation: int  # bumped by each reload
    pid: int | None = None  # None in pre_fork: not forked yet
