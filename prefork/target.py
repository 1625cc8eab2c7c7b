"""Load ``MODULE:OBJECT``, the request handler class that ``prefork run`` serves.

The master never imports the app itself: it checks the import in a throwaway child
(``Target.check``) and each worker imports it after the fork (``Target.load``). That keeps
the master's memory free of app code, so a reload can give workers freshly imported code.

The standard library is another matter: it does not change while the interpreter runs.
The check reports which standard-library modules the app's import pulled in, and the
master imports those (``import_stdlib``). Every worker then inherits them already
imported: a worker replaced after a crash, or a reload's new generation, boots in a
few milliseconds instead of re-importing http.server or email, and the modules' memory
is shared copy-on-write.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import select
import signal
import socketserver
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import AppImportError
from .identity import Identity, IdentityError
from .process import die_with_parent, set_title

log = logging.getLogger("prefork.target")

CHECK_TIMEOUT = 600.0  # seconds an import check may take when --boot-timeout is 0 (off)


@dataclass(frozen=True)
class Target:
    module: str
    object: str

    @classmethod
    def parse(cls, text: str) -> Target:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise AppImportError(f"bad app {ascii(text)}: not valid UTF-8") from None
        module, sep, obj = text.partition(":")
        if not sep or not module or not obj or "\0" in text:
            raise AppImportError(f"bad app {text!r}: expected MODULE:OBJECT, e.g. myapp:Handler")
        return cls(module, obj)

    def __str__(self) -> str:
        return f"{self.module}:{self.object}"

    def loader(self, app_dir: str) -> Callable[[], type[socketserver.BaseRequestHandler]]:
        """What a worker calls after its fork: the app's directory on its path, then load."""

        def load_in_worker() -> type[socketserver.BaseRequestHandler]:
            add_cwd_to_path(app_dir)
            return self.load()

        return load_in_worker

    def load(self) -> type[socketserver.BaseRequestHandler]:
        """Import the module and return the handler class; AppImportError says what failed."""
        obj = self.resolve()
        if not (isinstance(obj, type) and issubclass(obj, socketserver.BaseRequestHandler)):
            raise AppImportError(
                f"{self} is not a request handler class (a socketserver.BaseRequestHandler "
                f"subclass), it is {type(obj).__name__!r}"
            )
        return obj

    def resolve(self) -> Any:
        """Import the module and return the object it names, whatever it is."""
        try:
            module = importlib.import_module(self.module)
        except Exception as exc:
            log.debug("importing %s failed", self.module, exc_info=True)
            raise AppImportError(f"cannot import {self.module!r}: {_last_line(exc)}") from None
        obj: Any = module
        try:
            for part in self.object.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            raise AppImportError(f"module {self.module!r} has no object {self.object!r}") from None
        return obj

    def check(
        self,
        identity: Identity | None = None,
        app_dir: str | None = None,
        timeout: float = CHECK_TIMEOUT,
    ) -> list[str]:
        """Import the target in a throwaway child; raise AppImportError if that fails.

        A child, so a broken or half-imported app never lands in the master's memory;
        as the workers' ``identity``, so an app they cannot read fails here, and from
        ``app_dir`` (on the child's path only). Returns the standard-library modules the
        import pulled in (see ``import_stdlib``). An import still running after
        ``timeout`` seconds (stuck, or stopped by the workers' user, whose process it
        is) is killed and fails the check.
        """
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: import, report one line, vanish without cleanup
            code = 1
            try:
                set_title(f"prefork: import check [{self}]")
                os.close(read_fd)
                try:
                    die_with_parent(parent)
                    if identity is not None:
                        identity.switch()
                        die_with_parent(parent)  # forgotten at the change of user
                    add_cwd_to_path(app_dir)
                    before = set(sys.modules)
                    self.load()
                    stdlib = stdlib_modules(set(sys.modules) - before)
                    message = "\n".join(["ok", *stdlib]).encode()
                except (AppImportError, IdentityError) as exc:
                    message = str(exc).encode("utf-8", "replace")
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(message)
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        try:
            data = _read_until_closed(read_fd, time.monotonic() + timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AppImportError(
                f"cannot import {self.module!r}: the import took over {timeout:g}s (--boot-timeout)"
            ) from None
        finally:
            os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        answer = data.decode("utf-8", "replace")
        first, _, rest = answer.partition("\n")
        if first != "ok":
            if not answer:
                code = os.waitstatus_to_exitcode(status)
                answer = f"cannot import {self.module!r}: the import ended the process ({code})"
            raise AppImportError(answer)
        return rest.split()


def _read_until_closed(fd: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# Standard-library modules never imported ahead of the app: they act when imported
# (open a browser, print, touch the terminal) or exist for tools, not servers.
_NOT_AHEAD = frozenset(
    {"__main__", "antigravity", "this", "idlelib", "turtle", "turtledemo", "tkinter",
     "readline", "rlcompleter", "pydoc", "site", "test", "lib2to3", "ensurepip", "venv"}
)  # fmt: skip


def stdlib_modules(names: set[str]) -> list[str]:
    """The standard library's modules among ``names`` (submodules included)."""
    return sorted(
        name
        for name in names
        if (top := name.partition(".")[0]) in sys.stdlib_module_names and top not in _NOT_AHEAD
    )


def import_stdlib(names: list[str]) -> int:
    """Import, in the master, the standard-library modules the app's import uses (as
    reported by ``Target.check``); how many are now imported. A module that fails is
    left to the workers, as it would have been.

    The names come from a child that ran the app's code as the workers' user, and the
    master may be root: they are imported from the standard library's own directories
    only (``sys.path`` narrowed while they are), never from the app's directory or
    ``PYTHONPATH``, where a file named like a standard module could have been planted.
    """
    imported = 0
    with _stdlib_path_only():
        for name in stdlib_modules(set(names)):
            if name in sys.modules:
                imported += 1
                continue
            try:
                importlib.import_module(name)
                imported += 1
            except Exception:
                log.debug("importing %s ahead of the workers failed", name, exc_info=True)
    return imported


@contextlib.contextmanager
def _stdlib_path_only() -> Iterator[None]:
    stdlib = os.path.dirname(os.__file__)  # sysconfig's would name a venv's own lib/
    dirs = [stdlib, os.path.join(stdlib, "lib-dynload")]
    saved, saved_cache = sys.path[:], dict(sys.path_importer_cache)
    sys.path[:] = [d for d in dirs if os.path.isdir(d)]
    try:
        yield
    finally:
        sys.path[:] = saved
        sys.path_importer_cache.clear()
        sys.path_importer_cache.update(saved_cache)


def _last_line(exc: BaseException) -> str:
    """The exception as a traceback's last line: "SyntaxError: invalid syntax (app.py, line 3)"."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def add_cwd_to_path(directory: str | None = None) -> None:
    """Make MODULE importable from ``directory`` (the current one), as ``python -m`` does.

    ``prefork run`` does this in the workers and the import check, after the fork, and in
    the master only with --preload or --server-class, which import code there: the
    master, perhaps root, otherwise keeps the app's directory off its own path.
    """
    directory = directory or os.getcwd()
    if directory not in sys.path:
        sys.path.insert(0, directory)


def module_source(name: str) -> str | None:
    """Where the top-level module of dotted ``name`` would be imported from (its file, or
    its package's directory), found without running any of it."""
    try:
        spec = importlib.util.find_spec(name.partition(".")[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return next(iter(spec.submodule_search_locations), None)
    return spec.origin if spec.has_location else None
