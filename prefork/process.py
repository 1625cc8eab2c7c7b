"""Process chores: titles, the pid file, and exit statuses in words."""

from __future__ import annotations

import os

import psutil
import setproctitle

from .errors import EXIT_BOOT_ERROR, EXIT_IMPORT_ERROR, ConfigError
from .paths import read_small_file, replace_file, unlink_if
from .signals import signal_name


def set_title(title: str) -> None:
    setproctitle.setproctitle(title)


def get_title() -> str:
    return str(setproctitle.getproctitle())


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
