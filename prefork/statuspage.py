"""The status pages: what ``prefork status`` reads, without asking the master anything.

The master publishes its own facts (generation, binds, pool size, state...) as JSON in
a memfd named ``prefork-master``, and holds one ``prefork-worker`` memfd per worker
(``heartbeat.py``). A reader finds them among the master's descriptors in /proc/PID/fd
and reads them with pread: the master's loop is never involved, so status works even
while the master is busy or stuck, which is when it is wanted most. The kernel lets only
the master's own user and root open them.

The master page is a sequence lock: the sequence number is odd while the master writes,
and a reader retries until it reads the same even number before and after the JSON.

``prefork status`` is often run as root, against a PID someone else may control: a
page is read only if it is a regular file (never a FIFO that would block), at most
MASTER_PAGE_MAX bytes, and a master page must be JSON with the fields and types
prefork writes (``_check_master``); anything else is one StatusError line. Worker pages
are checked as they are parsed (``WorkerPage.parse``).
"""

from __future__ import annotations

import json
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .heartbeat import MEMFD_NAME as WORKER_MEMFD_NAME
from .heartbeat import PAGE_SIZE, WorkerPage
from .listeners import describe_server
from .process import parent_pid
from .version import __version__
from .workers import worker_model

MASTER_MEMFD_NAME = "prefork-master"
_SEQUENCE = struct.Struct("Q")
_LENGTH = struct.Struct("I")
_DATA_OFFSET = _SEQUENCE.size + _LENGTH.size
_READ_ATTEMPTS = 100
MASTER_PAGE_MAX = 1 << 16  # bytes of JSON; a master's facts take a few hundred
# What a master page holds, and the type of each value (extra keys are ignored: a newer
# prefork may add some).
_MASTER_FIELDS: dict[str, tuple[type, ...]] = {
    "board": (int,),
    "pid": (int,),
    "name": (str,),
    "version": (str,),
    "state": (str,),
    "generation": (int,),
    "reloading": (int, type(None)),
    "workers": (int,),
    "worker_class": (str,),
    "binds": (list,),
    "served_by_exited": (int,),
}


class StatusError(Exception):
    """Why a process's status cannot be read: one line for the user."""


class MasterPage:
    """The master's side: publish its facts when they change."""

    def __init__(self) -> None:
        self._fd = os.memfd_create(MASTER_MEMFD_NAME, os.MFD_CLOEXEC)
        self._sequence = 0
        self._published = b""

    def fileno(self) -> int:
        return self._fd

    def publish(self, facts: dict[str, Any]) -> None:
        data = json.dumps(facts, sort_keys=True).encode()
        if data == self._published:
            return
        self._sequence += 1  # odd: being written
        os.pwrite(self._fd, _SEQUENCE.pack(self._sequence), 0)
        os.pwrite(self._fd, _LENGTH.pack(len(data)) + data, _SEQUENCE.size)
        self._sequence += 1
        os.pwrite(self._fd, _SEQUENCE.pack(self._sequence), 0)
        self._published = data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def master_facts(arbiter: Any, board: int, served_by_exited: int, ready: bool) -> dict[str, Any]:
    """What the master page says of ``arbiter`` (an Arbiter) now."""
    pool, generations = arbiter.pool, arbiter.generations
    serving, starting = generations.serving, generations.starting
    if pool.stopping:
        state = "stopping"
    elif starting is not None:
        state = "reloading"
    else:
        state = "serving" if ready else "starting"
    return {
        "board": board,
        "pid": os.getpid(),
        "name": arbiter.name,
        "version": __version__,
        "state": state,
        "generation": serving.number,
        "reloading": starting.number if starting is not None else None,
        "workers": serving.size,
        "worker_class": worker_model(serving.servers[0]),
        "binds": [describe_server(s) for s in serving.servers],
        "served_by_exited": served_by_exited,
        # Which pages are whose, by the master's own records: a worker can write
        # anything into its page, its pid included.
        "pages": [
            [w.pid, w.nr, w.generation, w.heartbeat.fileno()]
            for w in pool.workers.values()
            if w.heartbeat is not None
        ],
    }


@dataclass
class Board:
    """One master's facts and its workers' pages, as read at one moment."""

    master: dict[str, Any]
    workers: list[WorkerPage] = field(default_factory=list)


def read_boards(pid: int) -> list[Board]:
    """Every prefork master running in process ``pid`` (one, unless a program runs several
    servers), with its workers. StatusError when there is none or it cannot be read.

    Which pages are workers', and whose, comes from the master's page (its own records):
    a worker may write anything into its page, its PID and slot included. (A master
    before this version lists none; its pages are then matched by their board id.)
    """
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        raise StatusError(f"no process with PID {pid}") from None
    except PermissionError:
        raise _permission_denied(pid) from None
    masters: list[dict[str, Any]] = []
    unlisted: list[WorkerPage] = []
    now = time.monotonic()
    for name in names:
        kind = _page_kind(fd_dir, name)
        if kind == "master":
            facts = _check_master(_read_page(fd_dir, name, pid, _read_master_page), pid)
            if facts["pid"] != pid:  # anyone can make a memfd by that name
                raise StatusError(f"PID {pid}: its status page says it is PID {facts['pid']}")
            masters.append(facts)
        elif kind == "worker":
            page = _read_worker_page(fd_dir, name, pid, now)
            if page is not None and _is_pid(page.pid):  # zero until the master forks it
                unlisted.append(page)
    if not masters:
        raise StatusError(f"PID {pid} is not a prefork master{_master_hint(pid)}")
    boards = [Board(m) for m in sorted(masters, key=lambda m: m.get("board", 0))]
    for board in boards:
        listed = board.master.get("pages")
        if listed is None:  # an older master
            unique = {
                p.pid: p
                for p in unlisted
                if p.board == board.master.get("board") and _is_child(p.pid, pid)
            }
            board.workers = list(unique.values())  # see heartbeat._UNTRACKED
        else:
            for worker_pid, slot, generation, fd in listed:
                if not _is_child(worker_pid, pid):
                    continue  # gone meanwhile, or never its worker: a page that lies
                page = _read_worker_page(fd_dir, str(fd), pid, now)
                if page is not None:
                    board.workers.append(
                        page._replace(pid=worker_pid, slot=slot, generation=generation)
                    )
        board.workers.sort(key=lambda p: (p.slot, p.generation, p.pid))
    return boards


def _is_child(pid: int, parent: int) -> bool:
    return parent_pid(pid) == parent


def _page_kind(fd_dir: str, name: str) -> str | None:
    try:
        target = os.readlink(f"{fd_dir}/{name}")
    except OSError:
        return None  # closed meanwhile
    if target.startswith(f"/memfd:{MASTER_MEMFD_NAME} "):
        return "master"
    if target.startswith(f"/memfd:{WORKER_MEMFD_NAME} "):
        return "worker"
    return None


def _read_worker_page(fd_dir: str, name: str, pid: int, now: float) -> WorkerPage | None:
    if _page_kind(fd_dir, name) != "worker":
        return None  # the worker exited and the number was reused, say

    def parse(fd: int) -> WorkerPage:
        return WorkerPage.parse(os.pread(fd, PAGE_SIZE, 0), now)

    page: WorkerPage | None = _read_page(fd_dir, name, pid, parse)
    return page


def _read_page(fd_dir: str, name: str, pid: int, read: Callable[[int], Any]) -> Any:
    """``read`` applied to a descriptor of ``/proc/PID/fd/NAME``, if it is a regular file
    (a FIFO named like a page would block); None if it went away meanwhile."""
    try:
        fd = os.open(f"{fd_dir}/{name}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # a worker's page closed as it exited
    except PermissionError:
        raise _permission_denied(pid) from None
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StatusError(f"PID {pid}: descriptor {name} is not a status page")
        return read(fd)
    finally:
        os.close(fd)


def _permission_denied(pid: int) -> StatusError:
    return StatusError(
        f"cannot read the status of PID {pid}: permission denied "
        "(run as the server's user or as root)"
    )


def _read_master_page(fd: int) -> dict[str, Any]:
    for _ in range(_READ_ATTEMPTS):
        header = os.pread(fd, _DATA_OFFSET, 0)
        if len(header) < _DATA_OFFSET:
            time.sleep(0.001)  # created, not yet published: the master's next turn writes it
            continue
        (before,) = _SEQUENCE.unpack_from(header)
        (length,) = _LENGTH.unpack_from(header, _SEQUENCE.size)
        if before % 2:
            continue
        if length > MASTER_PAGE_MAX:
            raise StatusError(f"the master's status page claims {length} bytes; not prefork's")
        data = os.pread(fd, length, _DATA_OFFSET)
        (after,) = _SEQUENCE.unpack(os.pread(fd, _SEQUENCE.size, 0))
        if before == after:
            try:
                return json.loads(data)  # type: ignore[no-any-return]
            except (ValueError, RecursionError):
                raise StatusError("the master's status page is not JSON; not prefork's") from None
    raise StatusError("the master's status page keeps changing; try again")


def _check_master(facts: Any, pid: int) -> dict[str, Any]:
    """The page's facts if they are what prefork writes; StatusError naming what is not."""

    def bad(why: str) -> StatusError:
        return StatusError(f"PID {pid}: its status page is not one prefork writes ({why})")

    if not isinstance(facts, dict):
        raise bad("not a JSON object")
    for key, types in _MASTER_FIELDS.items():
        value = facts.get(key, ...)
        if value is ...:
            raise bad(f"no {key!r}")
        if isinstance(value, bool) or not isinstance(value, types):
            raise bad(f"{key!r} is {type(value).__name__}")
    if not all(isinstance(bind, str) for bind in facts["binds"]):
        raise bad("'binds' holds something other than text")
    if not _is_pid(facts["pid"]):
        raise bad("a PID that cannot be")
    pages = facts.get("pages", [])  # absent from a master before this version
    if not isinstance(pages, list) or not all(_is_worker_entry(w) for w in pages):
        raise bad("'pages' is not a list of [pid, slot, generation, descriptor]")
    return facts


def _is_worker_entry(entry: object) -> bool:
    if not isinstance(entry, list) or len(entry) != 4:
        return False
    if any(isinstance(n, bool) or not isinstance(n, int) for n in entry):
        return False
    pid, slot, generation, fd = entry
    return _is_pid(pid) and slot > 0 and generation > 0 and 0 <= fd < 2**31


def _is_pid(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**22


def _master_hint(pid: int) -> str:
    """A worker's PID given instead of its master's: say which one to ask."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        with open(f"/proc/{pid}/maps", "rb") as maps:
            is_worker = f"/memfd:{WORKER_MEMFD_NAME}".encode() in maps.read()
    except (OSError, ValueError, IndexError):
        return ""
    return f" (it is a prefork worker; its master is PID {ppid})" if is_worker else ""
