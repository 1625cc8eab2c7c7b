"""Logging for ``prefork run``: the ``prefork`` loggers to stderr or a file, text or JSON.

Every line names its process: ``master`` or ``worker N``, and the PID. USR1 reopens the
log file in the master and in every worker (for logrotate: move the file, send USR1).
The library logs to ``prefork.*`` loggers, which reach the host's logging configuration
(its root logger's handlers and level). A host that has none would lose them (logging's
last resort shows warnings only): ``serve_forever`` then sends them to stderr, as
``prefork run`` does (``configure_if_unconfigured``).

Lines may carry text from clients (a Unix peer's path) or from workers (a boot error),
so the text format escapes whatever is not printable (``escape.printable``): a line
stays one line and cannot drive the terminal that shows it. JSON does the same by its
own escapes. The log file is opened through ``paths.open_for_append``: never through a
symlink, and given to the workers' user through the descriptor, at start and at every
reopen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import IO, Any

from .errors import PreforkError
from .escape import printable, printable_lines, printable_traceback
from .paths import Owner, open_for_append

TEXT_FORMAT = "%(asctime)s [%(process)d] [%(slot)s] [%(levelname)s] %(message)s"
_LOGGER = "prefork"


class _Slot(logging.Filter):
    """Stamps every record with the process's role: 'master' or 'worker N'."""

    def __init__(self) -> None:
        super().__init__()
        self.slot = "master"

    def filter(self, record: logging.LogRecord) -> bool:
        record.slot = self.slot
        return True


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with the message and any traceback made printable."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802
        return printable_traceback(ei[1]) if ei[1] is not None else ""

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return printable_lines(super().formatStack(stack_info))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, pid, slot, logger, message (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "pid": record.process,
            "slot": getattr(record, "slot", "master"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _iso_time(created: float) -> str:
    import datetime  # here: only --log-format json pays for its import

    return datetime.datetime.fromtimestamp(created).astimezone().isoformat()


class LogFile(logging.StreamHandler):  # type: ignore[type-arg]
    """Appends to a file opened safely (see the module docstring); ``reopen`` closes it,
    and the next line opens the path again. Should that fail (a symlink planted there
    after rotation, a vanished directory), one line says so on stderr and the lines go
    to stderr until the next reopen."""

    def __init__(self, path: str, owner: Owner | None = None) -> None:
        self.path, self.owner = os.path.abspath(path), owner
        super().__init__(self._open())
        self._on_stderr = False

    def _open(self) -> IO[str]:
        owner = self.owner if os.geteuid() == 0 else None  # a worker reopens as itself
        fd = open_for_append(self.path, owner, "log file")
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")

    def ensure_open(self) -> IO[str]:
        if self.stream is None:
            try:
                self.stream = self._open()
            except (OSError, PreforkError) as exc:
                print(f"prefork: {exc}; logging to stderr", file=sys.stderr, flush=True)
                self.stream, self._on_stderr = sys.stderr, True
        return self.stream  # type: ignore[no-any-return]

    @property
    def on_stderr(self) -> bool:
        return self._on_stderr

    def emit(self, record: logging.LogRecord) -> None:
        self.ensure_open()
        super().emit(record)

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None and not self._on_stderr:
                self.stream.close()
            self.stream, self._on_stderr = None, False
        finally:
            self.release()

    def close(self) -> None:
        self.reopen()
        super().close()


_slot = _Slot()


def configure(
    level: str, path: str | None = None, fmt: str = "text", owner: Owner | None = None
) -> None:
    """Send the prefork loggers to ``path`` (appending) or stderr, in ``fmt``. ``owner``:
    the workers' user, who must be able to reopen the file (PathError if refused)."""
    handler: logging.Handler = LogFile(path, owner) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT, "%Y-%m-%d %H:%M:%S")
    )
    handler.addFilter(_slot)
    logger = logging.getLogger(_LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False  # the app's own root logger set-up stays the app's


def configure_if_unconfigured() -> bool:
    """The library's serve_forever: prefork's lines to stderr at info level, as
    ``prefork run`` logs them, unless the host configured logging (a handler on the root
    logger or on prefork's, or a level on prefork's): whether it did configure them."""
    root, ours = logging.getLogger(), logging.getLogger(_LOGGER)
    if root.handlers or ours.handlers or ours.level != logging.NOTSET:
        return False
    configure("info")
    return True


_capturing = False  # --capture-output: descriptors 1 and 2 follow the log file


def capture_output() -> None:
    """--capture-output: descriptors 1 and 2 become the log file's (stdout joins stderr
    when the log goes to stderr), here and in every worker forked from now on; stdout is
    line-buffered, so that a print reaches the file when it is made."""
    global _capturing
    _capturing = True
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _point_stdio_at_the_log()
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(Exception):
            reconfigure(line_buffering=True)


def _point_stdio_at_the_log() -> None:
    target = 2
    for handler in logging.getLogger(_LOGGER).handlers:
        if isinstance(handler, LogFile):
            stream = handler.ensure_open()
            if not handler.on_stderr:
                target = stream.fileno()
    for fd in (1, 2):
        if fd != target:
            os.dup2(target, fd)


def set_slot(slot: str) -> None:
    """In a worker, right after the fork: its lines say 'worker N' from now on."""
    _slot.slot = slot


_app_files: list[logging.FileHandler] = []  # --log-config's, reopened with ours


def reopen_with_ours(handlers: list[logging.FileHandler]) -> None:
    """USR1 reopens these file handlers too (--log-config's): closed, so that each
    opens its file again at its path with the next line it writes, as gunicorn's USR1
    does for the handlers of its loggers. A handler opened with mode "w" is left alone:
    opened again, it would empty a file that was not moved."""
    _app_files.extend(h for h in handlers if h.mode.startswith("a"))


def _reopen_app_files() -> None:
    for handler in _app_files:
        handler.acquire()
        try:
            if handler.stream is not None:
                with contextlib.suppress(Exception):  # a full disk must not stop the rest
                    handler.stream.close()  # flushes first
                handler.stream = None
        finally:
            handler.release()


def reopen(eagerly: bool = False) -> bool:
    """Reopen the log file (USR1). False when logging to a stream, where there is nothing
    to reopen, or when the file could not be opened again (said on stderr). The file
    opens again at its path on the next line written, or at once (``eagerly``: the
    master, which makes the file for the workers)."""
    _reopen_app_files()
    reopened = False
    for handler in logging.getLogger(_LOGGER).handlers:
        if isinstance(handler, LogFile):
            handler.reopen()
            if eagerly or _capturing:
                handler.ensure_open()
            reopened = not handler.on_stderr
    if _capturing and reopened:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        _point_stdio_at_the_log()
    return reopened


def descriptors() -> set[int]:
    """The descriptors the prefork loggers write to (a worker keeps them)."""
    fds = set()
    for handler in logging.getLogger(_LOGGER).handlers:
        stream = getattr(handler, "stream", None)
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fds.add(stream.fileno())  # type: ignore[union-attr]
    return fds


def stack_stream() -> IO[str] | int:
    """Where a worker's stack dump goes: the log file if there is one, else stderr; its
    descriptor 2 when ``sys.stderr`` is not a file (Jupyter, IDLE, pytest's capture,
    ``contextlib.redirect_stderr``): faulthandler writes to a descriptor, and asking such
    a stream for one failed every worker's boot."""
    for handler in logging.getLogger(_LOGGER).handlers:
        if isinstance(handler, LogFile):
            return handler.ensure_open()
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return 2
    return sys.stderr
