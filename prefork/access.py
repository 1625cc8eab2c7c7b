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

For a WSGI app the line is one per request, in ``--access-log-format`` (gunicorn's
atoms; the combined log format by default): ``HttpAtoms`` makes each atom's text from
the request's environ, status and response headers at flush time, escaped (control
characters, and ``"`` inside the quoted fields: the client writes these).
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


COMBINED = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
# One request's facts: finished (wall clock), seconds, environ, status, bytes, headers
HttpEntry = tuple[float, float, dict[str, Any], str, int, list[tuple[str, str]]]


class HttpAtoms:
    """gunicorn's access-log atoms for one request, as a mapping for ``%`` formatting."""

    def __init__(self, entry: HttpEntry, pid: int) -> None:
        self.finished, self.seconds, self.environ, self.status, self.sent, self.headers = entry
        self.pid = pid

    def __getitem__(self, key: str) -> str:
        return printable(self.raw(key)).replace('"', '\\"')

    def raw(self, key: str) -> str:
        """The atom's text unescaped (for JSON, which escapes it itself)."""
        environ = self.environ
        if key.startswith("{") and key[-1] in "ieo" and "}" in key:
            name, kind = key[1:-2].lower(), key[-1]
            if kind == "i":
                return str(environ.get("HTTP_" + name.upper().replace("-", "_"), "-"))
            if kind == "e":
                return str(environ.get(key[1:-2], "-"))
            return next((v for n, v in self.headers if n.lower() == name), "-")
        simple = {
            "h": environ.get("REMOTE_ADDR") or "-", "l": "-",
            "u": environ.get("REMOTE_USER") or "-",
            "t": time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(self.finished)),
            "m": environ.get("REQUEST_METHOD", "-"), "U": environ.get("PATH_INFO", "-"),
            "q": environ.get("QUERY_STRING", ""), "H": environ.get("SERVER_PROTOCOL", "-"),
            "s": self.status[:3] or "-", "B": str(self.sent),
            "b": str(self.sent) if self.sent else "-",
            "f": environ.get("HTTP_REFERER", "-"), "a": environ.get("HTTP_USER_AGENT", "-"),
            "T": str(int(self.seconds)), "D": str(int(self.seconds * 1_000_000)),
            "M": str(int(self.seconds * 1000)), "L": f"{self.seconds:.6f}", "p": f"<{self.pid}>",
        }  # fmt: skip
        if key == "r":
            raw = environ.get("RAW_URI")
            if raw is None:
                return "-"
            return f"{environ.get('REQUEST_METHOD')} {raw} {environ.get('SERVER_PROTOCOL')}"
        return str(simple.get(key, "-"))


def check_http_format(fmt: str) -> None:
    """ConfigError, one line, when ``fmt`` is not a format of atoms."""
    entry: HttpEntry = (0.0, 0.0, {}, "200 OK", 0, [])
    try:
        fmt % HttpAtoms(entry, 0)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"access_log_format {fmt!r}: {exc}") from None


class AccessLog:
    def __init__(self, path: str, fmt: str, slot: int, http_format: str | None = None) -> None:
        self.path = path
        self.http_format = http_format or COMBINED
        self.direct = False  # a connection child: write each line at once
        self._fd = open_access_log(path)
        self._json = fmt == "json"
        self._slot, self._pid = slot, os.getpid()
        self._who = f"worker {slot} ({self._pid})"
        self._entries: deque[tuple[Any, ...]] = deque()  # connections' (4) and requests' (6)
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

    def record_http(self, entry: HttpEntry) -> None:
        """A WSGI request's line, queued as its facts (formatted at flush)."""
        self._entries.append(entry)
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

    def _format(self, entry: tuple[Any, ...]) -> str:
        if len(entry) == 6:
            return self._format_http(entry)
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

    def _format_http(self, entry: HttpEntry) -> str:
        atoms = HttpAtoms(entry, self._pid)
        if self._json:
            fields = {
                "time": atoms.finished, "client": atoms.raw("h"), "method": atoms.raw("m"),
                "path": atoms.raw("U"), "query": atoms.raw("q"), "protocol": atoms.raw("H"),
                "status": int(atoms.status[:3] or 0), "bytes": atoms.sent,
                "referer": atoms.raw("f"), "user_agent": atoms.raw("a"),
                "duration": round(atoms.seconds, 6), "worker": self._slot, "pid": self._pid,
            }  # fmt: skip
            return json.dumps(fields) + "\n"
        try:
            return self.http_format % atoms + "\n"
        except (ValueError, TypeError, KeyError):  # checked at start: cannot happen
            return COMBINED % atoms + "\n"

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
