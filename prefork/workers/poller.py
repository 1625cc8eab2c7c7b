"""Poller: the worker loop's epoll, with EPOLLEXCLUSIVE on the listening sockets.

Every worker waits on the same listening sockets. With plain epoll, one new connection
wakes every idle worker; all but one then find nothing to accept and go back to sleep,
a context switch and two syscalls each, for nothing. EPOLLEXCLUSIVE (Linux 4.5) wakes
one, as a blocking accept() would. The loop needs little of ``selectors``: register a
descriptor with a callback, unregister it, wait for the callbacks that are ready.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Callable

Callback = Callable[[], object]
_EXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0)


class Poller:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._exclusive = _EXCLUSIVE  # 0 once the kernel has refused it

    def register(self, fd: int, callback: Callback, exclusive: bool = False) -> None:
        """Call ``callback`` when ``fd`` is readable (or hung up). ``exclusive``: a
        listening socket shared with other workers; wake only one of them."""
        events = select.EPOLLIN
        if exclusive and self._exclusive:
            try:
                self._epoll.register(fd, events | self._exclusive)
            except OSError:  # a kernel before 4.5: a thundering herd, but it works
                self._exclusive = 0
                self._epoll.register(fd, events)
        else:
            self._epoll.register(fd, events)
        self._callbacks[fd] = callback

    def unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, OSError):
            del self._callbacks[fd]
            self._epoll.unregister(fd)

    def wait(self, timeout: float) -> list[Callback]:
        """The callbacks of the descriptors that are ready, waiting up to ``timeout``."""
        callbacks = self._callbacks
        return [callbacks[fd] for fd, _ in self._epoll.poll(timeout) if fd in callbacks]

    def fileno(self) -> int:
        return self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()
