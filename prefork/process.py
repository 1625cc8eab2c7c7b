"""Process chores: titles, the pid file, and exit statuses in words."""

from __future__ import annotations

import contextlib
import os
import tempfile

import psutil
import setproctitle

from .errors import EXIT_BOOT_ERROR, EXIT_IMPORT_ERROR, ConfigError
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
    """The master's PID in a file, written atomically and removed on exit."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._written = False

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
        directory = os.path.dirname(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".prefork-pid-", dir=directory)
        except OSError as exc:
            raise ConfigError(f"cannot write pid file {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{pid}\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)  # readers never see a half-written file
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._written = True

    def read(self) -> int:
        """The PID in the file; ConfigError (one line) when there is none."""
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read pid file {self.path}: {exc.strerror}") from None
        if not text.isdigit():
            raise ConfigError(f"pid file {self.path} does not hold a PID")
        return int(text)

    def running_master(self) -> int | None:
        """The PID in the file, if that process is alive and a prefork master; else None
        (no file, garbage, a dead PID, or a PID reused by something else: stale)."""
        try:
            pid = self.read()
            title = psutil.Process(pid).cmdline()
        except (ConfigError, psutil.Error):
            return None
        return pid if title and title[0].startswith("prefork: master") else None

    def remove(self) -> None:
        if self._written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._written = False
