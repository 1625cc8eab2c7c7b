"""What HUP re-reads: the settings of the next generation, and the sockets it serves.

``prefork run`` gives the master a ``Reconfigurer`` (the library does not: HUP there
restarts the workers with the settings they have). The new generation gets the settings
as they read now, except those that shape the sockets or the process, which wait for the
next USR2 or restart; its servers are the serving generation's, less the binds no longer
configured, plus the new ones, bound now (a bind that fails abandons the reload before
anything else changed). Removed binds keep serving the old generation and are closed
once no generation with workers uses them (``generations.py``).
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from typing import Any, Protocol

from .binds import Inherited
from .config import Config
from .errors import ConfigError
from .generations import Generation
from .identity import Identity
from .listeners import describe_address, parse_bind

log = logging.getLogger("prefork.arbiter")

# Settings a HUP cannot change in a running master: they shape the sockets, the server
# classes or the process itself. They take effect at the next USR2 or restart.
FIXED_UNTIL_RESTART = (
    "worker_class",
    "preload",
    "server_class",
    "chdir",
    "pythonpath",
    "pid",
    "reuse_port",
    "backlog",
    "tcp_nodelay",
    "defer_accept",
    "client_timeout",
    "config",
    "umask",
    "capture_output",
    "log_config",
)


class Reconfigurer(Protocol):
    """What ``prefork run`` gives the master so that HUP re-reads its settings."""

    def read(self) -> Config:
        """The settings as they are now (config file, command line, environment)."""

    def open(self, bind: str, config: Config) -> Any:
        """Bind a new address; the server's ``prefork_bind`` is ``bind``."""


def next_settings(settings: Reconfigurer, serving: Generation) -> tuple[Config, list[Any]]:
    """The next generation's settings and servers; PreforkError (nothing changed) when the
    settings are wrong or a new bind cannot be bound."""
    new = settings.read()
    Identity.resolve(new.user, new.group)  # an unknown user abandons the reload here
    kept = {
        f.name: getattr(serving.config, f.name)
        for f in fields(Config)
        if f.name in FIXED_UNTIL_RESTART and getattr(new, f.name) != getattr(serving.config, f.name)
    }
    for name in kept:
        log.warning("%s changed; it takes effect at the next USR2 or restart", name)
    new = replace(new, **kept)
    current = {getattr(s, "prefork_bind", None) for s in serving.servers}
    for bind in new.binds:  # another spelling of a bound address is that very socket
        existing = _serving(bind, serving.servers) if bind not in current else None
        if existing is not None and existing.prefork_bind:
            existing.prefork_bind = bind
            current.add(bind)
    for bind in new.binds:
        if bind not in current and parse_bind(bind).kind == "fd":
            # At start a descriptor is what the parent passed; now it would be one of the
            # master's own (a listener, a pipe), and closing it on an abandoned reload
            # would take that from the service.
            raise ConfigError(f"{bind}: a descriptor can be named only at start")
    added: list[Any] = []
    try:
        for bind in new.binds:
            if bind not in current:
                added.append(settings.open(bind, new))
                added[-1].socket.setblocking(False)
    except BaseException:
        for server in added:
            server.server_close()
        raise
    configured = set(new.binds)
    # A server without prefork_bind (systemd's, or the library's own) is never removed.
    kept_servers = [
        s
        for s in serving.servers
        if not getattr(s, "prefork_bind", None) or s.prefork_bind in configured
    ]
    for server in added:
        log.info("added %s", describe_address(server))
    return new, kept_servers + added


def _serving(bind: str, servers: list[Any]) -> Any:
    """The server already bound to the address ``bind`` names, if any (port 0 names
    none: it asks for a new one)."""
    spec = parse_bind(bind)
    if spec.kind == "fd" or (isinstance(spec.address, tuple) and spec.address[1] == 0):
        return None
    for server in servers:
        if Inherited.of_socket(server.socket.fileno()).named_by(spec):
            return server
    return None
