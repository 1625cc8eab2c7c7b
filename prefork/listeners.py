"""Addresses: parse ``--bind`` values, and the socket chores around binding.

``parse_bind`` is pure and table-tested. The rest touches sockets: telling a stale
Unix socket file from a live one, opening the per-worker SO_REUSEPORT siblings,
and turning an ``OSError`` from bind into a one-line ``BindError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import ipaddress
import logging
import re
import socket
import socketserver
import struct
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from .errors import BindError

log = logging.getLogger("prefork.listeners")

Kind = Literal["tcp", "udp", "unix", "unix-dgram", "fd"]

_SCHEMES: dict[str, Kind] = {
    "tcp://": "tcp",
    "udp://": "udp",
    "unix:": "unix",
    "unix-dgram:": "unix-dgram",
    "fd://": "fd",
}
_IPV4_LOOKALIKE = re.compile(r"[0-9.]+")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*\.?")


class BindSpec(NamedTuple):
    """One parsed ``--bind`` value. ``address`` is what socketserver takes, or an fd number."""

    kind: Kind
    address: tuple[str, int] | str | int
    text: str

    @property
    def family(self) -> socket.AddressFamily:
        if self.kind in ("unix", "unix-dgram"):
            return socket.AF_UNIX
        assert isinstance(self.address, tuple)
        return socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET

    @property
    def fd(self) -> int:
        assert isinstance(self.address, int), "only fd:// binds have a descriptor"
        return self.address

    @property
    def stream(self) -> bool:
        return self.kind in ("tcp", "unix")


def parse_bind(text: str) -> BindSpec:
    """Turn one --bind value into a BindSpec; raise BindError naming the value."""
    kind: Kind = "tcp"
    rest = text
    for prefix, scheme_kind in _SCHEMES.items():
        if text.startswith(prefix):
            kind, rest = scheme_kind, text[len(prefix) :]
            break
    else:
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
            raise BindError(
                f"bad bind {text!r}: unknown scheme (use tcp://, udp://, unix:, "
                "unix-dgram: or fd://)"
            )
    if kind in ("unix", "unix-dgram"):
        if not rest:
            raise BindError(f"bad bind {text!r}: the Unix socket path is empty")
        if rest == "@":
            raise BindError(f"bad bind {text!r}: the abstract socket name after @ is empty")
        # '@name' is Linux's abstract namespace, which Python spells with a NUL byte.
        return BindSpec(kind, "\0" + rest[1:] if rest.startswith("@") else rest, text)
    if kind == "fd":
        if not (rest.isascii() and rest.isdigit()):
            raise BindError(f"bad bind {text!r}: expected fd://N with N a descriptor number")
        return BindSpec("fd", int(rest), text)
    return BindSpec(kind, _split_host_port(rest, text), text)


def _split_host_port(rest: str, text: str) -> tuple[str, int]:
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep:
            raise BindError(f"bad bind {text!r}: expected [IPV6]:PORT")
        _check_ip(host, ipaddress.IPv6Address, text)
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise BindError(f"bad bind {text!r}: expected HOST:PORT")
        if ":" in host:
            raise BindError(f"bad bind {text!r}: put an IPv6 address in brackets, [{host}]:{port}")
        if _IPV4_LOOKALIKE.fullmatch(host):
            _check_ip(host, ipaddress.IPv4Address, text)
        elif host and not _HOSTNAME.fullmatch(host):
            raise BindError(f"bad bind {text!r}: {host!r} is not a host name or address")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise BindError(f"bad bind {text!r}: port must be a number from 0 to 65535")
    return host or "0.0.0.0", int(port)


def _check_ip(host: str, kind: Callable[[str], object], text: str) -> None:
    try:
        kind(host)
    except ValueError:
        raise BindError(f"bad bind {text!r}: {host!r} is not a valid IP address") from None


def base_server_class(family: int, stream: bool) -> type[socketserver.BaseServer]:
    """The stdlib server class for a socket family and kind (stream or datagram)."""
    if family == socket.AF_UNIX:
        return socketserver.UnixStreamServer if stream else socketserver.UnixDatagramServer
    return socketserver.TCPServer if stream else socketserver.UDPServer


def inherited_socket(fd: int, text: str) -> socket.socket:
    """Adopt an already-bound descriptor (``fd://N``); family and type come from the fd."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(f"cannot use {text}: {describe_os_error(exc)}") from None
    if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        sock.detach()
        raise BindError(f"cannot use {text}: not a stream or datagram socket")
    return sock


@functools.cache
def somaxconn() -> int | None:
    """The kernel's cap on a listen queue (net.core.somaxconn), if it says."""
    try:
        with open("/proc/sys/net/core/somaxconn", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def listen_backlog(backlog: int, quiet: bool = False) -> int:
    """``backlog`` as listen() will get it: the kernel's cap would lower it silently, so
    it is lowered here, with a line saying so (once per bind; ``quiet`` for the
    per-worker siblings of a bind that said it already)."""
    cap = somaxconn()
    if cap is None or backlog <= cap:
        return backlog
    if not quiet:
        log.info("backlog %d is above net.core.somaxconn; the kernel's %d applies", backlog, cap)
    return cap


_TIMEVAL = struct.Struct("ll")
_CLIENT_TIMEOUTS = (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO)


def timeval(seconds: float) -> bytes:
    """``seconds`` as a struct timeval; a positive time never rounds down to 0 (off)."""
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    if seconds > 0 and not whole and not micro:
        micro = 1
    return _TIMEVAL.pack(whole, micro)


def set_client_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO and SO_SNDTIMEO: a blocking read or write that waits longer for the
    peer fails with EAGAIN. Kept by the kernel, so unlike ``settimeout`` (which makes
    Python poll() before every read and write: five more system calls for a small HTTP
    request, measured with strace) it costs nothing per call; set on a TCP listening
    socket, every accepted connection inherits it (Unix sockets do not: each connection
    gets it as it is accepted). 0 turns it off."""
    value = timeval(seconds)
    for option in _CLIENT_TIMEOUTS:
        sock.setsockopt(socket.SOL_SOCKET, option, value)


def client_timeout_of(sock: socket.socket) -> float:
    """The receive timeout the socket has (0: none)."""
    whole, micro = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    return float(whole + micro / 1_000_000)


def defer_accept_of(sock: socket.socket) -> int:
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    return sock.getsockopt(socket.IPPROTO_TCP, option) if option is not None else 0


def set_defer_accept(sock: socket.socket, seconds: int) -> None:
    """TCP_DEFER_ACCEPT (Linux): accept() returns a connection only once it has data, or
    after about ``seconds`` (the kernel counts SYN-ACK retransmissions: 1, 3, 7, 15,
    31 s...). 0 turns it off. Set on the listening socket, it costs nothing per request."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is not None:
        sock.setsockopt(socket.IPPROTO_TCP, option, seconds)


def reuse_port_supported(sock: socket.socket) -> bool:
    return hasattr(socket, "SO_REUSEPORT") and sock.family in (socket.AF_INET, socket.AF_INET6)


def open_sibling(sock: socket.socket, backlog: int) -> socket.socket:
    """Another socket on the same address, for one worker's own SO_REUSEPORT queue."""
    sibling = socket.socket(sock.family, sock.type)
    try:
        sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.type == socket.SOCK_STREAM and sock.family != socket.AF_UNIX:
            for option in (socket.TCP_NODELAY, getattr(socket, "TCP_DEFER_ACCEPT", None)):
                if option is not None:
                    value = sock.getsockopt(socket.IPPROTO_TCP, option)
                    sibling.setsockopt(socket.IPPROTO_TCP, option, value)
            for option in _CLIENT_TIMEOUTS:
                setting = sock.getsockopt(socket.SOL_SOCKET, option, _TIMEVAL.size)
                sibling.setsockopt(socket.SOL_SOCKET, option, setting)
        sibling.bind(sock.getsockname())
        if sock.type == socket.SOCK_STREAM:
            sibling.listen(listen_backlog(backlog, quiet=True))
        sibling.setblocking(False)
    except BaseException:
        sibling.close()
        raise
    return sibling


_SO_ATTACH_REUSEPORT_CBPF = 51  # Linux 4.5
_SO_DETACH_REUSEPORT_BPF = 68  # Linux 5.3
_BPF_RET_K = 0x06


def steer_to_first(sock: socket.socket) -> bool:
    """Send every new connection of ``sock``'s SO_REUSEPORT group to its first member.

    The first member is the socket bound at start (the siblings joined after it, and the
    kernel fills a closed member's place with the last one, never with the first), so
    the other members receive nothing new and can be drained and closed without a
    connection landing on them in between and being reset. A one-instruction classic BPF
    program, ``return 0``. False where the kernel refuses it.
    """
    program = ctypes.create_string_buffer(struct.pack("=HBBI", _BPF_RET_K, 0, 0, 0))
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        log.warning("cannot steer new connections off the slot sockets: %s", exc.strerror)
        return False
    return True


def stop_steering(sock: socket.socket) -> None:
    """Undo steer_to_first (a USR2 that turned reuse_port back on): spread again."""
    # ENOENT: none attached; ENOPROTOOPT: a kernel without it never had one
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_REUSEPORT_BPF, 0)


_ERRNO_WORDS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EADDRNOTAVAIL: "address not available on this machine",
    errno.ENOENT: "no such directory",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EBADF: "not an open descriptor",
    errno.ENOTSOCK: "not a socket",
}


def describe_os_error(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror})"
    words = _ERRNO_WORDS.get(exc.errno or 0)
    return words or (exc.strerror or str(exc)).lower()


def bind_error(text: str, exc: OSError) -> BindError:
    return BindError(f"cannot bind {text}: {describe_os_error(exc)}")


def describe_address(server: Any) -> str:
    """How a bound server's address reads in logs: the --bind syntax that would name it."""
    address = server.server_address
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        scheme = "udp://" if server.socket.type == socket.SOCK_DGRAM else ""
        return f"{scheme}[{host}]:{port}" if ":" in host else f"{scheme}{host}:{port}"
    if isinstance(address, bytes):
        address = address.decode("utf-8", "replace")
    kind = "unix" if server.socket.type == socket.SOCK_STREAM else "unix-dgram"
    return f"{kind}:@{address[1:]}" if address.startswith("\0") else f"{kind}:{address}"


def describe_server(server: Any) -> str:
    """describe_address, and the name systemd gave the socket (LISTEN_FDNAMES), if any."""
    name = getattr(server, "prefork_fdname", "")
    return f"{describe_address(server)} ({name})" if name else describe_address(server)


class SlotSockets:
    """With --reuse-port: each worker slot's own sibling of each reuse-port socket.

    The master opens and keeps them, so a replaced worker takes over its slot's queue
    and nothing queued there is lost. Slot 1 uses the original sockets.
    """

    def __init__(self, backlog: int) -> None:
        self.backlog = backlog
        self._sockets: dict[tuple[int, int], socket.socket] = {}  # (slot, id(server))

    def for_slot(self, nr: int, servers: list[Any]) -> list[socket.socket | None]:
        """The sockets worker ``nr`` serves instead of the shared ones (None: shared)."""
        own: list[socket.socket | None] = []
        for server in servers:
            if nr == 1 or not getattr(server, "_prefork_reuse_port", False):
                own.append(None)
                continue
            key = (nr, id(server))
            if key not in self._sockets:
                self._sockets[key] = open_sibling(server.socket, self.backlog)
            own.append(self._sockets[key])
        return own

    def fds(self) -> set[int]:
        return {sock.fileno() for sock in self._sockets.values()}

    def has_slot(self, nr: int) -> bool:
        return any(slot == nr for slot, _ in self._sockets)

    def close_slot(self, nr: int) -> None:
        self._close(lambda slot, _: slot == nr)

    def close_server(self, server: Any) -> None:
        self._close(lambda _, server_id: server_id == id(server))

    def close_all(self) -> None:
        self._close(lambda _slot, _server: True)

    def export(self, servers: list[Any]) -> dict[str, list[int]]:
        """Descriptor numbers per slot, aligned with ``servers`` (-1: shared), for USR2."""
        slots = {slot for slot, _ in self._sockets}
        return {
            str(nr): [
                self._sockets[(nr, id(s))].fileno() if (nr, id(s)) in self._sockets else -1
                for s in servers
            ]
            for nr in sorted(slots)
        }

    def adopt(self, exported: dict[str, list[int]], servers: list[Any]) -> None:
        """An upgrade's slot sockets. Where the new settings turned reuse_port off, the
        old workers drain theirs while new connections go to the shared socket only."""
        for nr, fds in exported.items():
            for server, fd in zip(servers, fds, strict=True):
                if fd >= 0:
                    sock = socket.socket(fileno=fd)
                    sock.set_inheritable(False)
                    sock.setblocking(False)
                    self._sockets[(int(nr), id(server))] = sock
        for server in servers:
            if not reuse_port_supported(server.socket):
                continue
            if getattr(server, "_prefork_reuse_port", False):
                stop_steering(server.socket)
            elif any(server_id == id(server) for _, server_id in self._sockets):
                steer_to_first(server.socket)

    def _close(self, which: Callable[[int, int], bool]) -> None:
        for key in [k for k in self._sockets if which(*k)]:
            self._sockets.pop(key).close()
