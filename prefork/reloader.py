"""--reload (development): reload the pool when a module of the app changes.

The master never imports the app, so the worker of slot 1 watches: it lists the source
files of the modules it imported (the app's own, not the standard library's, the
installed packages' or prefork's), and when one changes it asks the master for a
reload over its status pipe. The master then reloads exactly as on HUP: a new
generation boots beside the old one, which keeps serving until the new one is ready,
and a change that does not import leaves the old code serving (fix it and save again).

Watching uses watchfiles (``pip install prefork[reload]``) when it is installed: the
kernel's inotify through a maintained library (the one uvicorn uses), which also
batches the burst of events an editor's save makes. Without it, the files' mtimes are
polled every second. Either way a change is acted on once it has been quiet for
``DEBOUNCE`` seconds, so a save of several files makes one reload.

A worker that forks a child per connection (``-k fork``, ForkingMixIn) runs no watcher
thread: a fork copies only the forking thread, and a lock the watcher (or watchfiles'
own threads) held at that instant, a stream's buffer lock as it logs say, would stay
held in the child (CPython re-makes only a few, the logging module's among them); and
CPython 3.12+ warns of every such fork. That worker polls instead, from its own loop's
turns (``LoopWatch``): the same mtimes, the same debounce.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger("prefork.worker")

DEBOUNCE = 0.3  # seconds without a further change before reloading
POLL_INTERVAL = 1.0

OnChange = Callable[[set[str]], None]


def module_files(modules: Iterable[object] | None = None) -> set[str]:
    """Source files of the imported modules that belong to the app."""
    skip = {
        os.path.realpath(p)
        for name in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_paths().get(name))
    }
    skip.add(os.path.dirname(os.path.realpath(__file__)))  # prefork: not reloaded by HUP
    files = set()
    for module in list(sys.modules.values()) if modules is None else modules:
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        real = os.path.realpath(path)
        if os.path.isfile(real) and not any(real.startswith(d + os.sep) for d in skip):
            files.add(real)
    return files


class Poller:
    """The fallback: compare the files' modification times once per interval."""

    def __init__(self, files: Iterable[str]) -> None:
        self.files = sorted(files)
        self._seen = self._stamp()

    def changed(self) -> set[str]:
        now = self._stamp()
        changed = {f for f in self.files if now[f] != self._seen[f]}
        self._seen = now
        return changed

    def _stamp(self) -> dict[str, tuple[int, int] | None]:
        stamps: dict[str, tuple[int, int] | None] = {}
        for path in self.files:
            try:
                info = os.stat(path)
                stamps[path] = (info.st_mtime_ns, info.st_size)
            except OSError:  # deleted, or being replaced by the editor
                stamps[path] = None
        return stamps


def start_watching(files: set[str], on_change: OnChange) -> threading.Event:
    """Watch ``files`` in a daemon thread; ``on_change`` gets each settled batch. Set the
    returned event to stop."""
    stop = threading.Event()
    try:
        import watchfiles  # noqa: F401 - optional
    except ImportError:
        target, how = _poll, "polling every second (pip install prefork[reload] for inotify)"
    else:
        target, how = _watchfiles, "with watchfiles"
    log.info("--reload: watching %d module files %s", len(files), how)
    poller = Poller(files)  # taken now, at boot: a save from here on is a change
    threading.Thread(
        target=target, args=(poller, on_change, stop), name="prefork-reload", daemon=True
    ).start()
    return stop


class LoopWatch:
    """The polling fallback, driven by the worker loop instead of a thread: call it once
    per turn; it looks at the files once per ``POLL_INTERVAL`` (a clock read otherwise)
    and then, after a change, every ``DEBOUNCE`` until they are quiet, as ``_poll`` does.
    ``on_change`` runs in the caller's thread, between two turns."""

    def __init__(
        self, files: set[str], on_change: OnChange, clock: Callable[[], float] = time.monotonic
    ) -> None:
        log.info(
            "--reload: watching %d module files, polling every second from the loop "
            "(a worker that forks per connection runs no watcher thread)",
            len(files),
        )
        self._poller = Poller(files)  # taken now, at boot: a save from here on is a change
        self._on_change, self._clock = on_change, clock
        self._pending: set[str] = set()  # changed, and not yet quiet for DEBOUNCE
        self._next = clock() + POLL_INTERVAL

    def __call__(self) -> None:
        now = self._clock()
        if now < self._next:
            return
        changed = self._poller.changed()
        if changed:  # look again soon: the editor may not have finished writing
            self._pending |= changed
            self._next = now + DEBOUNCE
            return
        self._next = now + POLL_INTERVAL
        if self._pending:
            settled, self._pending = self._pending, set()
            self._on_change(settled)


def _watchfiles(poller: Poller, on_change: OnChange, stop: threading.Event) -> None:
    import watchfiles

    # The watch starts in this thread, a moment after the worker's boot: a file saved in
    # between is caught by comparing with the snapshot taken at boot, at the first yield
    # (which proves the watch is in place).
    snapshot: Poller | None = poller
    files = set(poller.files)
    directories = sorted({os.path.dirname(f) for f in files})
    for changes in watchfiles.watch(
        *directories,
        watch_filter=lambda _change, path: os.path.realpath(path) in files,
        debounce=int(DEBOUNCE * 1000 * 4),
        step=int(DEBOUNCE * 1000),
        stop_event=stop,
        recursive=False,
        raise_interrupt=False,
        yield_on_timeout=snapshot is not None,
        rust_timeout=1000,  # the first yield, empty, comes within a second
    ):
        changed = {os.path.realpath(path) for _, path in changes}
        if snapshot is not None:
            changed |= snapshot.changed()
            snapshot = None  # from now on the watch sees everything
        if changed:
            on_change(changed)


def _poll(poller: Poller, on_change: OnChange, stop: threading.Event) -> None:
    while not stop.wait(POLL_INTERVAL):
        changed = poller.changed()
        if not changed:
            continue
        while not stop.wait(DEBOUNCE):  # until the editor has finished writing
            more = poller.changed()
            if not more:
                break
            changed |= more
        on_change(changed)
