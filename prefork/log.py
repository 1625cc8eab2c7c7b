"""Logging for ``prefork run``: the ``prefork`` loggers to stderr or a file, text or JSON.

Every line names its process: ``master`` or ``worker N``, and the PID. USR1 reopens the
log file in the master and in every worker (for logrotate: move the file, send USR1).
The library never configures logging; it only logs to ``prefork.*`` loggers.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import IO, Any

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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, pid, slot, logger, message (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(),
            "level": record.levelname,
            "pid": record.process,
            "slot": getattr(record, "slot", "master"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


_slot = _Slot()


def configure(level: str, path: str | None = None, fmt: str = "text") -> None:
    """Send the prefork loggers to ``path`` (appending) or stderr, in ``fmt``."""
    handler: logging.Handler
    if path:
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT, "%Y-%m-%d %H:%M:%S")
    )
    handler.addFilter(_slot)
    logger = logging.getLogger(_LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False  # the app's own root logger set-up stays the app's


def set_slot(slot: str) -> None:
    """In a worker, right after the fork: its lines say 'worker N' from now on."""
    _slot.slot = slot


def reopen() -> bool:
    """Reopen the log file (USR1). False when logging to a stream, where there is nothing
    to reopen. The file opens again at its path on the next line written."""
    reopened = False
    for handler in logging.getLogger(_LOGGER).handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()
            reopened = True
    return reopened


def stack_stream() -> IO[str]:
    """Where a worker's stack dump goes: the log file if there is one, else stderr."""
    for handler in logging.getLogger(_LOGGER).handlers:
        if isinstance(handler, logging.FileHandler):
            if handler.stream is None:  # closed by reopen(): open it at its path again
                handler.stream = handler._open()
            return handler.stream
    return sys.stderr
