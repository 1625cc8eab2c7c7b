"""SyncWorker: one connection at a time, like a plain TCPServer/UDPServer."""

from __future__ import annotations

import _thread
import os
import signal

from ..errors import EXIT_OK
from .base import Worker


class SyncWorker(Worker):
    """Serves inline. Its loop is blocked while a handler runs, so a side thread watches
    the master's pipe: a sync worker must leave within a second of its master's death
    even in the middle of a long request."""

    def boot(self) -> None:
        super().boot()
        # Not threading.Thread: its start() waits until the new thread has run, a
        # millisecond or more of every boot on a busy machine, and nothing here needs
        # to know that it has (nor to join it: the worker leaves by os._exit). Started
        # with every signal blocked, which it keeps: signals then reach the main
        # thread, interrupting a handler that waits for its client, so that a TERM's
        # handler runs at once (it wakes a waiting keep-alive connection, stopping.py).
        # Delivered to this thread, a TERM would wait for that handler's next bytecode.
        every = signal.valid_signals()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, every)
        try:
            _thread.start_new_thread(self._exit_when_master_dies, ())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _exit_when_master_dies(self) -> None:
        try:
            while os.read(self.plan.master_fd, 1):
                pass  # the master never writes; this only returns at EOF
        except OSError:
            pass
        os._exit(EXIT_OK)
