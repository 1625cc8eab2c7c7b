"""Which binds a start or a HUP opens, when sockets were inherited (socket activation).

Sockets passed by systemd (``LISTEN_FDS``) are the configuration's binds for the whole
life of the master: a start or a HUP opens only the binds the settings name explicitly
(``--bind``, ``PREFORK_BIND``, ``bind =`` in the config file), never the default
127.0.0.1:8000; a bind that names an inherited socket (``fd://3``, or the address the
socket is bound to) is that socket, adopted once, not bound again; ``bind = []`` means
"only the sockets I was given". Without inherited sockets, there must be a bind.
"""

from __future__ import annotations

import os
import socket
from typing import Any, NamedTuple

from .errors import ConfigError
from .listeners import BindSpec, parse_bind


class Inherited(NamedTuple):
    """A socket passed to the master: its descriptor, kind, address and systemd name."""

    fd: int
    kind: str  # tcp, udp, unix, unix-dgram
    address: Any
    name: str = ""  # from LISTEN_FDNAMES

    @classmethod
    def of_socket(cls, fd: int, name: str = "") -> Inherited:
        """The passed descriptor ``fd``, looked at (not taken: it is adopted later)."""
        with socket.socket(fileno=os.dup(fd)) as sock:
            stream = sock.type == socket.SOCK_STREAM
            if sock.family == socket.AF_UNIX:
                kind = "unix" if stream else "unix-dgram"
            else:
                kind = "tcp" if stream else "udp"
            return cls(fd, kind, _normal(sock.getsockname()), name)

    def named_by(self, spec: BindSpec) -> bool:
        """Whether ``spec`` names this socket (by descriptor or by address)."""
        if spec.kind == "fd":
            return spec.fd == self.fd
        return spec.kind == self.kind and _normal(spec.address) == self.address


def _normal(address: Any) -> Any:
    if isinstance(address, tuple):
        return (address[0], address[1])
    if isinstance(address, bytes):
        address = address.decode("utf-8", "replace")
    if isinstance(address, str) and address and not address.startswith("\0"):
        return os.path.abspath(address)
    return address


def binds_to_open(
    binds: tuple[str, ...], explicit: bool, inherited: list[Inherited]
) -> tuple[str, ...]:
    """The binds to open beside the inherited sockets; ConfigError when there is none at
    all to serve."""
    if inherited and not explicit:
        return ()  # the default address is not asked for: the passed sockets are the binds
    wanted = tuple(
        text for text in binds if not any(i.named_by(parse_bind(text)) for i in inherited)
    )
    if not wanted and not inherited:
        raise ConfigError(
            "nothing to serve: give --bind (bind = [] is for sockets passed by systemd)"
        )
    return wanted
