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
from typing import Any

from . import listeners, paths
from .arbiter import Arbiter
from .config import LIBRARY_SETTINGS, SOCKETSERVER_ATTRIBUTES, Config
from .escape import printable, printable_traceback
from .heartbeat import describe_client
from .worker_process import WorkerInfo
from .workers.connection import ClientTimeout

__all__ = ["PreForkMixIn"]

log = logging.getLogger("prefork.worker")


class PreForkMixIn:
    """Pre-fork a pool of workers that share this server's socket.

    Class attributes, also keyword-only constructor arguments (see ``prefork.Config``):
    ``workers`` (CPU count), ``threads`` (16; per thread worker), ``backlog`` (2048),
    ``reuse_port`` (False), ``tcp_nodelay`` (True), ``graceful_timeout`` (30 s),
    ``worker_timeout`` (30 s; 0 = off), ``boot_timeout`` (30 s), ``max_requests`` (0 =
    never), ``max_requests_jitter`` (0), ``max_rss`` (MB; 0 = never), ``name`` (None:
    the handler's ``module:qualname``), ``access_log`` (None = off; a path, or "-" for
    stderr), ``client_timeout`` (10 s; 0 = off), ``defer_accept`` (30 s; 0 = off). They
    are read when the server is constructed.

    May be overridden, as in socketserver, and run in each worker: ``verify_request``,
    ``process_request``, ``finish_request``, ``handle_error``, ``shutdown_request``,
    ``service_actions``, ``handle_timeout``. ``server_bind`` and ``server_activate`` run
    once, in the master, before the fork. ``handle_error`` prints what socketserver's
    prints, with the client's text escaped, and says nothing of a client that went
    silent for longer than ``client_timeout`` (it is logged at debug level).

    Hooks, which may be overridden (see each one for its process and moment):
    ``on_starting``, ``when_ready``, ``pre_fork``, ``post_fork``, ``worker_exit``,
    ``on_reload``. A hook that raises in the master is logged and serving goes on.

    May be extended; call super(): ``__init__``, ``server_bind``, ``server_activate``,
    ``serve_forever``, ``shutdown``, ``server_close``, ``process_request_thread``.
    """

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Any,  # noqa: N803
        bind_and_activate: bool = True,
        **settings: Any,
    ) -> None:
        unknown = sorted(settings.keys() - set(LIBRARY_SETTINGS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}"
            )
        vars(self).update(settings)
        given = {name: getattr(self, name) for name in LIBRARY_SETTINGS if hasattr(self, name)}
        self.prefork_config = Config(**given)
        self.request_queue_size = listeners.listen_backlog(self.prefork_config.backlog)
        self._prefork_lock = threading.Lock()
        self._prefork_arbiter: Arbiter | None = None
        self._prefork_shutdown_requested = False
        self._prefork_stopped = threading.Event()
        self._prefork_stopped.set()
        self._prefork_reuse_port = False
        # A Unix socket file we made: (pid that bound it, path, (st_dev, st_ino)).
        self._prefork_unlink: tuple[int, str, tuple[int, int] | None] | None = None
        super().__init__(server_address, RequestHandlerClass, bind_and_activate)  # type: ignore[call-arg]

    @classmethod
    def from_socket(
        cls,
        sock: socket.socket,
        RequestHandlerClass: Any,  # noqa: N803
        *,
        binders_options: bool = True,
        **settings: Any,
    ) -> Any:
        """A server on an already-bound socket (``fd://N``, systemd, a test's own socket).

        ``binders_options``: a TCP_DEFER_ACCEPT or client timeout the socket already has
        (systemd's ``DeferAcceptSec=``) is its binder's choice and is kept; False applies
        the settings over it (``prefork run`` after an upgrade, where prefork bound it).
        """
        server: Any = cls(
            sock.getsockname(), RequestHandlerClass, bind_and_activate=False, **settings
        )
        server.socket.close()
        server.socket = sock
        server.server_address = sock.getsockname()
        if sock.type == socket.SOCK_STREAM:
            sock.listen(server.request_queue_size)
        server._prefork_tune_listener(keep_binders_options=binders_options)
        if server.prefork_config.reuse_port and listeners.reuse_port_supported(sock):
            # Bound elsewhere (fd://, systemd, the image before a USR2): per-worker
            # siblings are possible only if that binder set SO_REUSEPORT.
            reuse = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            server._prefork_reuse_port = bool(reuse)
            if not reuse:
                log.warning(
                    "reuse_port: %s was bound without SO_REUSEPORT; its workers share it "
                    "until a restart binds it again",
                    listeners.describe_address(server),
                )
        return server

    # -- binding, in the master ------------------------------------------------------------
    server_address: Any  # socketserver's, set by BaseServer.__init__ and server_bind
    # Who Unix socket files belong to and their mode; ``prefork run`` sets them from
    # --user/--group and --socket-mode (None: the master's user, and the umask).
    _prefork_unix_owner: paths.Owner | None = None
    _prefork_unix_mode: int | None = None

    def server_bind(self) -> None:
        """Bind, in the master. A Unix socket file is made by ``paths.bind_unix``: with its
        owner and mode from the start, nothing changed by path afterwards (the master may
        be root in a directory the workers' user can write to); stale files are
        replaced, live ones refused. Other sockets bind as socketserver binds them."""
        sock: socket.socket = self.socket  # type: ignore[attr-defined]
        address: Any = self.server_address
        if sock.family == socket.AF_UNIX and isinstance(address, str) and address[:1] != "\0":
            identity = paths.bind_unix(
                sock, address, self._prefork_unix_owner, self._prefork_unix_mode
            )
            self._prefork_unlink = (os.getpid(), address, identity)
            self.server_address = sock.getsockname()  # as TCPServer.server_bind does
            return
        if sock.type == socket.SOCK_STREAM and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # no TIME_WAIT wait
        if self.prefork_config.reuse_port and listeners.reuse_port_supported(sock):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._prefork_reuse_port = True
        super().server_bind()  # type: ignore[misc]

    def server_activate(self) -> None:
        super().server_activate()  # type: ignore[misc]
        self._prefork_tune_listener()

    def _prefork_tune_listener(self, keep_binders_options: bool = False) -> None:
        """Options set on the listening socket, whether we bound it or adopted it."""
        sock: socket.socket = self.socket  # type: ignore[attr-defined]
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

    def worker_exit(self, worker: WorkerInfo) -> None:
        """Worker, as it leaves after a graceful stop or retirement (not when it is
        killed, or told to quit at once)."""

    def on_reload(self) -> None:
        """Master, when a reload (HUP, or USR2 after the re-exec) starts a new generation."""

    # -- in the workers -----------------------------------------------------------------------
    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """ThreadingMixIn's per-request thread; tells the thread worker when it is done."""
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self._prefork_request_done()

    def shutdown_request(self, request: Any) -> None:
        """End a connection: close it, as TCPServer does, without its shutdown(SHUT_WR)
        when close() alone sends the FIN, which is when no file from makefile() is left
        open on it. socketserver shuts down first for the case where one is (the close
        would then wait for the garbage collector): so do we. One syscall fewer per
        connection, measured at 5-15% of a small HTTP request's cost (docs/design.md).
        Datagram servers and subclasses that override this are unaffected."""
        if getattr(request, "_io_refs", None) == 0:
            self.close_request(request)  # type: ignore[attr-defined]
        else:
            super().shutdown_request(request)  # type: ignore[misc]

    def _prefork_request_done(self) -> None:
        """Replaced by the thread worker in its process."""

    def _prefork_name(self) -> str:
        if self.prefork_config.name:
            return self.prefork_config.name
        handler = self.RequestHandlerClass  # type: ignore[attr-defined]
        return f"{handler.__module__}:{handler.__qualname__}" if handler else "prefork"


_DEFAULTS = Config()
# Class attributes, one per library setting, declared once; not socketserver's own.
for _name in set(LIBRARY_SETTINGS) - SOCKETSERVER_ATTRIBUTES:
    setattr(PreForkMixIn, _name, getattr(_DEFAULTS, _name))
