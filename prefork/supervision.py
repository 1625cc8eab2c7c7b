"""Small duties of the master beside its loop: errors that must not flood the log, the
descriptors a pool needs, settings that contradict each other."""

from __future__ import annotations

import contextlib
import logging
import resource
import time

from .config import Config

log = logging.getLogger("prefork.arbiter")


class ErrorReport:
    """Unexpected errors of the loop, logged without flooding the log: the first of a
    kind with its traceback, the same again at most once a minute, with a count."""

    def __init__(self, logger: logging.Logger, every: float = 60.0) -> None:
        self._log, self._every = logger, every
        self._last: tuple[str, str] | None = None
        self._since, self._repeats = 0.0, 0

    def report(self, exc: Exception, where: str) -> None:
        kind, now = (type(exc).__name__, str(exc)), time.monotonic()
        if kind != self._last:
            self._last, self._since, self._repeats = kind, now, 0
            self._log.error("unexpected error %s; carrying on", where, exc_info=exc)
            return
        self._repeats += 1
        if now - self._since >= self._every:
            self._log.error(
                "unexpected error %s, %d more times: %s: %s", where, self._repeats, *kind
            )
            self._since, self._repeats = now, 0


def ensure_descriptors(workers: int, servers: int) -> None:
    """Raise the soft RLIMIT_NOFILE when the pool needs more descriptors than it
    allows: each worker costs the master a status pipe and a page (two descriptors
    before Python 3.13), plus one socket per --reuse-port bind, and a reload needs
    the double."""
    needed = 64 + 2 * workers * (3 + servers)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if needed > soft:
        log.warning(
            "%d workers need about %d descriptors in the master, and the limit is %d "
            "(ulimit -n): some workers or a reload may fail to start",
            workers,
            needed,
            soft,
        )


def warn_about_timeouts(config: Config, model: str) -> None:
    if model != "sync" or not config.worker_timeout or not config.client_timeout:
        return
    if config.client_timeout >= config.worker_timeout:
        log.warning(
            "--client-timeout %g is not below --timeout %g: a silent client gets a sync "
            "worker killed before it is disconnected",
            config.client_timeout,
            config.worker_timeout,
        )
    elif not config.client_max_wait or config.client_max_wait >= config.worker_timeout:
        log.warning(
            "--client-max-wait %g is not below --timeout %g: a slow client gets a sync "
            "worker killed before it is disconnected",
            config.client_max_wait,
            config.worker_timeout,
        )
