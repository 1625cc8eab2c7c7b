"""The one settings object: every knob is declared once, here.

``Config`` feeds the library (``PreForkMixIn`` keyword arguments and class attributes),
the command line (``prefork run`` builds one click option per field, with its
``PREFORK_<OPTION>`` environment variable), the config file (``config_file.py``) and the
docs (``settings_table``). Each field's metadata says how it appears on the command
line, whether the library accepts it, and the range of a number (``validate.py``).
"""

from __future__ import annotations

import functools
import os
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from .identity import parse_mode
from .validate import (
    check_addresses,
    check_least_if_on,
    check_range,
    check_text,
    check_type,
    number,
)

WorkerClass = Literal["sync", "thread", "fork"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["text", "json"]

# Upper bounds, documented in the settings table. Any finite time below MAX_SECONDS
# works: the loops never sleep longer than a few seconds at a time whatever the
# deadline, so a timeout means "effectively never" long before it could overflow.
MAX_SECONDS = 1e9  # about 31 years
MIN_TIMEOUT = 1.0  # the master looks at heartbeats every 0.5 s: less kills healthy workers
MAX_COUNT = 10**12
MAX_WORKERS = 1024
MAX_THREADS = 10_000
MAX_CHILDREN = 10_000  # per fork worker, as --threads: past that it is a fork bomb, not a pool
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
    max_children: int = setting(
        40,  # socketserver.ForkingMixIn's own
        minimum=1,
        maximum=MAX_CHILDREN,
        help="Most connections a fork worker serves at once, each in a child process of "
        "its own (ForkingMixIn's max_children); at that many it stops accepting so idle "
        "workers take new connections. Fork workers only: sync and thread workers "
        "ignore it (for thread workers see --threads).",
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
    client_max_wait: float = setting(
        25.0,
        minimum=0,
        maximum=MAX_SECONDS,
        help="Seconds a stream connection may keep its handler waiting on the client in "
        "all, every read and write added up, under --client-timeout: a client that keeps "
        "just above the minimum rate, or sends a request just inside every timeout, is "
        "disconnected then. 0 turns it off; raise it (or 0) for long uploads or long-lived "
        "connections with thread workers. Keep it below --timeout with sync workers.",
    )
    keep_alive: float = setting(
        2.0,
        minimum=0,
        maximum=MAX_SECONDS,
        help="WSGI apps: seconds a kept-alive HTTP connection may wait for its next request "
        "(thread and fork workers; a sync worker serves one request per connection). 0 "
        "closes each connection after its response.",
    )
    limit_request_line: int = setting(
        4094,
        minimum=1,
        maximum=65536,
        help="WSGI apps: the longest request target, in bytes; a longer one is answered 414.",
    )
    limit_request_fields: int = setting(
        100,
        minimum=1,
        maximum=32768,
        help="WSGI apps: the most header fields a request may have; more are answered 431.",
    )
    limit_request_field_size: int = setting(
        8190,
        minimum=1,
        maximum=65536,
        help="WSGI apps: the largest header field (name, colon, value), in bytes; a larger "
        "one is answered 431.",
    )
    forwarded_allow_ips: str = setting(
        "127.0.0.1,::1",
        help="WSGI apps: comma-separated addresses and networks (CIDR) of the proxies whose "
        "X-Forwarded-For, X-Forwarded-Proto and Forwarded headers are believed for "
        "REMOTE_ADDR and wsgi.url_scheme; * believes every peer.",
    )
    root_path: str = setting(
        "",
        help="WSGI apps: the SCRIPT_NAME the app is mounted at (a path prefix such as "
        "/app, taken off PATH_INFO when a request's path starts with it).",
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
        help="MODULE:CLASS to build every server from: a socketserver server class "
        "(SimpleXMLRPCServer, HTTPServer, WSGIServer...) or a mix-in of hooks and "
        "overrides; whatever it overrides wins (docs/programs.md). Imported in the master.",
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
        None,
        library=False,
        help="Working directory of the master and the workers (a served tree, say). "
        "Only that: unlike gunicorn's, it is not put on the import path.",
    )
    pythonpath: tuple[str, ...] = setting(
        (),
        library=False,
        default_text="none",
        help="Directory to import the app from, besides the one prefork run starts in; "
        "repeatable, or comma-separated as gunicorn takes it. Relative to the start "
        "directory; searched first, in the order given.",
    )
    log_level: LogLevel = setting("info", library=False, help="Least severe level logged.")
    capture_output: bool = setting(
        False,
        library=False,
        help="Send stdout and stderr, the master's and the workers' (prints, tracebacks "
        "from handle_error, Python's last-resort log lines), to --log-file, reopened by "
        "USR1 with it. Without --log-file, stdout joins stderr.",
    )
    log_config: str | None = setting(
        None,
        library=False,
        default_text="none",
        help="A logging.config.dictConfig file (.json or .toml) for the app's own loggers "
        "and handlers, applied in the master before the fork; disable_existing_loggers "
        "defaults to false.",
    )
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
    access_log_format: str | None = setting(
        None,
        default_text="combined",
        help="WSGI apps: the access log's line, with gunicorn's atoms: %(h)s client, %(t)s "
        "time, %(r)s request line, %(s)s status, %(b)s bytes, %(f)s referer, %(a)s user "
        "agent, %(D)s microseconds, %({name}i)s a request header, %({name}o)s a response "
        "header... (docs/wsgi.md). Default: the combined log format. With --log-format "
        "json, lines are JSON whatever this says.",
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
            check_type(f.name, value, hints[f.name])
            check_text(f.name, value)
            check_range(f.name, value, f.metadata["minimum"], f.metadata["maximum"])
        for name in ("umask", "socket_mode"):
            if getattr(self, name) is not None:
                parse_mode(name, getattr(self, name))
        check_addresses("forwarded_allow_ips", self.forwarded_allow_ips)
        if self.access_log_format is not None:
            from .access import check_http_format  # only when one is given

            check_http_format(self.access_log_format)
        for f in fields(self):
            if f.name in ("worker_timeout", "boot_timeout"):
                check_least_if_on(f.name, getattr(self, f.name), MIN_TIMEOUT)


@functools.cache
def _type_hints() -> dict[str, Any]:
    """Config's field types, resolved once: resolving compiles every annotation string
    (about a millisecond), and the master builds a Config on every HUP."""
    return typing.get_type_hints(Config)


def flag_name(f: Any) -> str:
    """The long option name of a field, without dashes: ``worker_timeout`` -> ``timeout``."""
    return str(f.metadata["flag"] or f.name.replace("_", "-"))


def env_var(f: Any) -> str:
    return "PREFORK_" + flag_name(f).upper().replace("-", "_")


LIBRARY_SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(Config) if f.metadata["library"])
# Library settings that are socketserver's own attributes: PreForkMixIn declares none for
# them, so that a ForkingMixIn subclass's value, later in the bases, applies as it would
# without prefork; a server that has none gets the default.
SOCKETSERVER_ATTRIBUTES = frozenset({"max_children"})


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
        key = "—" if f.name in NOT_IN_FILE else f"`{file_key(f)}`"
        rows.append(
            f"| {short}`--{flag_name(f)}` | `{env_var(f)}` | {key} | {default} | {library} | "
            f"{f.metadata['help']}{_describe_range(f)} |"
        )
    return "\n".join(rows) + "\n"


def _describe_range(f: Any) -> str:
    least, most = f.metadata["minimum"], f.metadata["maximum"]
    if least is None and most is None:
        return ""
    return f" Range: {number(least)} to {number(most)}."


def _describe_default(default: Any) -> str:
    if isinstance(default, tuple):
        return ", ".join(f"`{d}`" for d in default)
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default is None else f"`{default}`"


# Settings that a config file cannot set: where the file is, and nothing else.
NOT_IN_FILE = frozenset({"config"})


def file_key(f: Any) -> str:
    """A setting's key in a config file: its long option name with underscores."""
    return flag_name(f).replace("-", "_")
