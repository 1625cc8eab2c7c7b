"""Process chores: titles, the pid file, and exit statuses in words."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

import setproctitle

from .errors import EXIT_BOOT_ERROR, EXIT_IMPORT_ERROR, ConfigError
from .libc import libc
from .paths import read_small_file, replace_file, unlink_if
from .signals import signal_name


def set_title(title: str) -> None:
    setproctitle.setproctitle(title)


def get_title() -> str:
    return str(setproctitle.getproctitle())


_PR_SET_PDEATHSIG, _PR_GET_CHILD_SUBREAPER = 1, 37


def die_with_parent(parent: int) -> None:
    """The kernel kills this process (SIGKILL) when its parent dies, whatever it is doing
    (importing the app, blocked in a handler, waiting for a child); and it leaves now if
    its parent is already gone (the parent died before the request could be made).
    Again after a change of user: the kernel forgets the request then."""
    if sys.platform.startswith("linux"):
        libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def reaps_orphans() -> bool:
    """Orphans are re-parented to this process: it is PID 1 (of a container, say) or a
    child subreaper."""
    if os.getpid() == 1:
        return True
    if not sys.platform.startswith("linux"):
        return False
    flag = ctypes.c_int(0)
    libc().prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
    return bool(flag.value)


def thread_count() -> int:
    """This process's threads as the kernel counts them (every thread, a C library's too:
    what CPython 3.12+ counts for its warning at a fork); Python's own where /proc is not."""
    try:
        fd = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            stat = os.read(fd, 4096)
        finally:
            os.close(fd)
        return int(stat.rpartition(b")")[2].split()[17])  # field 20, num_threads
    except (OSError, ValueError, IndexError):
        import threading

        return threading.active_count()


def open_descriptors() -> set[int]:
    """The descriptors this process has open."""
    with os.scandir("/proc/self/fd") as entries:
        listed = {int(entry.name) for entry in entries}
    return {fd for fd in listed if _is_open(fd)}  # less the one the listing used


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def close_all_but(keep: set[int]) -> None:
    """Close every descriptor of this process that is not in ``keep``."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # no /proc: every number up to the limit
        names = [str(fd) for fd in range(3, os.sysconf("SC_OPEN_MAX"))]
    for name in names:
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def describe_exit(code: int) -> str:
    """An exit code from ``os.waitstatus_to_exitcode`` in words: 'killed by SIGKILL'."""
    if code < 0:
        return f"killed by {signal_name(-code)}"
    meaning = {EXIT_BOOT_ERROR: " (boot error)", EXIT_IMPORT_ERROR: " (app import error)"}
    return f"exited with status {code}{meaning.get(code, '')}"


class Pidfile:
    """The master's PID in a file, written atomically and removed on exit.

    Through paths.py, as the master may be root and the directory writable by others: a
    symlink at the path is replaced, never written through; a FIFO there is not read; the
    file is removed only while it still holds our PID.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._written = 0  # the PID we wrote

    def check(self, pid: int) -> None:
        """Refuse if the file names another live prefork master (a stale one is fine)."""
        other = self.running_master()
        if other is not None and other != pid:
            raise ConfigError(
                f"pid file {self.path} belongs to a running prefork master "
                f"(pid {other}); stop it first or choose another --pid"
            )

    def write(self, pid: int) -> None:
        """Write ``pid`` atomically, after checking no other master owns the file."""
        self.check(pid)
        try:
            # readers never see half a file
            replace_file(self.path, f"{pid}\n".encode(), what="pid file")
        except OSError as exc:
            raise ConfigError(f"cannot write pid file {self.path}: {exc.strerror}") from None
        self._written = pid

    def read(self) -> int:
        """The PID in the file; ConfigError (one line) when there is none."""
        data = read_small_file(self.path, "pid file", follow=False)
        text = data.decode("ascii", "replace").strip()
        if not (text.isascii() and text.isdigit() and len(text) < 20):
            raise ConfigError(f"pid file {self.path} does not hold a PID")
        return int(text)

    def running_master(self) -> int | None:
        """The PID in the file, if that process is alive and a prefork master; else None
        (no file, garbage, a dead PID, or a PID reused by something else: stale)."""
        import psutil  # here: a start without --pid does not pay for its import

        try:
            pid = self.read()
            process = psutil.Process(pid)
            title, owner = process.cmdline(), process.uids().real
        except (ConfigError, psutil.Error, ValueError):
            return None
        # Of our own user too: anyone can call a process "prefork: master" (exec -a).
        is_master = bool(title) and title[0].startswith("prefork: master")
        return pid if is_master and owner == os.getuid() else None

    def remove(self) -> None:
        if self._written:
            unlink_if(self.path, content=f"{self._written}\n".encode())
            self._written = 0


def parent_pid(pid: int) -> int | None:
    """Process ``pid``'s parent (/proc/PID/stat's fourth field, after the name in
    parentheses, which may itself hold spaces and parentheses); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields = stat_file.read().rsplit(b")", 1)[1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return None
