"""Worker: one pre-forked process running socketserver's request cycle.

The loop waits on every listening socket, the worker's own signal pipe and the
master's liveness pipe, and serves through the server's public hooks only:
``get_request``, ``verify_request``, ``process_request``, ``handle_error``,
``shutdown_request``, ``service_actions`` and ``handle_timeout``. Whether a request is
served inline, in a thread or in a child follows the server's bases, exactly as with
``serve_forever``.

Worker signals: TERM stops accepting and finishes what was accepted; QUIT and INT exit
now. The master's death (EOF on its pipe) also means exit now.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

from .. import log as prefork_log
from .. import signals
from ..access import AccessLog
from ..errors import EXIT_BOOT_ERROR, EXIT_IMPORT_ERROR, EXIT_OK, AppImportError, PreforkError
from ..heartbeat import Heartbeat
from ..identity import Identity
from ..process import close_all_but, die_with_parent, set_title
from ..worker_process import WorkerInfo
from . import connection
from .poller import Poller
from .stopping import Stopping

log = logging.getLogger("prefork.worker")

Loader = Callable[[], type[socketserver.BaseRequestHandler]]
# Signals a worker ignores: the master's business (HUP, TTIN...), or a terminal's.
_IGNORED = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
# The master sends this before killing a stuck worker: faulthandler (a C-level handler,
# which runs even while Python code is stuck) writes every thread's stack to stderr.
STACK_DUMP_SIGNAL = signal.SIGUSR2
_HANDLED = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGUSR1)


def _dump_stack_to_log_on_signal() -> None:
    """Point faulthandler's STACK_DUMP_SIGNAL at the log (again, after it was reopened),
    then the Python handler (worker_abort) as well: faulthandler calls it after the dump."""
    stream = prefork_log.stack_stream()
    faulthandler.register(STACK_DUMP_SIGNAL, file=stream, all_threads=True, chain=True)


ACCEPT_BATCH = 64  # most requests served from one socket between two selects
ACCEPT_BACKOFF = 0.1  # seconds a worker out of descriptors waits before accepting again
# accept() errors that leave the connection queued until the worker has room: retried
# after ACCEPT_BACKOFF, not at once.
_STARVED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
DRAIN_MAX = 5.0  # seconds the final stop's drain may take at most
READY = b"R"  # status pipe: booted, accepting
RELOAD = b"H"  # status pipe: --reload saw the app's code change
RETIRE = b"M"  # status pipe: served --max-requests, please start my successor
BOOT_ERROR = b"E"  # status pipe: followed by a one-line cause, then the worker exits


class WorkerPlan(NamedTuple):
    """What every worker of a generation is handed alike."""

    servers: list[Any]  # PreForkMixIn instances
    name: str
    master_pid: int  # a worker whose parent is not this one leaves at once
    master_fd: int  # read end of a pipe only the master writes to: EOF = master died
    poll_interval: float = 0.5
    loader: Loader | None = None
    identity: Identity | None = None  # --user/--group: who to become before serving
    request_timeout: float = 0.0  # fork workers: kill a connection child running longer
    graceful_timeout: float = 30.0  # the final drain ends well inside it
    threads: int = 16  # thread workers: connections served at once
    max_children: int = 40  # fork workers: connection children at once
    access_log: str | None = None  # path, "-" for stderr; None: no access log
    access_log_format: str | None = None  # WSGI apps' lines; None: combined
    log_format: str = "text"
    forked_off_main_thread: bool = False  # a master outside the main thread (signals.py)


@dataclass
class WorkerSpec:
    """What the master hands one worker across the fork: its plan, and its own."""

    nr: int
    generation: int
    plan: WorkerPlan
    sockets: list[socket.socket | None]  # per server: this worker's own socket, if any
    heartbeat: Heartbeat
    status_fd: int  # write end: READY, or BOOT_ERROR + message; EOF when we are gone
    max_requests: int = 0  # with its jitter drawn; 0: never ask to be recycled
    watch_code: bool = False  # --reload, in slot 1: ask for a reload when the app changes
    # The descriptors it keeps, besides stdio, the log and its own: everything else
    # (the master's pipes, pages, selector, other slots' and generations' sockets) is
    # closed at boot. An allow-list: what the master opens later cannot leak.
    keep_fds: frozenset[int] = frozenset()
    sibling_pages: list[Heartbeat] = field(default_factory=list)  # unmapped at boot


class Worker:
    """Serve requests until told to stop. Subclasses bound concurrency and drain differently.

    May be extended: ``has_capacity``, ``process``, ``is_idle``, ``quit_now``, ``boot``.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.plan = spec.plan
        self.servers = spec.plan.servers
        self.requests = 0
        self.alive = True  # False: stop accepting, finish what was accepted
        self.draining = False  # final stop: serve what the kernel has queued, then stop
        self._drain_left: dict[int, int | None] = {}  # per server: connections still to serve
        self._drain_until = 0.0
        self.wakeup = signals.Wakeup()
        self.poller = Poller()
        self._accepting = False
        self._timed: dict[Any, float] = {}  # servers with a .timeout -> last activity
        self._cycles: dict[Any, Callable[[], bool]] = {}  # per server: serve one request
        self._accept_again = 0.0  # out of descriptors: when to try accepting again
        self._starved_said = 0.0  # when that may next be logged
        self._queues: dict[Any, Callable[[], None]] = {}  # per server: serve its queue
        self.access: AccessLog | None = None
        self.info = WorkerInfo(spec.nr, spec.generation, os.getpid())
        # server.prefork_stopping, shared by this worker's servers (stopping.py)
        self.stopping = Stopping(
            getattr(self.servers[0], "prefork_stopping", None) or threading.Event()
        )
        self.watch_turn: Callable[[], None] | None = None  # --reload in a forking worker
        self._handlers_lag = (  # CPython would run them late (signals.py)
            spec.plan.forked_off_main_thread and signals.HANDLERS_LAG_WHEN_FORKED_OFF_MAIN
        )

    # -- entry point, in the child right after fork ---------------------------------------
    def run(self) -> NoReturn:
        code = EXIT_OK
        try:
            die_with_parent(self.plan.master_pid)  # first: a master killed now takes us too
            self.boot()
        except AppImportError as exc:
            code = self._report_boot_error(exc, EXIT_IMPORT_ERROR)
        except Exception as exc:
            log.debug("worker %d failed to boot", self.spec.nr, exc_info=True)
            code = self._report_boot_error(exc, EXIT_BOOT_ERROR)
        else:
            try:
                code = self.serve()
                self.servers[0].worker_exit(self.info)
            except BaseException:
                log.exception("worker %d (pid %d) crashed", self.spec.nr, os.getpid())
                code = 1
        finally:
            if self.access is not None:
                self.access.close()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):  # a closed stream must not block the exit
                    stream.flush()
            os._exit(code)

    def boot(self) -> None:
        """Set up signals, sockets and the app; then tell the master we are ready."""
        spec, plan = self.spec, self.plan
        for page in spec.sibling_pages:
            page.close()
        spec.heartbeat.release_fd()  # the mapping stays; status readers use the master's fd
        close_all_but(self._descriptors_to_keep())
        if plan.identity is not None:
            plan.identity.switch()  # before any hook or app code; failing, we never serve
            die_with_parent(plan.master_pid)  # the kernel forgets it at a change of user
        prefork_log.set_slot(f"worker {spec.nr}")
        for signum in _HANDLED:
            signal.signal(signum, self.wakeup.handler)
        signal.signal(signal.SIGTERM, self._on_term)
        for signum in _IGNORED:
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signals.wake_on_any_thread(self.wakeup)  # the sync worker has a watcher thread
        signal.signal(STACK_DUMP_SIGNAL, self._on_abort)  # chained after the dump
        _dump_stack_to_log_on_signal()
        signals.unblock_all()  # the master blocked them around fork()
        set_title(f"prefork: worker {spec.nr} [{plan.name}]")
        self.servers[0].post_fork(self.info)
        if plan.loader is not None:
            handler_class = plan.loader()
            for server in self.servers:
                server.RequestHandlerClass = handler_class
        for server in self.servers:
            server.prefork_stopping = self.stopping.event
            server.RequestHandlerClass = self.stopping.serving(server.RequestHandlerClass)
        self.servers[0].post_worker_init(self.info)
        if spec.watch_code:
            from .. import reloader  # only --reload pays for its imports

            files = reloader.module_files()
            if isinstance(self.servers[0], socketserver.ForkingMixIn):
                # It forks for every connection: no thread of ours may run (reloader.py).
                self.watch_turn = reloader.LoopWatch(files, self._code_changed)
            else:
                reloader.start_watching(files, self._code_changed)
        if plan.access_log:
            self.access = AccessLog(
                plan.access_log, plan.log_format, spec.nr, plan.access_log_format
            )
            for server in self.servers:  # an instance attribute: no cost when off
                if getattr(server.RequestHandlerClass, "logs_requests", False):
                    server.prefork_access = self.access  # a line per request, its own
                else:
                    server.finish_request = self.access.wrap(server.finish_request)
        for server, own in zip(self.servers, spec.sockets, strict=True):
            if own is not None:  # this worker's SO_REUSEPORT sibling replaces the shared one
                server.socket.close()
                server.socket = own
            if server.timeout is not None:
                self._timed[server] = time.monotonic()
            connection.prepare(server)
        for server in self.servers:  # last: they look up the hooks set above
            self._cycles[server] = self._request_cycle(server)
            self._queues[server] = self._queue_server(self._cycles[server])
        self.poller.register(self.wakeup.read_fd, self._on_wakeup)
        self.poller.register(plan.master_fd, self._on_master_gone)
        self.resume_accepting()
        os.write(spec.status_fd, READY)

    def _descriptors_to_keep(self) -> set[int]:
        spec = self.spec
        keep = {0, 1, 2, spec.status_fd, self.plan.master_fd, *spec.keep_fds}
        keep |= {self.wakeup.read_fd, self.wakeup.write_fd, self.poller.fileno()}
        keep |= {s.socket.fileno() for s in self.servers}
        keep |= {sock.fileno() for sock in spec.sockets if sock is not None}
        keep |= prefork_log.descriptors()
        return keep

    def _on_term(self, signum: int, frame: Any) -> None:
        """TERM: handlers learn at once that they are to finish (a sync worker's loop may
        be inside one that waits for its client); the loop stops accepting next."""
        self.wakeup.handler(signum, frame)
        self.stopping.set()

    def _on_abort(self, signum: int, frame: Any) -> None:
        """The master is about to kill this stuck worker: worker_abort, which may not fail
        the last moments (its stack is already in the log)."""
        try:
            self.servers[0].worker_abort(self.info)
        except Exception:
            log.exception("the worker_abort hook failed")

    def _code_changed(self, paths: set[str]) -> None:
        """The reloader's thread, or the loop: one line, then the master reloads as on HUP."""
        names = ", ".join(sorted(os.path.relpath(p) for p in paths))
        log.info("--reload: %s changed; asking the master to reload", names)
        with contextlib.suppress(OSError):
            os.write(self.spec.status_fd, RELOAD)

    def _report_boot_error(self, exc: Exception, code: int) -> int:
        message = str(exc) if isinstance(exc, PreforkError) else f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            os.write(self.spec.status_fd, BOOT_ERROR + " ".join(message.split()).encode()[:4000])
        return code

    # -- the loop ------------------------------------------------------------------------
    def serve(self) -> int:
        wait, beat, access = self.poller.wait, self.spec.heartbeat.beat, self.access
        watch = self.watch_turn
        # Once per turn; a server's service_actions only if it has its own (BaseServer's
        # does nothing), and the worker's tick only if its class has one.
        actions = [s.service_actions for s in self.servers if not stock_hook(s, "service_actions")]
        tick = self.tick if type(self).tick is not Worker.tick else None
        queues = self._queues
        while self.alive or not self.is_idle():
            timed = self._timed or self._accept_again
            events = wait(self._select_timeout() if timed else self.plan.poll_interval)
            for ready in events:
                ready()
            if not events and self._accepting:
                # EPOLLEXCLUSIVE wakes one worker per new connection; should that one
                # not accept it, the others would not hear of it until the next one
                # arrives. An idle turn looks for itself: a connection waits at most a
                # poll interval, at the cost of one empty accept per idle turn.
                for serve_queue in queues.values():
                    serve_queue()
            beat()
            if access is not None:
                access.maybe_flush()
            for service_actions in actions:
                service_actions()
            if self._timed:
                self._handle_timeouts()
            if tick is not None:
                tick()
            if watch is not None:
                watch()
            if self.draining:
                self._drain_backlog()
            elif not self._accepting and self.alive and self.has_capacity() and self._rested():
                self.resume_accepting()
        return EXIT_OK

    def serve_queue(self, server: Any) -> None:
        """Serve what ``server`` has queued, up to ACCEPT_BATCH requests (see
        ``_queue_server``)."""
        self._queues[server]()

    def serve_one(self, server: Any) -> bool:
        """Accept one request from ``server`` and hand it on, as BaseServer does.

        False when there was nothing to accept (a sibling won the race, or the queue is
        empty)."""
        return self._cycles[server]()

    def _queue_server(self, serve_one: Callable[[], bool]) -> Callable[[], None]:
        """Serve what one server has queued, up to ACCEPT_BATCH requests, before going
        back to select: under load the queue is rarely empty, and every select saved is
        a syscall a bare accept loop never makes. Stops at the first empty accept, a
        signal, or full capacity. (Each request's end beats the heartbeat.)"""
        pending, batch = self.wakeup.pending, range(ACCEPT_BATCH)

        def serve_queue() -> None:
            for _ in batch:
                if not serve_one() or pending or not self._accepting:
                    return

        return serve_queue

    def _request_cycle(self, server: Any) -> Callable[[], bool]:
        """``serve_one`` for one server: BaseServer's request cycle, with what stays the
        same from one request to the next looked up once, at boot.

        The hooks are those the server has once the worker has booted (instance
        attributes included: the access log's ``finish_request``, the client timeout's
        ``get_request``); a hook the server rebinds later is not seen. Steps that would
        do nothing are left out: BaseServer's ``verify_request`` (always true), the
        worker's ``has_capacity`` when its class does not bound concurrency; and where
        both the worker's ``process`` and the server's ``process_request`` are the
        stock ones, their two calls are made directly (``finish_request`` then
        ``shutdown_request``), with the same handling of what they raise."""
        heartbeat = self.spec.heartbeat
        started, finished = heartbeat.request_started, heartbeat.request_finished
        get_request, handle_error = server.get_request, server.handle_error
        finish, shutdown = server.finish_request, server.shutdown_request
        verify = None if stock_hook(server, "verify_request") else server.verify_request
        process = self.process
        inline = type(self).process is Worker.process and stock_hook(server, "process_request")
        bounded = type(self).has_capacity is not Worker.has_capacity
        timed = self._timed if server in self._timed else None
        retire_at, status_fd = self.spec.max_requests, self.spec.status_fd
        now = time.monotonic

        def serve_one() -> bool:
            try:
                request, client_address = get_request()
            except OSError as exc:  # EAGAIN (most): a sibling won the race, or none queued
                if exc.errno in _STARVED:
                    self._starved(exc)
                return False
            self.requests = served = self.requests + 1
            started(client_address, served)
            if timed is not None:
                timed[server] = now()
            if verify is None or verify(request, client_address):
                try:
                    if inline:
                        finish(request, client_address)
                        shutdown(request)
                    else:
                        process(server, request, client_address)
                except Exception:
                    handle_error(request, client_address)
                    shutdown(request)
                except BaseException:
                    shutdown(request)
                    raise
            else:
                shutdown(request)
            finished(served)
            if served == retire_at:
                # Ask for a successor and keep serving: the master retires us once ready.
                with contextlib.suppress(OSError):
                    os.write(status_fd, RETIRE)
            if bounded and not self.has_capacity():
                self.pause_accepting()
            return True

        return serve_one

    def process(self, server: Any, request: Any, client_address: Any) -> None:
        server.process_request(request, client_address)

    # -- capacity and draining; overridden by thread and fork workers --------------------
    def has_capacity(self) -> bool:
        return True

    def tick(self) -> None:
        """Once per loop turn, after the requests of that turn."""

    def is_idle(self) -> bool:
        return True

    def quit_now(self) -> NoReturn:
        if self.access is not None:
            self.access.close()
        os._exit(EXIT_OK)

    def pause_accepting(self) -> None:
        if self._accepting:
            for server in self.servers:
                self.poller.unregister(server.socket.fileno())
            self._accepting = False

    def resume_accepting(self) -> None:
        if not self._accepting:
            for server in self.servers:
                self.poller.register(server.socket.fileno(), self._queues[server], exclusive=True)
            self._accepting = True

    def stop_accepting(self) -> None:
        """Graceful stop: no new requests; the loop ends once in-flight ones are done.

        The worker's own copies of its stream listeners are closed: once the master has
        closed its own (a final stop of ``prefork run``), the last worker to close makes
        the kernel refuse new connections instead of queueing them to be reset. (A
        datagram socket stays: handlers answer through it.)"""
        self.pause_accepting()
        self.alive = False
        self.draining = False
        self.stopping.set()
        for server in self.servers:
            if server.socket.type == socket.SOCK_STREAM:
                server.socket.close()

    # -- control events --------------------------------------------------------------------
    def _on_wakeup(self) -> None:
        if self.wakeup.drain() and self._handlers_lag:
            signals.run_handlers_now()
        while self.wakeup.pending:
            signum = self.wakeup.pending.popleft()
            if signum == signal.SIGTERM and self.spec.heartbeat.drain_requested():
                self._start_drain()  # the final stop: leave nothing queued to be reset
            elif signum == signal.SIGTERM:
                self.stop_accepting()  # retired: siblings serve the queue
            elif signum in (signal.SIGQUIT, signal.SIGINT):
                self.quit_now()
            elif signum == signal.SIGUSR1:
                if self.access is not None:
                    self.access.reopen()
                if prefork_log.reopen():
                    _dump_stack_to_log_on_signal()
                    log.debug("worker %d (pid %d) reopened its log file", self.spec.nr, os.getpid())

    def _start_drain(self) -> None:
        """The final stop: serve what was queued when it began, then stop accepting.

        Only what was queued then: under sustained load a queue is never empty, and
        serving until it is would run into --graceful-timeout and a SIGKILL. A TCP
        listener says how many connections wait (TCP_INFO); other sockets are served
        until they are empty. Either way the drain ends by DRAIN_MAX, or half the
        graceful timeout if less."""
        if self.draining or not self.alive:
            return
        self.draining = True
        self.pause_accepting()  # from now on only the drain accepts, counting
        self._drain_left = {id(s): queued_connections(s.socket) for s in self.servers}
        budget = min(DRAIN_MAX, self.plan.graceful_timeout / 2)
        self._drain_until = time.monotonic() + budget

    def _drain_backlog(self) -> None:
        """Serve the queue noted by ``_start_drain``; stop accepting once it is served, or
        empty, or the drain's time is up. At its capacity a thread or fork worker comes
        back on a later turn; a signal (QUIT) is dispatched first."""
        pending, left = self.wakeup.pending, self._drain_left
        done = time.monotonic() >= self._drain_until
        for server in self.servers if not done else ():
            while left.get(id(server)) != 0:
                if pending or not self.has_capacity():
                    return  # back after the signal, or once a thread or child is free
                remaining = left.get(id(server))
                if not self.serve_one(server):
                    left[id(server)] = 0  # EAGAIN: this socket's queue is empty
                elif remaining is not None:
                    left[id(server)] = remaining - 1
                if time.monotonic() >= self._drain_until:
                    break
        self.stop_accepting()

    def _starved(self, exc: OSError) -> None:
        """accept() failed for want of a descriptor or memory: the connection stays
        queued, and the listener readable. Accepting again at once would spin the loop
        (a core at 100% for as long as it lasts); it pauses for ACCEPT_BACKOFF instead,
        while the worker's connections finish and free what they hold. One line a
        minute at most."""
        now = time.monotonic()
        self.pause_accepting()
        self._accept_again = now + ACCEPT_BACKOFF
        if now >= self._starved_said:
            self._starved_said = now + 60.0
            log.warning(
                "worker %d (pid %d) cannot accept: %s; pausing %gs (repeats are not logged"
                " for a minute)", self.spec.nr, os.getpid(), exc.strerror, ACCEPT_BACKOFF
            )  # fmt: skip

    def _rested(self) -> bool:
        """Whether a pause for want of descriptors (if any) is over."""
        if self._accept_again and time.monotonic() < self._accept_again:
            return False
        self._accept_again = 0.0
        return True

    def _on_master_gone(self) -> None:
        log.warning("worker %d (pid %d): the master is gone; exiting", self.spec.nr, os.getpid())
        self.quit_now()

    def _select_timeout(self) -> float:
        timeout = self.plan.poll_interval
        if self._accept_again:
            timeout = min(timeout, max(0.0, self._accept_again - time.monotonic()))
        if self._timed:
            now = time.monotonic()
            for server, since in self._timed.items():
                timeout = min(timeout, max(0.0, since + server.timeout - now))
        return timeout

    def _handle_timeouts(self) -> None:
        now = time.monotonic()
        for server, since in self._timed.items():
            if now - since >= server.timeout:
                server.handle_timeout()
                self._timed[server] = now


def stock_hook(server: Any, hook: str, owner: type = socketserver.BaseServer) -> bool:
    """Whether ``server``'s ``hook`` is ``owner``'s own (not overridden by a class or set
    on the instance)."""
    return hook not in vars(server) and getattr(type(server), hook) is getattr(owner, hook)


_TCP_INFO_UNACKED = 24  # offset of tcpi_unacked: a listener's accept queue length


def queued_connections(listener: socket.socket) -> int | None:
    """How many connections wait in a TCP listener's accept queue; None for a socket
    that does not say (Unix, UDP)."""
    if listener.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    if listener.type != socket.SOCK_STREAM:
        return None
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    return int.from_bytes(info[_TCP_INFO_UNACKED : _TCP_INFO_UNACKED + 4], sys.byteorder)
