"""systemd integration: socket activation (``LISTEN_FDS``) and ``sd_notify``.

Both protocols are a few lines, so prefork speaks them itself instead of depending on
libsystemd: descriptors start at 3, and notifications are newline-separated
``KEY=VALUE`` lines in one datagram to the Unix socket named by ``NOTIFY_SOCKET``
(``@name`` is the abstract namespace).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("prefork.systemd")

LISTEN_FDS_START = 3
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def take_listen_fds(environ: MutableMapping[str, str] | None = None) -> list[tuple[int, str]]:
    """The descriptors systemd passed to this process, if any, each with its name
    (LISTEN_FDNAMES; '' when none). The variables are removed so that workers and the
    app's own child processes do not inherit them."""
    env = os.environ if environ is None else environ
    pid, count = env.pop("LISTEN_PID", None), env.pop("LISTEN_FDS", None)
    names = env.pop("LISTEN_FDNAMES", "")
    if pid is None or count is None or not pid.isdigit() or int(pid) != os.getpid():
        return []
    if not count.isdigit():
        return []
    listed = [*names.split(":"), *[""] * int(count)][: int(count)] if names else [""] * int(count)
    return list(zip(range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)), listed, strict=True))


class Notifier:
    """sd_notify to ``NOTIFY_SOCKET``; every method does nothing when it is not set."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval: float | None = None
        usec, watchdog_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and watchdog_pid in ("", str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2  # ping twice per period
        self._environment = {name: env[name] for name in NOTIFY_VARIABLES if name in env}
        self._sock: socket.socket | None = None

    def take_environment(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Remove the variables from this process's environment: workers and what their
        handlers start must not see them (with NotifyAccess=all, app code could confuse
        systemd). ``environment()`` keeps them for an upgrade."""
        env = os.environ if environ is None else environ
        for name in NOTIFY_VARIABLES:
            env.pop(name, None)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never wait: a listener that does not read (its queue full) must not
                # stop the master's loop. The message is dropped instead.
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:  # systemd gone or socket full: serving matters more
            log.debug("sd_notify to %r failed: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self, status: str) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def reload_failed(self, status: str, cause: str) -> None:
        """A reload that did not complete: its cause in STATUS=, and no READY=1, which
        would tell systemd the reload succeeded. Under Type=notify-reload systemd then
        reports the reload as failed once its TimeoutStartSec= has passed; the service
        runs on either way (docs/deploy.md)."""
        self.send(f"STATUS={status} (reload failed: {cause})")

    def environment(self) -> dict[str, str]:
        """The variables this notifier came from, for the image that replaces this one."""
        return dict(self._environment)

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
