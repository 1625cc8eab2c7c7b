"""prefork: a supervised pre-fork worker server for socketserver request handlers.

The server classes are imported on first use (PEP 562): ``prefork run`` imports this
package before its command, and reads and checks its settings before it needs them
(cli.py imports them while the import check runs, or first with --preload and
--server-class).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import collector

with collector.paused():  # for prefork's own modules only (collector.py says why)
    from .config import Config
    from .errors import AppImportError, BindError, BootError, ConfigError, PreforkError
    from .version import __version__

if TYPE_CHECKING:
    from .mixin import PreForkMixIn
    from .servers import (
        PreForkForkingTCPServer,
        PreForkForkingUDPServer,
        PreForkForkingUnixDatagramServer,
        PreForkForkingUnixStreamServer,
        PreForkTCPServer,
        PreForkThreadingTCPServer,
        PreForkThreadingUDPServer,
        PreForkThreadingUnixDatagramServer,
        PreForkThreadingUnixStreamServer,
        PreForkUDPServer,
        PreForkUnixDatagramServer,
        PreForkUnixStreamServer,
    )
    from .worker_process import WorkerInfo

_LATER = {
    "PreForkMixIn": "mixin",
    "WorkerInfo": "worker_process",
    **{
        f"PreFork{model}{kind}Server": "servers"
        for model in ("", "Forking", "Threading")
        for kind in ("TCP", "UDP", "UnixStream", "UnixDatagram")
    },
}


def wsgi_handler(app: Any) -> type:
    """The request handler class that serves the WSGI ``app`` over HTTP/1.1, for any
    prefork server class (docs/wsgi.md)."""
    from .wsgi import handler_for  # the HTTP parser is imported by those who serve HTTP

    return handler_for(app)


def serve_wsgi(app: Any, server_address: Any = ("127.0.0.1", 8000), **settings: Any) -> None:
    """Serve the WSGI ``app`` with thread workers (keep-alive) until stopped: a TCP
    address, or a Unix socket's path. ``settings``: PreForkMixIn's keyword arguments."""
    from . import servers

    cls: Any = (
        servers.PreForkThreadingUnixStreamServer
        if isinstance(server_address, str)
        else servers.PreForkThreadingTCPServer
    )
    with cls(server_address, wsgi_handler(app), **settings) as server:
        server.serve_forever()


def __getattr__(name: str) -> Any:
    module = _LATER.get(name)
    if module is None:
        raise AttributeError(f"module 'prefork' has no attribute {name!r}")
    with collector.paused():
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "serve_wsgi",
    "wsgi_handler",
    "AppImportError",
    "BindError",
    "BootError",
    "Config",
    "ConfigError",
    "PreforkError",
    "PreForkForkingTCPServer",
    "PreForkForkingUDPServer",
    "PreForkForkingUnixDatagramServer",
    "PreForkForkingUnixStreamServer",
    "PreForkMixIn",
    "PreForkTCPServer",
    "PreForkThreadingTCPServer",
    "PreForkThreadingUDPServer",
    "PreForkThreadingUnixDatagramServer",
    "PreForkThreadingUnixStreamServer",
    "PreForkUDPServer",
    "PreForkUnixDatagramServer",
    "PreForkUnixStreamServer",
    "WorkerInfo",
    "__version__",
]
