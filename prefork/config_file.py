"""Config files: the settings a TOML file holds, and the settings as a file would hold them.

``--config FILE``, or ``[tool.prefork]`` in ./pyproject.toml, keyed by the options' long
names with underscores. Read with ``paths.read_small_file`` (the master may be root and
the file in a directory others can write to): a FIFO or a huge file is refused, never
read; every problem is one ConfigError line naming the file and the key.
"""

from __future__ import annotations

import json
import os
import re
import sys
import typing
from dataclasses import fields
from typing import Any

from .config import NOT_IN_FILE, Config, file_key
from .errors import ConfigError
from .paths import read_small_file
from .validate import check_type


def read_config_file(path: str, table: tuple[str, ...] = ()) -> dict[str, Any]:
    """Settings by field name from a TOML file (inside ``table``, e.g. tool.prefork).

    Every problem is one ConfigError line naming the file, the key and what was expected.
    """
    data: Any = parse_toml_file(path)
    for name in table:
        data = data.get(name, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: {'.'.join(table)} is not a table")
    by_key = {file_key(f): f for f in fields(Config) if f.name not in NOT_IN_FILE}
    hints = typing.get_type_hints(Config)
    settings: dict[str, Any] = {}
    for key, value in data.items():
        setting_field = by_key.get(key)
        if setting_field is None:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        hint = hints[setting_field.name]
        if typing.get_origin(hint) is tuple:
            value = (value,) if isinstance(value, str) else value
            value = tuple(value) if isinstance(value, list) else value
        try:
            check_type(key, value, hint)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        settings[setting_field.name] = value
    try:
        Config(**settings)  # ranges: "workers must be at least 1", naming the file
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return settings


def find_config_file(given: str | None, cwd: str = ".") -> tuple[str, tuple[str, ...]] | None:
    """The file to read and the table in it: --config, else ./pyproject.toml's [tool.prefork]."""
    if given:
        return given, ()
    pyproject = os.path.join(cwd, "pyproject.toml")
    if not os.path.exists(pyproject) or not _may_hold_our_table(pyproject):
        # A project's pyproject.toml that cannot hold [tool.prefork] is not parsed:
        # tomllib's import and the parse cost 3-5 ms of a start, and most projects that
        # name prefork do so as a dependency. (A key spelled with escapes, such as
        # "pref\u006frk", is not seen.) A file that may hold the table must parse: its
        # settings were meant for us, and starting without them would be wrong.
        return None
    tool = parse_toml_file(pyproject).get("tool", {})
    has_table = isinstance(tool, dict) and "prefork" in tool
    return (pyproject, ("tool", "prefork")) if has_table else None


# Every TOML spelling of the table: a header or dotted key ``tool.prefork`` (any
# whitespace, either key quoted), or a ``[tool]`` header or ``tool = {...}`` inline
# table, under which ``prefork`` may be a key.
_OUR_TABLE = (
    rb"""tool["']?\s*\.\s*["']?prefork\b"""
    rb"""|^\s*\[\s*["']?tool["']?\s*\]"""
    rb"""|^\s*["']?tool["']?\s*="""
)


def _may_hold_our_table(path: str) -> bool:
    try:
        return re.search(_OUR_TABLE, read_small_file(path), re.MULTILINE) is not None
    except ConfigError:
        return False


def toml_module() -> Any:
    """tomllib (tomli before 3.11), imported on first use: a start without a file skips it."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10
        import tomli as tomllib
    return tomllib


def parse_toml_file(path: str) -> dict[str, Any]:
    """A TOML file's content; every way it can be unreadable is one ConfigError line.

    Read with paths.read_small_file: the master may be root and the file in a directory
    others can write to, so a FIFO or a huge file planted there is refused, not read.
    """
    try:
        text = read_small_file(path, "config file").decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    tomllib = toml_module()
    try:
        parsed: dict[str, Any] = tomllib.loads(text)
        return parsed
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML (nested too deeply)") from None


def to_toml(config: Config) -> str:
    """The effective settings as a config file would write them (--print-config)."""
    lines = []
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in NOT_IN_FILE or value is None:
            continue
        if isinstance(value, tuple):
            text = "[" + ", ".join(_toml_str(v) for v in value) + "]"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = _toml_str(value)
        else:
            text = repr(value)
        lines.append(f"{file_key(f)} = {text}")
    return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    return json.dumps(value)  # JSON's string escapes are TOML's basic-string escapes
