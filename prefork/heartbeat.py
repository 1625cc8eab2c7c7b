"""Heartbeat: a worker's latest sign of life, and its current request, in shared memory.

One page per worker in a memfd the master creates before the fork and keeps open. The
worker writes it with no syscall (the clock is read through the vDSO): a beat once per
loop turn, and at each request its start time and client, then its end. The master
reads it to find stuck workers and to say what they were stuck on, and writes who the
worker is (pid, slot, generation) and where it stands (booting, ready, stopping).

The page is writable by the worker, whose app may be compromised, and the master may be
root: every value the master or ``prefork status`` reads back is checked where it is
read (a time must be finite and between the page's creation and now, a length at most
CLIENT_MAX, a count at most MAX_COUNT) and text is escaped. A page that fails the
checks makes its worker count as stuck; it never raises in the master.

Being a memfd rather than an anonymous mapping is what lets other processes in:
``prefork status`` opens the master's descriptor through /proc/PID/fd (the kernel
allows that to the same user and to root only), and USR2 hands the pages of the
workers it keeps to the new master image. No file on disk: nothing to clean up after a
SIGKILL, and no slow disk can fake a timeout.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import sys
import time
from typing import NamedTuple

from .escape import printable

MEMFD_NAME = "prefork-worker"
PAGE_SIZE = mmap.PAGESIZE

# Written by the worker.
_BEAT = struct.Struct("d")  # at 0: monotonic time of the last loop turn
_REQUEST = struct.Struct("dQH")  # at 8: request start (0 = idle), requests served, client length
_REQUEST_OFFSET = 8
_BEAT_AND_REQUEST = struct.Struct("ddQH")  # at 0: both, in one write (offsets as above)
_CLIENT_OFFSET = _REQUEST_OFFSET + _REQUEST.size
CLIENT_MAX = 200
_REQUEST_AND_CLIENT = struct.Struct(f"dQH{CLIENT_MAX}s")  # at 8: both, in one write
_ACTIVE = struct.Struct("I")  # requests in progress in threads or connection children
_ACTIVE_OFFSET = 232
# Written by the master.
_DRAIN_OFFSET = 240  # 1 = on TERM, drain the kernel's queue before leaving
_STATE_OFFSET = 241  # BOOTING, READY or STOPPING
_IDENTITY = struct.Struct("qIIId")  # pid, slot, generation, board, spawned (wall clock)
_IDENTITY_OFFSET = 248

# Before Python 3.13 mmap keeps a duplicate of the descriptor; a reader may then find a
# page twice among the master's descriptors (it keeps one per pid).
_UNTRACKED: dict[str, bool] = {"trackfd": False} if sys.version_info >= (3, 13) else {}

MAX_COUNT = 2**53  # requests: more than any worker serves; JSON-exact
CLOCK_SLACK = 1.0  # seconds a time read back may lie after "now" (another CPU's clock read)

BOOTING, READY, STOPPING = 0, 1, 2
STATE_NAMES = {BOOTING: "booting", READY: "ready", STOPPING: "stopping"}


def believable(value: float, earliest: float, now: float) -> bool:
    """A monotonic time a worker wrote that could be true: finite, not before
    ``earliest`` (the page's creation), not after now."""
    return math.isfinite(value) and earliest - CLOCK_SLACK <= value <= now + CLOCK_SLACK


def describe_client(client_address: object) -> str:
    """'127.0.0.1:5555', '[::1]:5555', 'unix:' (a stream Unix peer, see
    connection.unix_peer), or what a datagram Unix socket gives (often empty)."""
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        host, port = client_address[0], client_address[1]
        if port == 0 and str(host).startswith("unix:"):
            return str(host)
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(client_address, bytes):
        client_address = client_address.decode("utf-8", "replace")
    return str(client_address) or "a Unix socket peer"


class Heartbeat:
    """One worker's page. ``fd``: adopt a page handed over by the previous master image."""

    def __init__(self, fd: int | None = None) -> None:
        created = fd is None
        if fd is None:
            fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, PAGE_SIZE)
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd
        self._map = mmap.mmap(fd, PAGE_SIZE, **_UNTRACKED)
        # No time the worker writes can be older than the page (0: adopted, age unknown).
        self._born = time.monotonic() if created else 0.0
        if created:
            self.beat()

    def fileno(self) -> int:
        return self._fd

    # -- the worker's side -----------------------------------------------------------------
    def release_fd(self) -> None:
        """Worker: the mapping is all it needs; the descriptor stays the master's."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def beat(self) -> None:
        _BEAT.pack_into(self._map, 0, time.monotonic())

    def request_started(self, client_address: object, served: int) -> None:
        client = describe_client(client_address).encode("utf-8", "replace")
        length = len(client) if len(client) < CLIENT_MAX else CLIENT_MAX
        _REQUEST_AND_CLIENT.pack_into(  # "s" cuts the client to CLIENT_MAX, or pads it
            self._map, _REQUEST_OFFSET, time.monotonic(), served, length, client
        )

    def request_finished(self, served: int) -> None:
        """The request is done; and, as a beat would, that the worker is alive now."""
        _BEAT_AND_REQUEST.pack_into(self._map, 0, time.monotonic(), 0.0, served, 0)

    def set_active(self, count: int) -> None:
        """Thread and fork workers: how many requests their threads or children serve."""
        _ACTIVE.pack_into(self._map, _ACTIVE_OFFSET, count)

    # -- the master's side ----------------------------------------------------------------
    def identify(self, pid: int, nr: int, generation: int, board: int) -> None:
        _IDENTITY.pack_into(self._map, _IDENTITY_OFFSET, pid, nr, generation, board, time.time())

    def set_state(self, state: int) -> None:
        self._map[_STATE_OFFSET] = state

    def last(self) -> float | None:
        """When the worker's loop last ran; None if the page holds no believable time."""
        return self._time(_BEAT.unpack_from(self._map, 0)[0])

    def current_request(self) -> tuple[float, str] | None:
        """(seconds it has run, its client escaped) for the request in progress; None when
        idle or when the start time is not believable (``last`` tells the two apart)."""
        started, _, length = _REQUEST.unpack_from(self._map, _REQUEST_OFFSET)
        if not started or self._time(started) is None:
            return None
        length = min(length, CLIENT_MAX)
        client = self._map[_CLIENT_OFFSET : _CLIENT_OFFSET + length].decode("utf-8", "replace")
        return max(0.0, time.monotonic() - started), printable(client)

    def reading(self) -> tuple[float | None, float | None]:
        """(last beat, start of the request in progress) as far as they can be believed;
        a beat of None: the page holds an impossible time (its worker counts as stuck)."""
        now = time.monotonic()
        (beat,) = _BEAT.unpack_from(self._map, 0)
        started = _REQUEST.unpack_from(self._map, _REQUEST_OFFSET)[0]
        if not believable(beat, self._born, now):
            return None, None
        if started and not believable(started, self._born, now):
            return None, None
        return beat, started or None

    def _time(self, value: float) -> float | None:
        return value if believable(value, self._born, time.monotonic()) else None

    def request_drain(self) -> None:
        """Master: the next TERM is the final stop, so serve what is queued first."""
        self._map[_DRAIN_OFFSET] = 1

    def drain_requested(self) -> bool:
        return self._map[_DRAIN_OFFSET] == 1

    def requests_served(self) -> int:
        return min(int(_REQUEST.unpack_from(self._map, _REQUEST_OFFSET)[1]), MAX_COUNT)

    def close(self) -> None:
        self._map.close()
        self.release_fd()


class WorkerPage(NamedTuple):
    """A copy of one page as ``prefork status`` reads it (times already turned into ages)."""

    pid: int
    slot: int
    generation: int
    board: int
    spawned: float  # wall clock
    state: str  # booting, idle, busy, stopping
    requests: int
    active: int  # requests in progress (a sync worker: 0 or 1)
    client: str | None  # the current request's, where the worker records one
    request_age: float | None
    heartbeat_age: float | None  # None: the page holds no believable time

    @classmethod
    def parse(cls, page: bytes, now: float | None = None) -> WorkerPage:
        """``now``: time.monotonic() of the reader (the clock is the same for every process)."""
        now = time.monotonic() if now is None else now
        if len(page) < PAGE_SIZE:
            page = page.ljust(PAGE_SIZE, b"\0")
        (beat,) = _BEAT.unpack_from(page, 0)
        started, served, length = _REQUEST.unpack_from(page, _REQUEST_OFFSET)
        (active,) = _ACTIVE.unpack_from(page, _ACTIVE_OFFSET)
        pid, slot, generation, board, spawned = _IDENTITY.unpack_from(page, _IDENTITY_OFFSET)
        # The worker may have written anything: keep what is believable, drop the rest.
        beat_age = now - beat if believable(beat, 0.0, now) else None
        request_age = now - started if started and believable(started, 0.0, now) else None
        client = None
        if started:
            length = min(length, CLIENT_MAX)
            client = printable(
                page[_CLIENT_OFFSET : _CLIENT_OFFSET + length].decode("utf-8", "replace")
            )
            active = max(active, 1)
        master_state = page[_STATE_OFFSET]
        if master_state == READY:
            state = "busy" if active else "idle"
        else:
            state = STATE_NAMES.get(master_state, "unknown")
        return cls(
            pid=pid,
            slot=slot,
            generation=generation,
            board=board,
            spawned=spawned if math.isfinite(spawned) else 0.0,
            state=state,
            requests=min(served, MAX_COUNT),
            active=active,
            client=client,
            request_age=None if request_age is None else max(0.0, request_age),
            heartbeat_age=None if beat_age is None else max(0.0, beat_age),
        )
