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
import math
import os
import sys
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigError
from .identity import parse_mode
from .paths import read_small_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10
    import tomli as tomllib

WorkerClass = Literal["sync", "thread", "fork"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["text", "json"]

# Upper bounds, documented in the settings table. Any finite time below MAX_SECONDS
# works: the loops never sleep longer than a few seconds at a time whatever the
# deadline, so a timeout means "effectively never" long before it could overflow.
MAX_SECONDS = 1e9  # about 31 years
MAX_COUNT = 10**12
MAX_WORKERS = 1024
MAX_THREADS = 10_000
MAX_BACKLOG = 2**31 - 1  # listen()'s int; the kernel then caps it at net.core.somaxconn


def setting(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    short: str | None = None,
    library: bool = True,
    default_text: str | None = None,
    default_factory: Any = MISSING,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """Declare one setting. ``flag`` defaults to the field name with dashes; numbers
    have a ``minimum`` and a ``maximum``, checked in every way the setting can be given."""
    metadata = {
        "help": help,
        "flag": flag,
        "short": short,
        "library": library,
        "default_text": default_text,
        "minimum": minimum,
        "maximum": maximum,
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
        minimum=1,
        maximum=MAX_WORKERS,
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
        minimum=1,
        maximum=MAX_THREADS,
        help="Most connections a thread worker serves at once; at that many it stops "
        "accepting so idle workers take new connections.",
    )
    backlog: int = setting(
        2048,
        minimum=1,
        maximum=MAX_BACKLOG,
        help="Listen queue length of each stream socket (the kernel caps it at "
        "net.core.somaxconn; a larger value is lowered to it, with a log line).",
    )
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
        minimum=0,
        maximum=MAX_SECONDS,
        help="Seconds a stopping worker may spend finishing its requests before it is killed.",
    )
    worker_timeout: float = setting(
        30.0,
        flag="timeout",
        minimum=0,
        maximum=MAX_SECONDS,
        help="Seconds a worker may go without a heartbeat (a stuck loop, or a sync worker "
        "stuck in one request) before its stack is logged and it is killed and replaced; a "
        "fork worker's connection child running longer is killed alone. 0 turns it off.",
    )
    boot_timeout: float = setting(
        30.0,
        minimum=0,
        maximum=MAX_SECONDS,
        help="Seconds a new worker may take to import the app and report ready before it "
        "is killed (and a reload using it abandoned); 0 turns it off.",
    )
    client_timeout: float = setting(
        10.0,
        minimum=0,
        maximum=MAX_SECONDS,
        help="Seconds a read or write on an accepted stream connection may wait for the "
        "client (a socket timeout, set unless the handler class sets its own timeout); a "
        "client silent that long is disconnected, logged at debug level only. 0 turns it "
        "off. Keep it below --timeout with sync workers.",
    )
    defer_accept: int = setting(
        30,
        minimum=0,
        maximum=3600,
        help="TCP: the kernel hands a new connection to a worker only once the client has "
        "sent data, or after about this many seconds (TCP_DEFER_ACCEPT), so connections "
        "that send nothing hold no worker. 0 turns it off: do that for protocols where "
        "the server speaks first.",
    )
    max_requests: int = setting(
        0,
        minimum=0,
        maximum=MAX_COUNT,
        help="Requests a worker serves before it is replaced (its successor starts first, "
        "one slot at a time); 0 means never.",
    )
    max_requests_jitter: int = setting(
        0,
        minimum=0,
        maximum=MAX_COUNT,
        help="Add a random 0..N to --max-requests for each worker, so that workers "
        "started together do not all retire together.",
    )
    max_rss: int = setting(
        0,
        minimum=0,
        maximum=MAX_COUNT,
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
            value = getattr(self, f.name)
            _check_type(f.name, value, hints[f.name])
            _check_text(f.name, value)
            _check_range(f.name, value, f.metadata["minimum"], f.metadata["maximum"])
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


def _check_range(name: str, value: Any, least: float | None, most: float | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if least is not None and value < least:
        raise ConfigError(f"{name} must be at least {_number(least)}, got {value!r}")
    if most is not None and value > most:
        raise ConfigError(f"{name} must be at most {_number(most)}, got {value!r}")


def _number(value: float) -> str:
    """1e9 -> '1,000,000,000': bounds read as the numbers they are."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,}"


def _check_text(name: str, value: Any) -> None:
    """Text settings must be text: a byte that is not UTF-8 (Python hands it over as a
    lone surrogate) or a NUL would fail far from here, in a system call or a log line."""
    for text in value if isinstance(value, tuple) else (value,):
        if isinstance(text, str) and not _is_clean_text(text):
            raise ConfigError(f"{name}: {ascii(text)} is not valid UTF-8 text")


def _is_clean_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\0" not in text


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
            f"{f.metadata['help']}{_describe_range(f)} |"
        )
    return "\n".join(rows) + "\n"


def _describe_range(f: Any) -> str:
    least, most = f.metadata["minimum"], f.metadata["maximum"]
    if least is None and most is None:
        return ""
    return f" Range: {_number(least)} to {_number(most)}."


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
    data: Any = _parse_toml(path)
    for name in table:
        data = data.get(name, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: {'.'.join(table)} is not a table")
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
        tool = _parse_toml(pyproject).get("tool", {})
    except ConfigError:
        # Not ours to complain about, unless it names our table: then its settings were
        # meant for us, and starting without them would be wrong.
        if _mentions_prefork(pyproject):
            raise
        return None
    has_table = isinstance(tool, dict) and "prefork" in tool
    return (pyproject, ("tool", "prefork")) if has_table else None


def _mentions_prefork(path: str) -> bool:
    try:
        return b"prefork" in read_small_file(path)
    except ConfigError:
        return False


def _parse_toml(path: str) -> dict[str, Any]:
    """A TOML file's content; every way it can be unreadable is one ConfigError line.

    Read with paths.read_small_file: the master may be root and the file in a directory
    others can write to, so a FIFO or a huge file planted there is refused, not read.
    """
    try:
        text = read_small_file(path, "config file").decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML (nested too deeply)") from None


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
