"""The access log: one line per connection or datagram, written off the request path.

A line says when the request finished, the client, the worker (slot and PID), how long
the handler took and how it ended: ``ok``, or ``error`` and the exception's name.

The request path only appends the request's facts to a queue (a deque: handler threads
append while the worker's loop writes). The worker's loop formats and writes the queue
in one ``write`` once a second, or every 256 requests under load, and at exit: a line
may appear up to about a second after its request (nginx's ``buffer=``/``flush=`` do
the same). A connection child of the fork worker writes its line at once, as
it exits right after. The file is opened with O_APPEND, so the workers' writes never
overwrite each other; USR1 reopens it (for logrotate).

Lines follow ``--log-format``: text, or one JSON object per line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import ConfigError, PreforkError
from .escape import printable
from .heartbeat import describe_client
from .paths import Owner, open_for_append

log = logging.getLogger("prefork.worker")

FLUSH_LINES = 256  # write at least this often under load
FLUSH_SECONDS = 1.0
STDERR = "-"

FinishRequest = Callable[[Any, Any], None]


def open_access_log(path: str, owner: Owner | None = None) -> int:
    """A descriptor to append to (never through a symlink; see paths.py); PathError or
    OSError if it cannot be opened. ``owner``: the master, as root, hands the file to
    the workers' user, who open it themselves."""
    if path == STDERR:
        return os.dup(sys.stderr.fileno())
    return open_for_append(path, owner, "access log")


def prepare_access_log(path: str, owner: Owner | None = None) -> None:
    """Create (or check) the access log for the workers, who open it themselves: at
    start, so a bad path is one line there rather than a failure in every worker, and on
    USR1, so a rotated file is there, theirs, before they reopen it."""
    try:
        os.close(open_access_log(path, owner))
    except OSError as exc:
        raise ConfigError(f"cannot open access log {path}: {exc.strerror}") from None


class AccessLog:
    def __init__(self, path: str, fmt: str, slot: int) -> None:
        self.path = path
        self.direct = False  # a connection child: write each line at once
        self._fd = open_access_log(path)
        self._json = fmt == "json"
        self._slot, self._pid = slot, os.getpid()
        self._who = f"worker {slot} ({self._pid})"
        self._entries: deque[tuple[float, Any, float, str]] = deque()
        self._flushed_at = time.monotonic()
        self._second = -1
        self._stamp = ""

    def wrap(self, finish_request: FinishRequest) -> FinishRequest:
        """``server.finish_request``, timed and logged (installed only when logging)."""
        clock, record = time.monotonic, self.record

        def finish_request_logged(request: Any, client_address: Any) -> None:
            started, outcome = clock(), "ok"
            try:
                finish_request(request, client_address)
            except BaseException as exc:
                outcome = f"error {type(exc).__name__}"
                raise
            finally:
                record(client_address, clock() - started, outcome)

        return finish_request_logged

    def record(self, client_address: Any, seconds: float, outcome: str) -> None:
        """The request path's share: a tuple on the queue. Formatting waits for flush()."""
        self._entries.append((time.time(), client_address, seconds, outcome))
        if self.direct:
            self.flush()

    def maybe_flush(self) -> None:
        """Once per turn of the worker's loop (which turns at least every poll interval)."""
        entries = self._entries
        if entries and (
            len(entries) >= FLUSH_LINES or time.monotonic() - self._flushed_at >= FLUSH_SECONDS
        ):
            self.flush()

    def flush(self) -> None:
        entries, pop = [], self._entries.popleft
        for _ in range(len(self._entries)):  # only what is there now: threads may append
            entries.append(pop())
        self._flushed_at = time.monotonic()
        if not entries:
            return
        data = "".join(map(self._format, entries)).encode("utf-8", "replace")
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:  # a full disk must not take the worker down
            log.warning("cannot write the access log %s: %s", self.path, exc.strerror)

    def _format(self, entry: tuple[float, Any, float, str]) -> str:
        finished, client_address, seconds, outcome = entry
        client = describe_client(client_address)  # the client's to choose: escaped below
        if self._json:
            fields = {
                "time": finished,
                "client": client,
                "worker": self._slot,
                "pid": self._pid,
                "duration": round(seconds, 6),
                "outcome": outcome,
            }
            return json.dumps(fields) + "\n"
        stamp = self._timestamp(finished)
        return f"{stamp} {printable(client)} {self._who} {seconds * 1000:.3f}ms {outcome}\n"

    def reopen(self) -> None:
        """USR1: write what is queued, then reopen at the path (logrotate moved the file)."""
        self.flush()
        try:
            fd = open_access_log(self.path)
        except (OSError, PreforkError) as exc:
            log.warning("cannot reopen the access log %s: %s", self.path, exc)
            return
        os.close(self._fd)
        self._fd = fd

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()
            os.close(self._fd)

    def _timestamp(self, now: float) -> str:
        """ISO 8601 with milliseconds and the UTC offset; formatted once per second."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S.{}%z", time.localtime(second))
        return self._stamp.format(f"{int((now - second) * 1000):03d}")
