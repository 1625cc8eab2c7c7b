"""The one settings object: every knob is declared once, here.

``Config`` feeds the library (``PreForkMixIn`` keyword arguments and class attributes),
the command line (``prefork run`` builds one click option per field, with its
``PREFORK_<OPTION>`` environment variable) and, later, the configuration file.
Each field's metadata says how it appears on the command line and whether the
library accepts it.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigError
from .identity import parse_mode

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10
    import tomli as tomllib

WorkerClass = Literal["sync", "thread", "fork"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["text", "json"]


def setting(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    short: str | None = None,
    library: bool = True,
    default_text: str | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """Declare one setting. ``flag`` defaults to the field name with dashes."""
    metadata = {
        "help": help,
        "flag": flag,
        "short": short,
        "library": library,
        "default_text": default_text,
    }
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def cpu_count() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything the master needs. Built by ``prefork run`` or by ``PreForkMixIn``."""

    binds: tuple[str, ...] = setting(
        ("127.0.0.1:8000",),
        flag="bind",
        short="-b",
        library=False,
        help="Address to serve, repeatable: HOST:PORT, [IPV6]:PORT, tcp://HOST:PORT, "
        "udp://HOST:PORT, unix:PATH, unix-dgram:PATH, fd://N.",
    )
    workers: int = setting(
        default_factory=cpu_count,
        short="-w",
        default_text="CPU count",
        help="Number of worker processes.",
    )
    worker_class: WorkerClass = setting(
        "sync",
        short="-k",
        library=False,
        help="How a worker serves connections: one at a time (sync), in threads (thread) "
        "or in a child process each (fork). The library picks this from the server's "
        "bases (ThreadingMixIn, ForkingMixIn).",
    )
    threads: int = setting(
        16,
        help="Most connections a thread worker serves at once; at that many it stops "
        "accepting so idle workers take new connections.",
    )
    backlog: int = setting(2048, help="Listen queue length of each stream socket.")
    reuse_port: bool = setting(
        False,
        help="Give each worker its own SO_REUSEPORT socket so the kernel spreads "
        "connections evenly (TCP and UDP, where the kernel supports it).",
    )
    tcp_nodelay: bool = setting(
        True, help="Set TCP_NODELAY on accepted TCP connections (no Nagle delay)."
    )
    graceful_timeout: float = setting(
        30.0,
        help="Seconds a stopping worker may spend finishing its requests before it is killed.",
    )
    worker_timeout: float = setting(
        30.0,
        flag="timeout",
        help="Seconds a worker may go without a heartbeat (a stuck loop, or a sync worker "
        "stuck in one request) before its stack is logged and it is killed and replaced; a "
        "fork worker's connection child running longer is killed alone. 0 turns it off.",
    )
    boot_timeout: float = setting(
        30.0,
        help="Seconds a new worker may take to import the app and report ready before it "
        "is killed (and a reload using it abandoned); 0 turns it off.",
    )
    max_requests: int = setting(
        0,
        help="Requests a worker serves before it is replaced (its successor starts first, "
        "one slot at a time); 0 means never.",
    )
    max_requests_jitter: int = setting(
        0,
        help="Add a random 0..N to --max-requests for each worker, so that workers "
        "started together do not all retire together.",
    )
    max_rss: int = setting(
        0,
        help="Recycle a worker whose resident memory exceeds this many MB (checked every "
        "second); 0 means never.",
    )
    name: str | None = setting(
        None,
        default_text="MODULE:OBJECT",
        help="Name shown in process titles and logs.",
    )
    server_class: str | None = setting(
        None,
        library=False,
        help="MODULE:CLASS placed first among the bases of every server prefork builds: "
        "its hook methods (on_starting, when_ready, pre_fork, post_fork, worker_exit, "
        "on_reload) and socketserver overrides apply. Imported in the master.",
    )
    preload: bool = setting(
        False,
        library=False,
        help="Import the app once in the master before forking, so workers share its "
        "memory. HUP then re-executes the master in place (as USR2 does) to load new code.",
    )
    reload: bool = setting(
        False,
        library=False,
        help="Development: reload (as HUP does) when a source file of the app's imported "
        "modules changes. Uses watchfiles if installed (prefork[reload]), else polls.",
    )
    chdir: str | None = setting(
        None, library=False, help="Directory to change to before importing the app."
    )
    log_level: LogLevel = setting("info", library=False, help="Least severe level logged.")
    log_file: str | None = setting(
        None,
        library=False,
        default_text="stderr",
        help="Append the log to this file; USR1 reopens it (for logrotate).",
    )
    log_format: LogFormat = setting(
        "text", library=False, help="text, or json: one JSON object per line."
    )
    user: str | None = setting(
        None,
        library=False,
        default_text="the master's",
        help="Run workers as this user (name or uid). The master binds first (as root, for "
        "ports below 1024) and keeps root to bind again on HUP and USR2; it runs no "
        "handler. A worker that cannot switch never serves.",
    )
    group: str | None = setting(
        None,
        library=False,
        default_text="the user's",
        help="Run workers with this group (name or gid).",
    )
    umask: str | None = setting(
        None,
        library=False,
        default_text="inherited",
        help="Octal umask of the master and workers (027): applies to the Unix socket "
        "files and log files prefork creates.",
    )
    socket_mode: str | None = setting(
        None,
        library=False,
        default_text="by the umask",
        help="Octal mode of Unix socket files (660); with --user they also belong to the "
        "workers' user and group.",
    )
    access_log: str | None = setting(
        None,
        default_text="off",
        help="Append one line per connection or datagram to this file ('-': stderr): "
        "client, worker, duration, outcome, in --log-format. Written in batches, off the "
        "request path; USR1 reopens it.",
    )
    pid: str | None = setting(
        None, library=False, help="Write the master's PID to this file while it runs."
    )
    config: str | None = setting(
        None,
        library=False,
        default_text="[tool.prefork] in ./pyproject.toml, if any",
        help="TOML file of settings, keyed by these options' long names with underscores "
        "(workers = 4, bind = [...]). Read again on HUP.",
    )

    def __post_init__(self) -> None:
        hints = _type_hints()
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        _check_at_least("workers", self.workers, 1)
        _check_at_least("threads", self.threads, 1)
        _check_at_least("backlog", self.backlog, 1)
        _check_at_least("max_requests", self.max_requests, 0)
        _check_at_least("max_requests_jitter", self.max_requests_jitter, 0)
        _check_at_least("max_rss", self.max_rss, 0)
        _check_at_least("graceful_timeout", self.graceful_timeout, 0)
        _check_at_least("worker_timeout", self.worker_timeout, 0)
        _check_at_least("boot_timeout", self.boot_timeout, 0)
        if not self.binds:
            raise ConfigError("binds must name at least one address")
        for name in ("umask", "socket_mode"):
            if getattr(self, name) is not None:
                parse_mode(name, getattr(self, name))


@functools.cache
def _type_hints() -> dict[str, Any]:
    """Config's field types, resolved once: resolving compiles every annotation string
    (about a millisecond), and the master builds a Config on every HUP."""
    return typing.get_type_hints(Config)


def _check_at_least(name: str, value: float, least: float) -> None:
    if value < least:
        raise ConfigError(f"{name} must be at least {least}, got {value!r}")


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Reject a value of the wrong type with a message naming the setting."""
    if not _is_instance(value, hint):
        raise ConfigError(f"{name} must be {describe_type(hint)}, got {value!r}")


def _is_instance(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, tuple) and all(_is_instance(v, args[0]) for v in value)
    if args:  # Optional[X] / X | None
        return any(_is_instance(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if isinstance(value, bool) and hint is not bool:
        return False  # True is an int to Python, never a worker count to us
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def describe_type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a tuple of {describe_type(args[0])}"
    if args:
        return " or ".join(describe_type(a) for a in args)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, "None"
    )


def flag_name(f: Any) -> str:
    """The long option name of a field, without dashes: ``worker_timeout`` -> ``timeout``."""
    return str(f.metadata["flag"] or f.name.replace("_", "-"))


def env_var(f: Any) -> str:
    return "PREFORK_" + flag_name(f).upper().replace("-", "_")


LIBRARY_SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(Config) if f.metadata["library"])


def settings_table() -> str:
    """Every setting as a Markdown table (docs/configuration.md embeds it; a test keeps it
    current): flag, environment variable, config-file key, default, library argument."""
    rows = [
        "| option | environment | config key | default | library | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for f in fields(Config):
        short = f"`{f.metadata['short']}`, " if f.metadata["short"] else ""
        default = f.metadata["default_text"] or _describe_default(f.default)
        library = f"`{f.name}=`" if f.metadata["library"] else "—"
        key = "—" if f.name in _NOT_IN_FILE else f"`{file_key(f)}`"
        rows.append(
            f"| {short}`--{flag_name(f)}` | `{env_var(f)}` | {key} | {default} | {library} | "
            f"{f.metadata['help']} |"
        )
    return "\n".join(rows) + "\n"


def _describe_default(default: Any) -> str:
    if isinstance(default, tuple):
        return ", ".join(f"`{d}`" for d in default)
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default is None else f"`{default}`"


# Settings that a config file cannot set: where the file is, and nothing else.
_NOT_IN_FILE = frozenset({"config"})


def file_key(f: Any) -> str:
    """A setting's key in a config file: its long option name with underscores."""
    return flag_name(f).replace("-", "_")


def read_config_file(path: str, table: tuple[str, ...] = ()) -> dict[str, Any]:
    """Settings by field name from a TOML file (inside ``table``, e.g. tool.prefork).

    Every problem is one ConfigError line naming the file, the key and what was expected.
    """
    try:
        with open(path, "rb") as stream:
            data: Any = tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for name in table:
        data = data.get(name, {})
    by_key = {file_key(f): f for f in fields(Config) if f.name not in _NOT_IN_FILE}
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
            _check_type(key, value, hint)
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
    if not os.path.exists(pyproject):
        return None
    try:
        with open(pyproject, "rb") as f:
            has_table = "prefork" in tomllib.load(f).get("tool", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None  # not ours to complain about unless it has our table
    return (pyproject, ("tool", "prefork")) if has_table else None


def to_toml(config: Config) -> str:
    """The effective settings as a config file would write them (--print-config)."""
    lines = []
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in _NOT_IN_FILE or value is None:
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
