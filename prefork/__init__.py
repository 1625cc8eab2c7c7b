"""prefork: a supervised pre-fork worker server for socketserver request handlers."""

from __future__ import annotations

from .config import Config
from .errors import AppImportError, BindError, BootError, ConfigError, PreforkError
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
from .version import __version__
from .worker_process import WorkerInfo

__all__ = [
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
