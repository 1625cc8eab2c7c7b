"""The handover of a USR2: what one image of the master tells the next, and its checks.

The sockets travel at descriptors 3, 4, ... with the systemd protocol (LISTEN_FDS,
LISTEN_PID). Everything else is one JSON document in a memfd whose descriptor number is
the only thing in the environment (``PREFORK_HANDOVER_FD``): every worker with its
state and what was left of its deadline, its status pipe and page, the master pipe, the
--reuse-port sockets of each slot, the generation counter, the status board, the
standard-library modules the check found. Fields this version does not know are
ignored and missing ones take their defaults, so another version of prefork can be on
either side (an older one put the JSON itself in ``PREFORK_HANDOVER``: still read).

Nothing handed over is believed blindly: a worker must be a child of this process and
its pipe a pipe, a page must be a prefork-worker memfd, a socket a socket; whatever is
not is dropped with one line (its descriptor closed). Everything adopted is made
close-on-exec again: a handler that starts a process must not give it these.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .heartbeat import MEMFD_NAME as WORKER_MEMFD_NAME
from .process import parent_pid

log = logging.getLogger("prefork.upgrade")

HANDOVER_FD_ENV = "PREFORK_HANDOVER_FD"
HANDOVER_ENV = "PREFORK_HANDOVER"  # how prefork before this version handed over
HANDOVER_VERSION = 2
MAX_HANDOVER = 1 << 24  # bytes: more than any handover of 1,024 workers


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
    stdlib: list[str] | None = None  # what the check imported: None, the new image checks
    # The old image's settings (Config's fields) and working directory: should the new
    # image fail where the check passed a moment before, it serves on with them.
    settings: dict[str, Any] | None = None
    app_dir: str = ""
    version: int = HANDOVER_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Handover:
        """Fields this version does not know are left out, and missing ones take their
        defaults: another version of prefork may be on the other side."""
        data = _known(cls, json.loads(text))
        data["workers"] = [
            AdoptedWorker(**_known(AdoptedWorker, w)) for w in data.get("workers", [])
        ]
        return cls(**data)

    def descriptors(self) -> list[int]:
        """Every descriptor the payload names (the sockets at 3, 4, ... aside)."""
        fds = [self.master_r, self.master_w]
        for worker in self.workers:
            fds.append(worker.status_fd)
            if worker.heartbeat_fd >= 0:
                fds.append(worker.heartbeat_fd)
        fds.extend(fd for slot in self.slot_sockets.values() for fd in slot if fd >= 0)
        return fds

    def renumber(self, moved: dict[int, int]) -> None:
        """The descriptors as they will be numbered in the new image."""
        self.master_r, self.master_w = moved[self.master_r], moved[self.master_w]
        for worker in self.workers:
            worker.status_fd = moved[worker.status_fd]
            if worker.heartbeat_fd >= 0:
                worker.heartbeat_fd = moved[worker.heartbeat_fd]
        for fds in self.slot_sockets.values():
            fds[:] = [moved[fd] if fd >= 0 else -1 for fd in fds]


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


def write_handover(handover: Handover) -> int:
    """A memfd holding the handover, inheritable (it crosses the execve): its number."""
    fd = os.memfd_create("prefork-handover", 0)
    data = handover.to_json().encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def take_handover(environ: MutableMapping[str, str] | None = None) -> Handover | None:
    """The handover this image was given, if it is an upgrade; the variables go."""
    env = os.environ if environ is None else environ
    legacy, number = env.pop(HANDOVER_ENV, None), env.pop(HANDOVER_FD_ENV, None)
    if number is not None and number.isdigit():
        fd = int(number)
        try:
            data = os.read(fd, MAX_HANDOVER)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        return Handover.from_json(data)
    return Handover.from_json(legacy) if legacy else None


def checked(handover: Handover) -> Handover:
    """The handover less what is not what it claims (see the module docstring)."""
    for fd in (handover.master_r, handover.master_w):
        if not _is(fd, stat.S_ISFIFO):
            log.error("the handed-over master pipe (fd %d) is not a pipe", fd)
    keep = []
    for worker in handover.workers:
        why = _not_ours(worker)
        if why:
            log.error("not adopting pid %d (worker %d): %s", worker.pid, worker.nr, why)
            for fd in (worker.status_fd, worker.heartbeat_fd):
                _close(fd)
            continue
        if worker.heartbeat_fd >= 0 and not _is_worker_page(worker.heartbeat_fd):
            log.error("worker %d (pid %d): no page adopted: not one", worker.nr, worker.pid)
            _close(worker.heartbeat_fd)
            worker.heartbeat_fd = -1
        keep.append(worker)
    handover.workers = keep
    for slot, fds in handover.slot_sockets.items():
        for index, fd in enumerate(fds):
            if fd >= 0 and not _is(fd, stat.S_ISSOCK):
                log.error("slot %s's socket (fd %d) is not a socket; dropped", slot, fd)
                fds[index] = -1
    for fd in handover.descriptors():
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
    return handover


def _not_ours(worker: AdoptedWorker) -> str:
    parent = parent_pid(worker.pid)
    if parent is None:
        return "no such process"
    if parent != os.getpid():
        return f"it is not a child of this process (its parent is pid {parent})"
    if not _is(worker.status_fd, stat.S_ISFIFO):
        return f"its status pipe (fd {worker.status_fd}) is not a pipe"
    return ""


def _is(fd: int, kind: Any) -> bool:
    try:
        return bool(kind(os.fstat(fd).st_mode))
    except OSError:
        return False


def _is_worker_page(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{WORKER_MEMFD_NAME} ")
    except OSError:
        return False


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
