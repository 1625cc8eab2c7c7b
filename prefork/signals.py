"""The self-pipe and the signal routes of the master and the workers.

A signal handler here does exactly two things: append the signal number to a deque and
write one byte to a pipe. Everything else (logging, reaping, stopping) happens in the
loop that sleeps on that pipe, so nothing runs re-entrantly inside a handler.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

# What the master listens to. SIGCHLD only wakes the loop; reaping happens there.
MASTER_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)
# Blocked around fork() so a signal can never reach a child that still runs the
# master's handlers (it would be recorded in a copy of the master's queue and lost).
FORK_BLOCKED = frozenset(MASTER_SIGNALS)


class Wakeup:
    """A non-blocking self-pipe plus the queue of signals waiting to be dispatched."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pending: deque[int] = deque()  # append and popleft are atomic

    def fileno(self) -> int:
        return self.read_fd

    def notify(self, signum: int = 0) -> None:
        """Queue ``signum`` (0: just wake up). Safe in a signal handler and from any thread."""
        if signum:
            self.pending.append(signum)
        with contextlib.suppress(BlockingIOError):  # full pipe: a wake-up is already queued
            os.write(self.write_fd, b"\0")

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.notify(signum)

    def drain(self) -> bool:
        """Empty the pipe. Returns whether a signal's C-level handler wrote to it (its
        number, through ``wake_on_any_thread``; ``notify`` writes 0)."""
        signalled = False
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.read_fd, 4096):
                signalled = signalled or bool(data.strip(b"\0"))
        return signalled

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class SignalRoute:
    """Route some signals into a Wakeup, remembering the handlers they replace."""

    def __init__(self, wakeup: Wakeup, signums: Iterable[int]) -> None:
        self.wakeup = wakeup
        self.signums = tuple(signums)
        self._previous: dict[int, Any] = {}
        self._previous_wakeup_fd = -1

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Install the handlers. Returns False off the main thread (an embedded server)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self.wakeup.handler)
        self._previous_wakeup_fd = wake_on_any_thread(self.wakeup)
        return True

    def restore(self) -> None:
        if self._previous:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def wake_on_any_thread(wakeup: Wakeup) -> int:
    """Make a signal wake the loop whichever thread the kernel delivers it to.

    Python runs signal handlers in the main thread only, and only between bytecodes:
    a signal delivered to another thread (the host's, or a worker's watcher thread)
    would wait until the main thread's select() timed out. The C-level handler writes
    to the wakeup fd at once, from any thread. Returns the previous wakeup fd.
    """
    return signal.set_wakeup_fd(wakeup.write_fd, warn_on_full_buffer=False)


# CPython runs a Python signal handler between two bytecodes of the main thread, once
# its C-level handler has flagged the main thread's state. From 3.13 that is the state
# of the thread that was the main one at start-up: in a process forked from another
# thread (a worker of a serve_forever() run outside the main thread) that thread does
# not exist, and the handlers wait for the next system call a signal interrupts, which
# for an idle worker is never. Such a process runs them itself (run_handlers_now).
HANDLERS_LAG_WHEN_FORKED_OFF_MAIN = sys.version_info >= (3, 13)


def run_handlers_now() -> None:
    """Run, in this thread (the main one), the Python handlers of signals that arrived:
    ``pthread_kill`` with signal 0 sends nothing, and then runs them."""
    signal.pthread_kill(threading.get_ident(), 0)


@contextlib.contextmanager
def blocked(signums: Iterable[int] = FORK_BLOCKED) -> Iterator[None]:
    """Block signals in this thread for the duration (around fork)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def unblock_all() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
