"""SyncWorker: one connection at a time, like a plain TCPServer/UDPServer."""

from __future__ import annotations

import os
import threading

from ..errors import EXIT_OK
from .base import Worker


class SyncWorker(Worker):
    """Serves inline. Its loop is blocked while a handler runs, so a side thread watches
    the master's pipe: a sync worker must leave within a second of its master's death
    even in the middle of a long request."""

    def boot(self) -> None:
        super().boot()
        threading.Thread(
            target=self._exit_when_master_dies, name="prefork-master-watch", daemon=True
        ).start()

    def _exit_when_master_dies(self) -> None:
        try:
            while os.read(self.plan.master_fd, 1):
                pass  # the master never writes; this only returns at EOF
        except OSError:
            pass
        os._exit(EXIT_OK)
