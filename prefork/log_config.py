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
"""

from __future__ import annotations

import json
import logging.config
import os
from typing import Any

from . import log as prefork_log
from .config_file import parse_toml_file
from .errors import ConfigError
from .paths import changeable_by_others, read_small_file


def check(path: str) -> dict[str, Any]:
    """What ``apply`` would apply, read and checked as far as that goes without applying
    it (--check-config, and USR2's check: nothing is opened or built)."""
    if os.geteuid() == 0 and (why := changeable_by_others(path)):
        raise ConfigError(f"refusing --log-config {path} as root: {why}")
    return _read(path)


def apply(path: str) -> None:
    """Read ``path`` and apply it; ConfigError, one line naming the file, if it cannot."""
    config = check(path)
    config.setdefault("version", 1)
    config.setdefault("disable_existing_loggers", False)
    before = set(_file_handlers())
    try:
        logging.config.dictConfig(config)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        cause = exc.__cause__ or exc  # dictConfig wraps the handler's own error
        raise ConfigError(f"--log-config {path}: {' '.join(str(cause).split())}") from None
    prefork_log.reopen_with_ours([h for h in _file_handlers() if h not in before])


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
