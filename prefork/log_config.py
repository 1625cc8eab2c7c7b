"""--log-config FILE: a ``logging.config.dictConfig`` for the app's own loggers and handlers.

JSON (``.json``) or TOML (``.toml``), read as config files are read (``paths``: no FIFO,
no huge file; as root, refused when anyone else could change it, since the handlers it
names are classes the master imports and builds). Applied in the master after prefork's
own logging, before any worker is forked, so every worker inherits it. ``version``
defaults to 1 and ``disable_existing_loggers`` to false (as gunicorn's
``logconfig_dict`` does): dictConfig's own default would silence prefork's loggers,
which exist by then. A ``prefork`` logger in the file replaces prefork's own set-up.
USR1 reopens the file handlers it makes (``logging.FileHandler`` and its subclasses
opened for appending), with prefork's own log file.

The master may run as root while the log directories belong to the workers' user, so
the file handlers it makes never open their files as ``logging`` does (``open()``
follows a symlink planted at the path: root would truncate, or hand the workers a
descriptor appending to, whatever it points at). Each is made with ``delay`` and its
``_open`` replaced by ``paths.open_for_append`` (no final symlink, no FIFO, a file it
creates given to the workers' user), then opened at once so that a refusal is one line
at start. A handler built by a ``"()"`` factory opens its file itself: as root, prefer
``"class"``.
"""

from __future__ import annotations

import json
import logging.config
import os
import pkgutil
import sys
from typing import IO, Any

from . import log as prefork_log
from .config_file import parse_toml_file
from .errors import ConfigError, PreforkError
from .paths import Owner, changeable_by_others, open_for_append, read_small_file


def check(path: str) -> dict[str, Any]:
    """What ``apply`` would apply, read and checked as far as that goes without applying
    it (--check-config, and USR2's check: nothing is opened or built)."""
    if os.geteuid() == 0 and (why := changeable_by_others(path)):
        raise ConfigError(f"refusing --log-config {path} as root: {why}")
    return _read(path)


def apply(path: str, owner: Owner | None = None) -> None:
    """Read ``path`` and apply it; ConfigError, one line naming the file, if it cannot.
    ``owner``: the workers' user, given the files the handlers create (as for --log-file)."""
    config = check(path)
    config.setdefault("version", 1)
    config.setdefault("disable_existing_loggers", False)
    eager = _delay_file_handlers(config)
    before = set(_file_handlers())
    try:
        logging.config.dictConfig(config)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        cause = exc.__cause__ or exc  # dictConfig wraps the handler's own error
        raise ConfigError(f"--log-config {path}: {' '.join(str(cause).split())}") from None
    made = [h for h in _file_handlers() if h not in before]
    for handler in made:
        opener = _SafeOpener(handler, owner)
        handler._open = opener  # type: ignore[method-assign,assignment]
        if handler.stream is None and handler.name in eager:
            handler.stream = opener.open()  # type: ignore[assignment] # refused: one line
    prefork_log.reopen_with_ours(made)


def _delay_file_handlers(config: dict[str, Any]) -> set[str]:
    """Make every ``logging.FileHandler`` of ``config`` with ``delay`` (so that dictConfig
    opens nothing); the names of those the user did not ask to delay themselves."""
    eager = set()
    handlers = config.get("handlers")
    for name, entry in handlers.items() if isinstance(handlers, dict) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
            continue
        try:
            kind = pkgutil.resolve_name(entry["class"])
        except Exception:  # noqa: BLE001 - dictConfig says what is wrong with it
            continue
        if isinstance(kind, type) and issubclass(kind, logging.FileHandler):
            if not entry.get("delay"):
                eager.add(name)
            entry["delay"] = True
    return eager


class _SafeOpener:
    """A file handler's ``_open``: the path through ``open_for_append`` (truncated for
    mode "w"), as the workers' user's file when root makes it. Refused after start (a
    symlink planted after rotation), one line on stderr and the lines go to stderr until
    the next USR1, as prefork's own log file does: ``FileHandler.emit`` would otherwise
    raise the refusal into whatever code logged."""

    def __init__(self, handler: logging.FileHandler, owner: Owner | None) -> None:
        self.handler, self.owner = handler, owner

    def open(self) -> IO[Any]:
        handler = self.handler
        owner = self.owner if os.geteuid() == 0 else None  # a worker reopens as itself
        fd = open_for_append(handler.baseFilename, owner, "log file")
        try:
            if handler.mode.startswith("w"):
                os.ftruncate(fd, 0)
            if "b" in handler.mode:
                return os.fdopen(fd, "ab")
            return os.fdopen(fd, "a", encoding=handler.encoding, errors=handler.errors)
        except BaseException:
            os.close(fd)
            raise

    def __call__(self) -> IO[Any]:
        try:
            return self.open()
        except (OSError, PreforkError) as exc:
            print(f"prefork: {exc}; logging to stderr", file=sys.stderr, flush=True)
            return os.fdopen(os.dup(2), "a", errors="backslashreplace")


def _file_handlers() -> list[logging.FileHandler]:
    """The file handlers of every logger there is (the root's included)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        handler
        for logger in loggers
        if isinstance(logger, logging.Logger)
        for handler in logger.handlers
        if isinstance(handler, logging.FileHandler)
    ]


def _read(path: str) -> dict[str, Any]:
    if path.endswith(".toml"):
        return parse_toml_file(path)
    if not path.endswith(".json"):
        raise ConfigError(f"--log-config {path}: the name must end in .json or .toml")
    try:
        data = json.loads(read_small_file(path, "log config").decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"--log-config {path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"--log-config {path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--log-config {path}: not a JSON object")
    return data
