"""PreForkMixIn: serve any socketserver server from a supervised pool of pre-forked workers.

    +-----------------+   binds once, forks N, supervises; never serves a request
    | PreForkMixIn    |
    +-----------------+
            |  mixes with (optional)      and with one of
            v
    ThreadingMixIn / ForkingMixIn   TCPServer, UDPServer, UnixStreamServer, UnixDatagramServer

Put it first among the bases, as the stdlib mix-ins go::

    class Server(PreForkMixIn, ThreadingMixIn, TCPServer): ...

``serve_forever()`` runs the master; every worker runs the request cycle of the server it
was forked from, through its public hooks, inline or in threads or in child processes as
the other bases say.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from . import listeners, paths
from . import log as prefork_log
from .arbiter import Arbiter
from .config import LIBRARY_SETTINGS, SOCKETSERVER_ATTRIBUTES, Config
from .escape import printable, printable_traceback
from .heartbeat import describe_client
from .worker_process import WorkerInfo
from .workers.connection import ClientTimeout

__all__ = ["PreForkMixIn"]

log = logging.getLogger("prefork.worker")

_Socket = socket.socket  # for annotations in the class, where "socket" is its attribute
_ADOPT = "_prefork_adopt"  # from_socket's keyword to the constructor: (socket, binder's options)


# While a server's classes bind its socket: the socket's id -> prefork's rules for it.
_ARMED: dict[int, Callable[[_Socket, Any], None]] = {}


def _armed_class(plain: type[_Socket]) -> type[_Socket]:
    """``plain`` with a ``bind()`` that goes to prefork's rules while the socket is armed
    (once: the rules' own bind is the socket's). The same layout (no slot, no dict
    added), so that a socket's class can be switched to it and back: the socket object
    stays the one its owner holds (``from_socket``'s caller), and nothing on the
    request path changes."""

    def bind(self: _Socket, address: Any) -> None:
        rules = _ARMED.pop(id(self), None)
        if rules is None:
            plain.bind(self, address)
        else:
            rules(self, address)

    if plain not in _ARMED_CLASSES:
        namespace = {"__slots__": (), "bind": bind}
        _ARMED_CLASSES[plain] = type(f"Armed{plain.__name__}", (plain,), namespace)
    return _ARMED_CLASSES[plain]


_ARMED_CLASSES: dict[type[_Socket], type[_Socket]] = {}


class PreForkMixIn:
    """Pre-fork a pool of workers that share this server's socket.

    Class attributes, also keyword-only constructor arguments (see ``prefork.Config``):
    ``workers`` (CPU count), ``threads`` (16; per thread worker), ``backlog`` (2048),
    ``reuse_port`` (False), ``tcp_nodelay`` (True), ``graceful_timeout`` (30 s),
    ``worker_timeout`` (30 s; 0 = off), ``boot_timeout`` (30 s), ``max_requests`` (0 =
    never), ``max_requests_jitter`` (0), ``max_rss`` (MB; 0 = never), ``name`` (None:
    the handler's ``module:qualname``), ``access_log`` (None = off; a path, or "-" for
    stderr), ``client_timeout`` (10 s; 0 = off), ``defer_accept`` (30 s; 0 = off). They
    are read when the server is constructed. Every other argument goes to the other
    bases as given (``bind_and_activate``, SimpleXMLRPCServer's ``allow_none``...).

    May be overridden, as in socketserver, and run in each worker: ``verify_request``,
    ``process_request``, ``finish_request``, ``handle_error``, ``shutdown_request``,
    ``service_actions``, ``handle_timeout``. ``server_bind`` and ``server_activate`` run
    once, in the master, before the fork. ``handle_error`` prints what socketserver's
    prints, with the client's text escaped, and says nothing of a client that went
    silent for longer than ``client_timeout`` (it is logged at debug level).

    Hooks, which may be overridden (see each one for its process and moment):
    ``on_starting``, ``when_ready``, ``pre_fork``, ``post_fork``, ``post_worker_init``,
    ``worker_exit``, ``worker_abort``, ``child_exit``, ``nworkers_changed``,
    ``on_reload``. A hook that raises in the master is logged and serving goes on.

    May be extended; call super(): ``__init__``, ``server_bind``, ``server_activate``,
    ``serve_forever``, ``shutdown``, ``server_close``.

    ``prefork run --server-class`` (and a ``MODULE:OBJECT`` that names a server class)
    composes a class that is not a PreForkMixIn with ``compose.server_class``: the
    class's own methods win over these defaults, and prefork's construction, binding
    and closing run in front of it whatever its classes' order.
    """

    socket: _Socket  # socketserver's, made by TCPServer.__init__
    _prefork_ready = False  # set once _prefork_setup has run for this server
    _prefork_adopting: tuple[_Socket, bool] | None = None  # from_socket's, until bound
    _prefork_in_bind = False
    _prefork_tuned = False

    def __init__(self, server_address: Any, *args: Any, **kwargs: Any) -> None:
        """prefork's settings are keywords (see ``prefork.Config``), taken out first; the
        rest, positional or keyword, go to the other bases as given: a base with its own
        ``__init__`` (SimpleXMLRPCServer's ``logRequests``, ``allow_none``...) gets its
        own, and ``bind_and_activate`` is socketserver's, wherever it is passed."""
        self._prefork_setup(kwargs)
        super().__init__(server_address, *args, **kwargs)  # type: ignore[call-arg]
        self._prefork_adopt_if_unbound()

    def _prefork_setup(self, kwargs: dict[str, Any]) -> None:
        """Take prefork's keywords out of ``kwargs``; set the server up once, however many
        of its classes' ``__init__`` run (a composed class runs this in front of them)."""
        settings = {name: kwargs.pop(name) for name in LIBRARY_SETTINGS if name in kwargs}
        adopting = kwargs.pop(_ADOPT, None)
        if self._prefork_ready:
            return
        self._prefork_ready = True
        vars(self).update(settings)
        given = {name: getattr(self, name) for name in LIBRARY_SETTINGS if hasattr(self, name)}
        self.prefork_config = Config(**given)
        self.request_queue_size = listeners.listen_backlog(self.prefork_config.backlog)
        self._prefork_adopting = adopting
        self._prefork_lock = threading.Lock()
        self._prefork_arbiter: Arbiter | None = None
        self._prefork_shutdown_requested = False
        self._prefork_stopped = threading.Event()
        self._prefork_stopped.set()
        # Set in a worker when it is told to stop: handlers read it (workers/stopping.py).
        self.prefork_stopping = threading.Event()
        self._prefork_reuse_port = False
        # A Unix socket file we made: (pid that bound it, path, (st_dev, st_ino)).
        self._prefork_unlink: tuple[int, str, tuple[int, int] | None] | None = None

    @classmethod
    def from_socket(
        cls, sock: _Socket, *args: Any, binders_options: bool = True, **kwargs: Any
    ) -> Any:
        """A server on an already-bound socket (``fd://N``, systemd, a test's own socket);
        the other arguments are the constructor's (the handler class, settings...).

        The server is constructed as any other, so that every ``server_bind`` and
        ``server_activate`` of its classes runs (HTTPServer's sets ``server_name``,
        WSGIServer's its environment); prefork's bind rules make the bind itself a no-op.
        ``binders_options``: a TCP_DEFER_ACCEPT or client timeout the socket already has
        (systemd's ``DeferAcceptSec=``) is its binder's choice and is kept; False applies
        the settings over it (``prefork run`` after an upgrade, where prefork bound it).
        """
        return cls(sock.getsockname(), *args, **{**kwargs, _ADOPT: (sock, binders_options)})

    def _prefork_adopt_if_unbound(self) -> None:
        """A class whose ``__init__`` never binds (it passes ``bind_and_activate=False``
        on): the adopted socket replaces the unbound one all the same."""
        if self._prefork_adopting is None:
            return
        sock, keep = self._prefork_adopting
        self._prefork_adopting = None
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self._prefork_bind_adopted(sock, self.server_address)
        if sock.type == socket.SOCK_STREAM:
            sock.listen(self.request_queue_size)
        self._prefork_tune_listener(keep)

    # -- binding, in the master ------------------------------------------------------------
    server_address: Any  # socketserver's, set by BaseServer.__init__ and server_bind
    # Who Unix socket files belong to and their mode; ``prefork run`` sets them from
    # --user/--group and --socket-mode (None: the master's user, and the umask).
    _prefork_unix_owner: paths.Owner | None = None
    _prefork_unix_mode: int | None = None

    def server_bind(self) -> None:
        """Bind, in the master, by prefork's rules, through whatever ``server_bind`` the
        other classes make (see ``_prefork_front_bind``)."""
        self._prefork_front_bind(super().server_bind)  # type: ignore[misc]

    def _prefork_front_bind(self, bind: Callable[[], None]) -> None:
        """Run ``bind`` (the classes' server_bind) with the socket armed: its first
        ``bind()`` call, whoever makes it, goes through ``_prefork_bind_fresh`` or, for an
        adopted socket, ``_prefork_bind_adopted``. HTTPServer's server_bind calls
        TCPServer's directly, past any mix-in between them: the socket is where the
        rules can hold whatever the classes' order."""
        if self._prefork_in_bind:  # reached again through the classes' own chain
            bind()
            return
        rules = self._prefork_bind_fresh
        if self._prefork_adopting is not None:
            adopted, keep = self._prefork_adopting
            self._prefork_adopting = None
            self._prefork_keep_binders_options = keep
            self.socket.close()
            self.socket = adopted
            rules = self._prefork_bind_adopted
        sock, plain = self.socket, type(self.socket)
        sock.__class__ = _armed_class(plain)
        _ARMED[id(sock)] = rules
        self._prefork_in_bind = True
        try:
            bind()
        finally:
            self._prefork_in_bind = False
            _ARMED.pop(id(sock), None)
            sock.__class__ = plain

    def _prefork_bind_fresh(self, sock: _Socket, address: Any) -> None:
        """A Unix socket file is made by ``paths.bind_unix``: with its owner and mode from
        the start, nothing changed by path afterwards (the master may be root in a
        directory the workers' user can write to); stale files are replaced, live ones
        refused. Other sockets bind as socketserver binds them, with SO_REUSEADDR for
        TCP (no TIME_WAIT wait) and --reuse-port's SO_REUSEPORT."""
        if sock.family == socket.AF_UNIX and isinstance(address, str) and address[:1] != "\0":
            identity = paths.bind_unix(
                sock, address, self._prefork_unix_owner, self._prefork_unix_mode
            )
            self._prefork_unlink = (os.getpid(), address, identity)
            return
        if sock.type == socket.SOCK_STREAM and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.prefork_config.reuse_port and listeners.reuse_port_supported(sock):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._prefork_reuse_port = True
        sock.bind(address)

    def _prefork_bind_adopted(self, sock: _Socket, address: Any) -> None:
        """Bound already (fd://, systemd, the image before a USR2): nothing to bind.
        --reuse-port's per-worker siblings are possible only if that binder set
        SO_REUSEPORT."""
        if self.prefork_config.reuse_port and listeners.reuse_port_supported(sock):
            reuse = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            self._prefork_reuse_port = bool(reuse)
            if not reuse:
                log.warning(
                    "reuse_port: %s was bound without SO_REUSEPORT; its workers share it "
                    "until a restart binds it again",
                    listeners.describe_address(self),
                )

    _prefork_keep_binders_options = False

    def server_activate(self) -> None:
        super().server_activate()  # type: ignore[misc]
        self._prefork_tune_listener(self._prefork_keep_binders_options)

    def _prefork_tune_listener(self, keep_binders_options: bool = False) -> None:
        """Options set on the listening socket, whether we bound it or adopted it; once."""
        if self._prefork_tuned:
            return
        self._prefork_tuned = True
        sock: socket.socket = self.socket
        if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Accepted sockets inherit TCP_NODELAY on Linux: no per-connection syscall.
            nodelay = int(self.prefork_config.tcp_nodelay)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, nodelay)
            if not (keep_binders_options and listeners.defer_accept_of(sock)):
                listeners.set_defer_accept(sock, self.prefork_config.defer_accept)
            # Inherited by accepted connections, as TCP_NODELAY is (Unix ones get it in
            # the worker, as they are accepted: the kernel does not copy it for them).
            if not (keep_binders_options and listeners.client_timeout_of(sock)):
                listeners.set_client_timeout(sock, self.prefork_config.client_timeout)

    # -- the master's life ------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Fork the pool and supervise it until ``shutdown()`` or a stop signal.

        Returns only when every worker has exited. Outside the main thread no signal
        handlers are installed, and ``shutdown()`` is the way to stop.
        """
        prefork_log.configure_if_unconfigured()  # before any line: none is lost
        with self._prefork_lock:
            if self._prefork_shutdown_requested:  # shutdown() came first: do not start
                self._prefork_shutdown_requested = False
                return
            self._prefork_arbiter = Arbiter([self], self.prefork_config, name=self._prefork_name())
            self._prefork_stopped.clear()
        try:
            self._prefork_arbiter.run(poll_interval)
        finally:
            with self._prefork_lock:
                self._prefork_arbiter = None
                self._prefork_shutdown_requested = False
                self._prefork_stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever (gracefully) and wait until it has returned.

        Call it from another thread. Called before serve_forever starts, it returns at
        once and makes the next serve_forever return at once.
        """
        with self._prefork_lock:
            arbiter = self._prefork_arbiter
            if arbiter is None:
                self._prefork_shutdown_requested = True
                return
            arbiter.request_stop(graceful=True)
        self._prefork_stopped.wait()

    def server_close(self) -> None:
        super().server_close()  # type: ignore[misc]
        self._prefork_forget_socket_file()

    def _prefork_forget_socket_file(self) -> None:
        if self._prefork_unlink and self._prefork_unlink[0] == os.getpid():
            _, path, identity = self._prefork_unlink
            paths.unlink_if(path, identity)  # only if it is still our socket's file
            self._prefork_unlink = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver's report (on stderr), with the client's text escaped; a client
        that timed out under ``client_timeout`` is only logged at debug level."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ClientTimeout):  # raised by connection.TimedConnection only
            client = printable(describe_client(client_address))
            log.debug("%s: %s (%s); closed", client, exc, exc.setting)
            return
        print("-" * 40, file=sys.stderr)
        print(
            "Exception occurred during processing of request from",
            printable(str(client_address)),
            file=sys.stderr,
        )
        print(printable_traceback(exc) if exc else "NoneType: None", file=sys.stderr)
        print("-" * 40, file=sys.stderr)

    # -- hooks: may be overridden; the defaults do nothing ----------------------------------
    def on_starting(self) -> None:
        """Master, once: the sockets are bound and no worker is forked yet."""

    def when_ready(self) -> None:
        """Master, once: every worker of the first generation has reported ready."""

    def pre_fork(self, worker: WorkerInfo) -> None:
        """Master, before each worker is forked (``worker.pid`` is None)."""

    def post_fork(self, worker: WorkerInfo) -> None:
        """Worker, just after the fork, before it imports the app (``prefork run``) and
        reports ready. Raising makes it a boot failure."""

    def post_worker_init(self, worker: WorkerInfo) -> None:
        """Worker, once the app is imported (``prefork run``; with nothing to import, right
        after ``post_fork``), before it reports ready. Raising makes it a boot failure."""

    def worker_abort(self, worker: WorkerInfo) -> None:
        """Worker, when the master asks a stuck worker for its stack (--timeout), just
        after the stack is written, before the SIGKILL (half a second later). It runs
        only if the worker's main thread gets back to Python code in that time: a
        handler stuck inside a C call never lets it."""

    def child_exit(self, worker: WorkerInfo, exit_code: int) -> None:
        """Master, when a worker has exited, however it ended: ``exit_code`` as
        ``os.waitstatus_to_exitcode`` gives it (negative: the signal that killed it)."""

    def nworkers_changed(self, new: int, old: int) -> None:
        """Master, when TTIN or TTOU changed the number of workers from ``old`` to ``new``."""

    def worker_exit(self, worker: WorkerInfo) -> None:
        """Worker, as it leaves after a graceful stop or retirement (not when it is
        killed, or told to quit at once)."""

    def on_reload(self) -> None:
        """Master, when a reload (HUP, or USR2 after the re-exec) starts a new generation."""

    def _prefork_name(self) -> str:
        if self.prefork_config.name:
            return self.prefork_config.name
        handler = self.RequestHandlerClass  # type: ignore[attr-defined]
        return f"{handler.__module__}:{handler.__qualname__}" if handler else "prefork"


_DEFAULTS = Config()
# Class attributes, one per library setting, declared once; not socketserver's own.
for _name in set(LIBRARY_SETTINGS) - SOCKETSERVER_ATTRIBUTES:
    setattr(PreForkMixIn, _name, getattr(_DEFAULTS, _name))
