"""prefork: a supervised pre-fork worker server for socketserver request handlers."""

from __future__ import annotations

import gc

# Importing builds thousands of objects (classes, dataclasses' generated methods) and
# frees none: collections run meanwhile find nothing and cost 10-15% of the import,
# which is on the path of every start. Paused for prefork's own modules only; the
# caller's setting is restored.
_collecting = gc.isenabled()
gc.disable()
try:
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
finally:
    if _collecting:
        gc.enable()
    del _collecting

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
