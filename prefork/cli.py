"""The ``prefork`` command. The library raises; this module maps errors to one line and exit 2.

Every option of ``prefork run`` is generated from a ``Config`` field, with the field's
help, default and ``PREFORK_<OPTION>`` environment variable; the command line wins
over the environment, which wins over the defaults.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import socketserver
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import click
from click.core import ParameterSource

from . import collector, listeners, log, paths
from .binds import Inherited, binds_to_open
from .config import LIBRARY_SETTINGS, Config, env_var, flag_name
from .config_file import find_config_file, read_config_file, to_toml, toml_module
from .errors import ConfigError, PreforkError
from .escape import printable
from .handover import Handover, take_handover
from .identity import Identity, file_owner, parse_mode
from .paths import changeable_by_others
from .process import Pidfile, reaps_orphans
from .signals import MASTER_SIGNALS, SignalRoute, Wakeup, unblock_all
from .systemd import Notifier, take_listen_fds
from .target import (
    CHECK_TIMEOUT,
    MARKS,
    SERVER_CLASS_MARK,
    WSGI_APP_MARK,
    Target,
    absolute_path_entries,
    add_to_path,
    app_import_path,
    import_stdlib,
    marks_of,
    module_source,
)
from .upgrade import CHECK_LISTENERS_ENV, CHECK_REPORT_ENV, Upgrader
from .version import __version__

if TYPE_CHECKING:
    from .arbiter import Arbiter
    from .mixin import PreForkMixIn

logger = logging.getLogger("prefork.cli")


class StartupError(click.ClickException):
    """Shown as a single 'Error: ...' line on stderr; no traceback."""

    exit_code = 2


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one click option per Config field (the only place options are declared)."""
    hints = typing.get_type_hints(Config)
    for f in reversed(fields(Config)):
        hint = hints[f.name]
        command = click.option(*_declarations(f, hint), **_option_kwargs(f, hint))(command)
    return command


def _declarations(f: Any, hint: Any) -> list[str]:
    flag = flag_name(f)
    long = f"--{flag}/--no-{flag}" if hint is bool else f"--{flag}"
    return [d for d in (f.metadata["short"], long, f.name) if d]


def _option_kwargs(f: Any, hint: Any) -> dict[str, Any]:
    has_default = f.default is not MISSING
    kwargs: dict[str, Any] = {
        "default": f.default if has_default else None,
        "envvar": env_var(f),
        "show_envvar": True,
        "show_default": f.metadata["default_text"] or has_default,
        "help": f.metadata["help"],
    }
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        kwargs["multiple"] = True
    elif origin is Literal:
        kwargs["type"] = click.Choice(args)
    elif hint is int:
        kwargs["type"] = click.INT
    elif hint is float:
        kwargs["type"] = click.FLOAT
    return kwargs


def given_options(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """Only the options the user set (command line or environment): the rest is Config's."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {k: v for k, v in options.items() if ctx.get_parameter_source(k) in given}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prefork")
def cli() -> None:
    """prefork: serve socketserver request handlers from a supervised pool of workers."""


@cli.command()
@click.argument("target", metavar="MODULE:OBJECT")
@config_options
@click.option("--print-config", is_flag=True, help="Print the effective settings and exit.")
@click.option(
    "--check-config",
    is_flag=True,
    help="Check everything as a start would (settings, config file, user and group, "
    "--chdir, --server-class, binds, log paths, the app's import as the workers' user), "
    "bind nothing, and exit: 0, or 2 with one line. USR2 runs this before it re-executes.",
)
@click.pass_context
def run(
    ctx: click.Context, /, target: str, print_config: bool, check_config: bool, **options: Any
) -> None:
    """Serve MODULE:OBJECT, a request handler class or a server class, until stopped.

    Signals to the master: TERM stops gracefully, INT and QUIT stop now, TTIN and TTOU
    add and remove a worker. See docs/signals.md.
    """
    started_in = os.getcwd()
    handover = take_handover()  # set when this image is a USR2 upgrade of the master
    passed = take_listen_fds()  # systemd socket activation, or an upgrade's sockets
    notify = Notifier()  # systemd's NOTIFY_SOCKET and watchdog, taken before any app code
    notify.take_environment()  # runs (the import check): app code must not speak for us
    given = given_options(ctx, options)
    try:
        if print_config:
            click.echo(to_toml(settings_from(given, started_in)), nl=False)
            return
        inherited = _inherited(passed, handover)
        checked_stdlib = handover.stdlib if handover else None
        problem = None
        try:
            start = prepare(target, given, started_in, check_config, inherited, checked_stdlib)
        except PreforkError as exc:
            if handover is None or handover.settings is None:
                raise
            start, problem = as_before(target, handover, started_in), str(exc)
        if check_config:
            if os.environ.get(CHECK_REPORT_ENV):  # for the USR2 that runs this check
                click.echo("\n".join(start.check_report()))
            return
        _open_logs(start.config, start.identity, upgraded=handover is not None)
        if problem:
            logger.error(
                "upgrade failed after re-executing: %s; serving on with the previous "
                "settings (workers import the app themselves)",
                problem,
            )
        _warn_about_privileges(start.identity)
    except PreforkError as exc:
        raise StartupError(str(exc)) from None
    serve(start, given, started_in, handover, passed, notify, problem)


@dataclass
class Start:
    """What ``prepare`` found: everything a start needs before it binds."""

    app: Target
    config: Config
    specs: list[listeners.BindSpec]
    identity: Identity | None
    import_path: list[str]  # where the app is imported from (target.app_import_path)
    handler: Any  # the app's handler class with --preload (imported in the master)
    stdlib: list[str]  # the standard-library modules the app's import pulled in
    # MODULE:OBJECT is a server class: config.server_class names it, the master builds
    # it with its own handler, and a HUP reloads it by re-executing (as --preload).
    server_target: bool = False
    wsgi_app: bool = False  # MODULE:OBJECT is a WSGI app: stream binds only

    def check_report(self) -> list[str]:
        """What a USR2's --check-config tells the master it checks for."""
        marks = [SERVER_CLASS_MARK] if self.server_target else []
        return [*self.stdlib, *marks, *([WSGI_APP_MARK] if self.wsgi_app else [])]


def prepare(
    target: str,
    given: dict[str, Any],
    started_in: str,
    checking: bool,
    inherited: list[Inherited],
    checked_stdlib: list[str] | None = None,
) -> Start:
    """Read and check everything, up to the app's import; PreforkError says what is wrong.

    ``checking`` (--check-config): change nothing outside this process (no log file is
    made, nothing is bound), so that it can run beside the master it checks for.
    ``inherited``: the sockets passed to this process, which are binds already.
    ``checked_stdlib``: a USR2's check imported the app already (as the workers' user)
    and found it needs these standard modules: the app is not imported again.
    """
    app = Target.parse(target)
    config, explicit = read_settings(given, started_in)
    for text in config.binds:
        listeners.parse_bind(text)  # every bind is checked, a passed socket's included
    config = replace(config, binds=binds_to_open(config.binds, explicit, inherited))
    specs = [listeners.parse_bind(text) for text in config.binds]
    identity = Identity.resolve(config.user, config.group)
    if config.umask is not None:
        os.umask(parse_mode("umask", config.umask))
    absolute_path_entries(started_in)  # before --chdir: they mean the start directory
    if config.chdir:
        _chdir(config.chdir)
    import_path = app_import_path(config.pythonpath, started_in)
    if config.preload or config.server_class:
        _ready_to_import_code(config, app, identity, import_path)
        _compose_for_each(config, specs)
    handler, names = None, checked_stdlib
    if config.preload:
        handler = app.load_any()  # once, in the master; workers share it copy-on-write
        names = marks_of(handler)
    elif names is None:
        # In a throwaway child: the master never imports the app, only the parts of
        # the standard library it uses, which workers then inherit (target.py).
        timeout = config.boot_timeout or CHECK_TIMEOUT
        # A start imports each module meanwhile; --check-config only reports them.
        names = app.check(
            identity,
            import_path,
            timeout,
            on_stdlib=None if checking else import_stdlib,
            meanwhile=None if checking else _import_the_server,
        )
    server_target, wsgi_app = SERVER_CLASS_MARK in names, WSGI_APP_MARK in names
    stdlib = [name for name in names if name not in MARKS]
    if not config.preload:
        import_stdlib(stdlib)
    if server_target:
        if config.server_class:
            raise ConfigError(
                f"{app} is a server class, and --server-class names another: give a request "
                f"handler class with --server-class, or leave --server-class out"
            )
        handler, config = None, replace(config, server_class=str(app))
        _ready_to_import_code(config, app, identity, import_path)
        _compose_for_each(config, specs, own_handler=True)
    if checking and not os.environ.get(CHECK_REPORT_ENV):
        # Not for a USR2's check: a log path refused after the upgrade costs the log
        # (stderr, one line), and a worker that plants a symlink must not veto upgrades.
        owner = file_owner(identity)
        for path, what in ((config.log_file, "log file"), (config.access_log, "access log")):
            if path and path != "-":
                paths.check_appendable(path, owner, what)
    if checking and config.log_config:
        from . import log_config

        log_config.check(config.log_config)
    return Start(
        app, config, specs, identity, import_path, handler, stdlib, server_target, wsgi_app
    )


def _compose_for_each(
    config: Config, specs: list[listeners.BindSpec], own_handler: bool = False
) -> None:
    """The server class imports, is a class, and composes for each bind whose kind is
    known (an fd:// bind's kind is its socket's, seen when it is adopted)."""
    base: type[socketserver.BaseServer] = socketserver.TCPServer
    for spec in specs:
        if spec.kind != "fd":
            base = listeners.base_server_class(spec.family, spec.stream)
            server_class(base, config, spec.family, own_handler)
    server_class(base, config, socket.AF_INET, own_handler)


def _import_the_server() -> None:
    """The modules that bind, supervise and serve: not needed to read and check the
    settings, so a start imports them while the check child imports the app (one core
    each), and --check-config (a USR2's check) only for --preload or --server-class,
    which build the server class."""
    with collector.paused(freeze=True):
        from . import access, arbiter, mixin, workers  # noqa: F401


# What the master imports only where it is needed, so that a start that never needs it
# does not pay for it: an upgrade's check (subprocess, tempfile), --max-rss and the pid
# file (psutil), the JSON log (datetime), --max-requests-jitter (random), the import
# guard (importlib.abc). A master that puts the app's directory first on its path
# (--preload, --server-class) imports them before it does: a file there named like one
# of them would otherwise stand in for it, in a master that may be root.
_IMPORTED_LATER = ("importlib.abc", "importlib.machinery", "subprocess", "tempfile",
                   "datetime", "psutil", "random", "prefork.trusted_import")  # fmt: skip


def _ready_to_import_code(
    config: Config, app: Target, identity: Identity | None, import_path: list[str]
) -> None:
    """Before the master imports code itself (--preload, --server-class): what it
    imports later is imported now, as root never imports from the app's directories,
    which then go first on its path; code that others could change is refused, and the
    directories taken off the path again, so that no way out of here leaves it there (an
    upgrade's ``as_before`` comes here again); and with a root master and workers of
    another user, every module imported from then on is checked where it is found
    (trusted_import.py)."""
    _import_the_server()
    _import_what_is_imported_later()
    added = add_to_path(import_path)
    try:
        _refuse_code_others_can_change(config, app, identity)
    except ConfigError:
        for directory in added:
            sys.path.remove(directory)
        raise
    if os.geteuid() == 0 and identity is not None and identity.uid != 0:
        from . import trusted_import  # imported above, with importlib.abc

        trusted_import.install()


def _import_what_is_imported_later() -> None:
    for name in _IMPORTED_LATER:
        importlib.import_module(name)
    toml_module()  # a HUP reads the config file again


def as_before(target: str, handover: Handover, started_in: str) -> Start:
    """The start of an upgraded image whose own start failed where the check had passed
    a moment before (a file changed in between, an import that fails now and then).

    The old image is gone and the workers end with the master, so this one serves on
    with the settings the old image had, which it hands over; its workers import the
    app themselves (no --preload), so that a broken import fails only their boot and the
    adopted workers keep serving. Still fatal: the server class, imported again by the
    sockets' adoption, if that is what broke, or if it is now code others could change
    (refused as the start refuses it: a file planted after the check must not run).
    """
    assert handover.settings is not None
    known = {f.name for f in fields(Config)}  # the old image may be another version
    settings = {k: v for k, v in handover.settings.items() if k in known}
    settings["pythonpath"] = tuple(settings.get("pythonpath", ()))  # a list, in JSON
    config = Config(**{**settings, "binds": (), "preload": False})  # all sockets passed
    absolute_path_entries(started_in)
    with contextlib.suppress(OSError):
        os.chdir(handover.app_dir or ".")  # the old image's working directory
    import_path = app_import_path(config.pythonpath, started_in)
    try:
        identity = Identity.resolve(config.user, config.group)
    except PreforkError:
        identity = None  # the log files are then root's; each worker's fork says why
    app = Target.parse(target)
    if config.server_class:  # imported again when the sockets are adopted: as prepare does
        _ready_to_import_code(config, app, identity, import_path)
    stdlib = [name for name in handover.stdlib or [] if name not in MARKS]
    import_stdlib(stdlib)
    server_target = config.server_class == str(app)  # the old image's start found it one
    wsgi_app = WSGI_APP_MARK in (handover.stdlib or [])
    return Start(app, config, [], identity, import_path, None, stdlib, server_target, wsgi_app)


def _inherited(passed: list[tuple[int, str]], handover: Handover | None) -> list[Inherited]:
    """The passed sockets that are systemd's (not an upgrade's own binds), as binds.py
    sees them; a USR2's --check-config is told how many there are (their addresses
    do not matter there: it binds nothing)."""
    if not passed:
        count = os.environ.pop(CHECK_LISTENERS_ENV, "")
        return [Inherited(-1, "", None)] * int(count) if count.isdigit() else []
    ours = handover.binds if handover else [""] * len(passed)
    inherited = []
    for (fd, name), bind in zip(passed, ours, strict=True):
        if not bind:
            try:
                inherited.append(Inherited.of_socket(fd, name))
            except OSError as exc:
                raise listeners.bind_error(f"fd://{fd}", exc) from None
    return inherited


def serve(
    start: Start,
    given: dict[str, Any],
    started_in: str,
    handover: Handover | None,
    passed: list[tuple[int, str]],
    notify: Notifier,
    upgrade_problem: str | None = None,
) -> None:
    """Bind (or adopt), write the pid file, and run the master until it stops.
    ``upgrade_problem``: why this upgraded image runs the old settings (as_before)."""
    from .arbiter import Arbiter

    config = start.config
    # Handlers go in before any socket is bound: a signal sent the moment the port
    # accepts must be honoured, not kill a master that is still starting. An upgraded
    # image arrives with signals blocked (see upgrade.py) and unblocks them only now.
    route = SignalRoute(Wakeup(), MASTER_SIGNALS)
    route.install()
    unblock_all()
    servers: list[Any] = []
    arbiter: Arbiter | None = None
    pidfile = Pidfile(config.pid) if config.pid else None
    try:
        if pidfile and not handover:
            pidfile.check(os.getpid())  # before binding: a refused start binds nothing
        unlink = handover.unlink if handover else [""] * len(passed)
        binds = handover.binds if handover else [""] * len(passed)
        for (fd, name), path, bind in zip(passed, unlink, binds, strict=True):
            servers.append(
                adopt_socket(
                    fd, f"fd://{fd}", config, path, bool(bind), own_handler=start.server_target
                )
            )
            servers[-1].prefork_bind = bind or None  # None: systemd's, never closed by us
            servers[-1].prefork_fdname = name
        # Beside the passed sockets, the binds the settings name (start.specs has only
        # those that are not passed sockets); after an upgrade the passed sockets are
        # those very binds.
        if not handover:
            servers.extend(open_server(s, config, start.server_target) for s in start.specs)
        if start.wsgi_app:
            _stream_binds_only(start.app, servers)
        if config.preload:
            for server in servers:
                server.RequestHandlerClass = start.handler
        if pidfile:
            try:
                pidfile.write(os.getpid())
            except PreforkError as exc:
                if not handover:
                    raise
                # The file names this very PID already; an upgrade is no reason to stop.
                logger.error("%s; the pid file stays as it was", exc)
                pidfile = None
        upgrader = Upgrader(sys.argv[1:], started_in, config.boot_timeout)
        in_master = config.preload or start.server_target
        arbiter = Arbiter(
            servers,
            config,
            name=config.name or str(start.app),
            route=route,
            upgrader=upgrader,
            # Code the master imported (--preload, a server class named as the app)
            # reloads by re-executing it: its workers import nothing.
            loader=None if in_master else start.app.loader(start.import_path),
            reload_by_reexec=in_master,
            handover=handover,
            settings=CliSettings(given, started_in, _inherited(passed, handover)),
            reap_orphans=reaps_orphans(),
            close_listeners_on_stop=True,
            notify=notify,
        )
        arbiter.upgrade_problem = upgrade_problem
        arbiter.run()
    except PreforkError as exc:
        raise StartupError(str(exc)) from None
    finally:
        # A HUP may have added binds, or left removed ones not yet closed.
        every = servers if arbiter is None else arbiter.servers
        for server in {id(s): s for s in [*servers, *every]}.values():
            server.server_close()
        if pidfile:
            pidfile.remove()
        # The handlers stay: the process is on its way out, and a signal now (a second
        # TERM, a QUIT) must not kill it with a core dump instead of a clean exit.


@cli.command()
@click.argument("pid", type=int, required=False)
@click.option(
    "--pid",
    "pid_file",
    metavar="FILE",
    help="Read the master's PID from FILE (the one `prefork run --pid FILE` writes).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--watch", is_flag=True, help="Refresh until interrupted (JSON: one line each).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@click.option(
    "--count",
    type=click.IntRange(min=0),
    default=0,
    help="With --watch: stop after this many refreshes (0: never).",
)
def status(
    pid: int | None, pid_file: str | None, as_json: bool, watch: bool, interval: float, count: int
) -> None:
    """Show a running master and its workers: state, requests, current request, memory, CPU.

    Give the master's PID, or --pid FILE. See docs/status.md.
    """
    if (pid is None) == (pid_file is None):
        raise click.UsageError("give the master's PID or --pid FILE (one of them)")
    from . import status as prefork_status  # here: `prefork run` does not pay for psutil

    try:
        if pid is None:
            assert pid_file is not None
            pid = Pidfile(pid_file).read()
        prefork_status.show(pid, as_json, watch, interval, count)
    except (PreforkError, prefork_status.StatusError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # how --watch is meant to end
        pass


def settings_from(given: dict[str, Any], cwd: str) -> Config:
    """Command line and environment (``given``) over the config file over the defaults."""
    return read_settings(given, cwd)[0]


def read_settings(given: dict[str, Any], cwd: str) -> tuple[Config, bool]:
    """The settings, and whether binds were asked for (on the command line, in the
    environment or in the config file) rather than left to the default.

    As root, a config file someone else could change is refused, at start and at every
    HUP and USR2 that reads it again: whoever writes it chooses --user, --preload and
    --server-class, and so what runs as root.
    """
    found = find_config_file(given.get("config"), cwd)
    if found is None:
        return Config(**given), "binds" in given
    path, table = found
    path = os.path.join(cwd, path)
    if os.geteuid() == 0 and (why := changeable_by_others(path)):
        raise ConfigError(
            f"refusing to read settings from {path} as root: {why} (a file only root "
            "can change, given with --config, is safe)"
        )
    from_file = read_config_file(path, table)
    return Config(**{**from_file, **given}), "binds" in given or "binds" in from_file


class CliSettings:
    """Re-reads the settings on HUP, the same way ``prefork run`` first read them: the
    binds they name less the inherited sockets, which stay the binds (binds.py)."""

    def __init__(self, given: dict[str, Any], cwd: str, inherited: list[Inherited]) -> None:
        self.given, self.cwd, self.inherited = given, cwd, inherited

    def read(self) -> Config:
        config, explicit = read_settings(self.given, self.cwd)
        return replace(config, binds=binds_to_open(config.binds, explicit, self.inherited))

    def open(self, bind: str, config: Config) -> Any:
        return open_server(listeners.parse_bind(bind), config)


def _open_logs(config: Config, identity: Identity | None, upgraded: bool = False) -> None:
    """The log file now; the access log once, to fail here rather than in every worker.
    Both go to the workers' user, who writes to them and reopens them on USR1; both are
    opened and handed over as paths.py does it (never through a symlink).

    ``upgraded``: this image replaces a serving master (USR2). A log path refused now
    (say, a symlink a worker planted) must not end the service, nor block upgrades: the
    log goes to stderr, with one line saying why."""
    owner = file_owner(identity)
    try:
        try:
            log.configure(config.log_level, config.log_file, config.log_format, owner)
        except OSError as exc:
            raise ConfigError(f"cannot open log file {config.log_file}: {exc.strerror}") from None
        if config.access_log:
            from .access import prepare_access_log

            prepare_access_log(config.access_log, owner)
        if config.log_config:
            from . import log_config  # here: logging.config's import is for those who ask

            log_config.apply(config.log_config, owner)
        if config.capture_output:
            log.capture_output()
    except PreforkError as exc:
        if not upgraded:
            raise
        log.configure(config.log_level, None, config.log_format)
        logger.error("%s; logging to stderr", exc)


def _warn_about_privileges(identity: Identity | None) -> None:
    """One line for a setting that leaves the workers more power than it looks."""
    if os.geteuid() == 0 and identity is not None and identity.uid != 0:
        here = os.path.dirname(os.path.abspath(__file__))
        if why := changeable_by_others(here):
            logger.warning(
                "prefork's own code (%s) could be changed by someone other than root (%s): "
                "whoever that is can run code as root at the next start or upgrade",
                here,
                why,
            )
    if os.geteuid() == 0 and identity is not None and identity.keeps_root:
        logger.warning(
            "--group without --user: workers keep the master's user, root (uid 0), with "
            "all its privileges; give --user to drop them"
        )


def _stream_binds_only(app: Target, servers: list[Any]) -> None:
    for server in servers:
        if server.socket.type != socket.SOCK_STREAM:
            bind = getattr(server, "prefork_bind", None) or server.server_address
            raise ConfigError(
                f"{app} is a WSGI app, served over HTTP on stream binds (TCP, unix:) only: "
                f"{bind} is a datagram socket"
            )


def open_server(spec: listeners.BindSpec, config: Config, own_handler: bool = False) -> Any:
    """Bind one address with the server class its kind and the worker class call for.
    ``own_handler``: the app is a server class, constructed without a handler (its own)."""
    if spec.kind == "fd":
        server = adopt_socket(spec.fd, spec.text, config, own_handler=own_handler)
    else:
        base = listeners.base_server_class(spec.family, spec.stream)
        cls = server_class(base, config, spec.family, own_handler)
        abstract = isinstance(spec.address, str) and spec.address.startswith("\0")
        if abstract and config.socket_mode:
            logger.warning(
                "--socket-mode does not apply to %s: an abstract socket has no file to give "
                "a mode (anyone who can reach its name can connect)",
                spec.text,
            )
        with _constructing(cls, config, spec.text):
            server = cls(spec.address, *_handler_argument(own_handler), **_library_settings(config))
    server.prefork_bind = spec.text  # how HUP tells which configured bind it serves
    return server


def adopt_socket(
    fd: int,
    text: str,
    config: Config,
    unlink: str = "",
    ours: bool = False,
    own_handler: bool = False,
) -> Any:
    """Serve an already-bound descriptor (fd://N, systemd, an upgrade); its family and
    type are read from the socket. ``unlink``: a Unix socket file we own; ``ours``:
    prefork bound it (an upgrade's), so the settings apply over its options."""
    sock = listeners.inherited_socket(fd, text)
    sock.set_inheritable(False)  # systemd's and an upgrade's come inheritable
    base = listeners.base_server_class(sock.family, sock.type == socket.SOCK_STREAM)
    cls = server_class(base, config, sock.family, own_handler)
    try:
        with _constructing(cls, config, text):
            server = cls.from_socket(
                sock,
                *_handler_argument(own_handler),
                binders_options=not ours,
                **_library_settings(config),
            )
    except PreforkError:
        sock.close()
        raise
    if unlink:  # a socket file we made, bound by the image before a USR2
        try:
            info = os.stat(unlink, follow_symlinks=False)
            identity: tuple[int, int] | None = (info.st_dev, info.st_ino)
        except OSError:
            identity = None
        server._prefork_unlink = (os.getpid(), unlink, identity)
    return server


def _handler_argument(own_handler: bool) -> tuple[Any, ...]:
    """None: the workers set the handler class once they have imported it."""
    return () if own_handler else (None,)


@contextlib.contextmanager
def _constructing(cls: type, config: Config, bind: str) -> Iterator[None]:
    """A bind that fails says so as bind() does; an app's server class whose own
    constructor fails, in one line that names it."""
    try:
        yield
    except OSError as exc:
        raise listeners.bind_error(bind, exc) from None
    except Exception as exc:
        if not config.server_class:
            raise
        raise ConfigError(
            f"constructing {config.server_class} for {bind} failed: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None


def _library_settings(config: Config) -> dict[str, Any]:
    return {name: getattr(config, name) for name in LIBRARY_SETTINGS}


def server_class(
    base: type, config: Config, family: int, own_handler: bool = False
) -> type[PreForkMixIn]:
    """[--server-class] + PreForkMixIn + (ThreadingMixIn | ForkingMixIn) + the stdlib
    server (compose.py)."""
    from .compose import server_class as composed
    from .workers import SERVER_MIXINS

    app_class = None
    if config.server_class:
        app_class = Target.parse(config.server_class).resolve()
    namespace: dict[str, Any] = {"address_family": family}
    if family == socket.AF_UNIX:  # how paths.bind_unix makes the socket file
        identity = Identity.resolve(config.user, config.group)
        namespace["_prefork_unix_owner"] = file_owner(identity)
        if config.socket_mode:
            namespace["_prefork_unix_mode"] = parse_mode("socket_mode", config.socket_mode)
    what = str(config.server_class) if own_handler else f"--server-class {config.server_class}"
    mixin = SERVER_MIXINS[config.worker_class]
    return composed(base, mixin, app_class, what, namespace, own_handler)


def _refuse_code_others_can_change(config: Config, app: Target, identity: Identity | None) -> None:
    """--preload and --server-class import code into the master: as root, code someone
    else could change would be theirs to run as root (say, a worker's user that can
    write to the app's directory, at the next restart or USR2)."""
    if os.geteuid() != 0 or identity is None or identity.uid == 0:
        return
    modules = [app.module] if config.preload else []
    if config.server_class:
        modules.append(Target.parse(config.server_class).module)
    for module in modules:
        source = module_source(module)
        if source and (why := changeable_by_others(source)):
            option = "--preload" if module == app.module and config.preload else "--server-class"
            raise ConfigError(
                f"{option} would import {source} into the master, which runs as root, "
                f"but {why}: make it root's alone, or leave {option} out"
            )


def _chdir(path: str) -> None:
    """--chdir, reached as paths.py reaches a path: no symlink someone else planted."""
    try:
        directory = paths.open_directory(path, f"cannot change to directory {path}")
        try:
            os.fchdir(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise ConfigError(f"cannot change to directory {path}: {exc.strerror}") from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click errors become one 'Error:' line, never a traceback."""
    try:
        result = cli.main(args=argv, prog_name="prefork", standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"Error: {_one_line(exc.format_message())}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"Error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except UnicodeError as exc:  # click itself decoding an argument it cannot
        click.echo(f"Error: an argument is not valid UTF-8 ({exc})", err=True)
        sys.exit(2)
    except (click.Abort, KeyboardInterrupt):
        click.echo("Aborted.", err=True)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


def _one_line(text: str) -> str:
    """One line, printable: error text may carry a worker's words or a client's."""
    return printable(" ".join(text.split()))
