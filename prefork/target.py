"""Load ``MODULE:OBJECT``, the request handler class that ``prefork run`` serves (a
WSGI app is served by a handler class made for it: prefork/wsgi/).

The master never imports the app itself: it checks the import in a throwaway child
(``Target.check``) and each worker imports it after the fork (``Target.load``). That keeps
the master's memory free of app code, so a reload can give workers freshly imported code.

The standard library is another matter: it does not change while the interpreter runs.
The check reports which standard-library modules the app's import pulled in, and the
master imports those (``import_stdlib``). Every worker then inherits them already
imported: a worker replaced after a crash, or a reload's new generation, boots in a
few milliseconds instead of re-importing http.server or email, and the modules' memory
is shared copy-on-write. At a start the child names each standard module as its import
begins, and the master imports it on the other core, once it has imported its own
server modules (cli.py does those meanwhile): the check and the master's imports
overlap instead of adding up (35 + 25 ms on the HTTP example).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import re
import select
import signal
import socketserver
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from . import collector
from .errors import AppImportError
from .identity import Identity, IdentityError
from .process import die_with_parent, set_title

log = logging.getLogger("prefork.target")

CHECK_TIMEOUT = 600.0  # seconds an import check may take when --boot-timeout is 0 (off)
CHECK_SAYS_AT_MOST = 1 << 20  # bytes the check child may write: it runs the app's code
_END_OF_NAMES = b"\0"  # the child's names as they come, then this, then its answer
# Among the check's names: MODULE:OBJECT is a server class (the master builds it). A
# name no module has, so that it crosses a USR2 (the old image hands the new one the
# check's names as they are) whatever version either image is.
SERVER_CLASS_MARK = ":server-class"
WSGI_APP_MARK = ":wsgi-app"  # and this one: MODULE:OBJECT is a WSGI app
MARKS = frozenset({SERVER_CLASS_MARK, WSGI_APP_MARK})


def marks_of(served: type) -> list[str]:
    """What the check reports of what MODULE:OBJECT names, beside its modules."""
    if is_server_class(served):
        return [SERVER_CLASS_MARK]
    return [WSGI_APP_MARK] if getattr(served, "logs_requests", False) else []


def is_server_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, socketserver.BaseServer)


def is_handler_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, socketserver.BaseRequestHandler)


class Target(NamedTuple):
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

    def loader(self, import_path: list[str]) -> Callable[[], type[socketserver.BaseRequestHandler]]:
        """What a worker calls after its fork: the app's directories on its path, then load."""

        def load_in_worker() -> type[socketserver.BaseRequestHandler]:
            add_to_path(import_path)
            return self.load()

        return load_in_worker

    def load(self) -> type[socketserver.BaseRequestHandler]:
        """Import the module and return the handler class; AppImportError says what failed."""
        obj = self.load_any()
        if is_server_class(obj):
            raise AppImportError(f"{self} is a server class, not a request handler class")
        return obj

    def load_any(self) -> type:
        """Import the module and return what it names: a request handler class, a
        server class (a socketserver.BaseServer subclass), which the master builds, or
        for a WSGI app (a callable that is not a class) the handler class serving it."""
        obj = self.resolve()
        if isinstance(obj, type) and (is_server_class(obj) or is_handler_class(obj)):
            return obj
        if callable(obj) and not isinstance(obj, type):
            from .wsgi import handler_for  # only WSGI apps pay for the HTTP parser

            return handler_for(obj)
        raise AppImportError(
            f"{self} is neither a request handler class (a socketserver."
            f"BaseRequestHandler subclass), a server class (a socketserver.BaseServer "
            f"subclass) nor a WSGI app (a callable), it is {type(obj).__name__!r}"
        )

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
        import_path: list[str] | None = None,
        timeout: float = CHECK_TIMEOUT,
        on_stdlib: Callable[[list[str]], int] | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[str]:
        """Import the target in a throwaway child; raise AppImportError if that fails.

        A child, so a broken or half-imported app never lands in the master's memory;
        as the workers' ``identity``, so an app they cannot read fails here, and from
        ``import_path`` (the current directory by default; on the child's path only).
        Returns the standard-library modules the import pulled in (``import_stdlib``),
        and SERVER_CLASS_MARK (WSGI_APP_MARK) last when the target is a server class (a
        WSGI app). ``on_stdlib`` is
        called meanwhile with the standard modules whose import the child has begun, as
        they come: untrusted names (the app's code may write anything), for
        ``import_stdlib`` to filter. An import still running after ``timeout`` seconds
        (stuck, or stopped by the workers' user, whose process it is) is killed and fails
        the check. ``meanwhile`` runs in the master once the child is on its way (its
        names wait in the pipe).
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
                    add_to_path(import_path or [os.getcwd()])
                    before = set(sys.modules)
                    if on_stdlib is not None:
                        sys.addaudithook(_name_stdlib_imports(write_fd))
                    served = self.load_any()
                    stdlib = stdlib_modules(set(sys.modules) - before)
                    message = "\n".join(["ok", *stdlib, *marks_of(served)]).encode()
                except (AppImportError, IdentityError) as exc:
                    message = str(exc).encode("utf-8", "replace")
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(_END_OF_NAMES + message)
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        deadline = time.monotonic() + timeout
        in_meanwhile = meanwhile is not None
        try:
            if meanwhile is not None:
                meanwhile()
                in_meanwhile = False
            data = _read_until_closed(read_fd, deadline, on_stdlib)
        except BaseException as exc:  # no child left behind, whatever the cause
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            if in_meanwhile:
                raise  # the master's own failure, not the check's
            if isinstance(exc, TimeoutError):
                why = f"the import took over {timeout:g}s (--boot-timeout)"
            elif isinstance(exc, OverflowError):
                why = f"the import check wrote over {CHECK_SAYS_AT_MOST} bytes to the master"
            else:
                raise  # on_stdlib's, or a signal's
            raise AppImportError(f"cannot import {self.module!r}: {why}") from None
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


def _name_stdlib_imports(fd: int) -> Callable[[str, tuple[Any, ...]], None]:
    """An audit hook for the check child: name each standard module as its import
    begins (the master imports it meanwhile), before its code runs; once each, so that
    an app that retries an import in a loop does not fill the pipe."""
    named: set[str] = set()

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "import":
            return
        try:  # nothing of ours may fail the app's import
            name = args[0]
            if name not in named and _is_stdlib(name):
                named.add(name)
                os.write(fd, name.encode() + b"\n")
        except Exception:  # noqa: S110 - a name not sent is imported by the workers
            pass

    return hook


def _read_until_closed(
    fd: int, deadline: float, on_stdlib: Callable[[list[str]], int] | None
) -> bytes:
    """What the check child wrote after its names, passing those to ``on_stdlib`` as
    they come; TimeoutError past ``deadline``, OverflowError past CHECK_SAYS_AT_MOST."""
    data = bytearray()
    names_end, told = -1, 0  # where the names end (the NUL), how far they were passed on
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(data[names_end + 1 :]) if names_end >= 0 else b""
        scanned = len(data)
        data += chunk
        if len(data) > CHECK_SAYS_AT_MOST:
            raise OverflowError
        if names_end < 0:  # look in the new bytes only
            names_end = data.find(_END_OF_NAMES, scanned)
            upto = names_end if names_end >= 0 else data.rfind(b"\n", scanned) + 1
            if on_stdlib is not None and upto > told:
                on_stdlib(data[told:upto].decode("ascii", "replace").split())
            told = max(told, upto)


# Standard-library modules never imported ahead of the app: they act when imported
# (open a browser, print, touch the terminal) or exist for tools, not servers.
_NOT_AHEAD = frozenset(
    {"__main__", "antigravity", "this", "idlelib", "turtle", "turtledemo", "tkinter",
     "readline", "rlcompleter", "pydoc", "site", "test", "lib2to3", "ensurepip", "venv"}
)  # fmt: skip


def stdlib_modules(names: set[str]) -> list[str]:
    """The standard library's modules among ``names`` (submodules included)."""
    return sorted(name for name in names if _is_stdlib(name))


# Submodules never imported ahead either: a package's __main__ runs its command line
# (unittest.__main__ runs tests, and exits), test packages are for tools, and
# "logging.__init__" would be a second copy of the package (its own root logger).
_NOT_AHEAD_PARTS = frozenset({"__main__", "__init__", "test", "tests", "idle_test"})
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _is_stdlib(name: str) -> bool:
    if not _DOTTED_NAME.fullmatch(name):  # names come from the app's process
        return False
    top, *rest = name.split(".")
    return (
        top in sys.stdlib_module_names
        and top not in _NOT_AHEAD
        and _NOT_AHEAD_PARTS.isdisjoint(rest)
    )


def import_stdlib(names: list[str]) -> int:
    """Import, in the master, the standard-library modules the app's import uses (as
    reported by ``Target.check``); how many are now imported. A module that fails is
    left to the workers, as it would have been.

    The names come from a child that ran the app's code as the workers' user, and the
    master may be root: they are imported from the standard library's own directories
    only (``sys.path`` narrowed while they are), never from the app's directory or
    ``PYTHONPATH``, where a file named like a standard module could have been planted.
    Collection paused and the modules frozen, as for prefork's own (collector.py): they
    stay for the master's life, and the workers inherit them.
    """
    imported = 0
    with collector.paused(freeze=True), _stdlib_path_only():
        for name in stdlib_modules(set(names)):
            if name in sys.modules:
                imported += 1
                continue
            try:
                importlib.import_module(name)
                imported += 1
            except (Exception, SystemExit):  # a module that exits when imported, too
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


def app_import_path(pythonpath: tuple[str, ...], started_in: str) -> list[str]:
    """Where MODULE is imported from: the --pythonpath directories (each may hold several,
    comma-separated), then the directory ``prefork run`` started in (as ``python -m``
    would); relative ones from there. Never --chdir's: a served tree is not code."""
    given = [part.strip() for value in pythonpath for part in value.split(",")]
    dirs = [os.path.normpath(os.path.join(started_in, d)) for d in given if d]
    return list(dict.fromkeys([*dirs, started_in]))


def absolute_path_entries(started_in: str) -> None:
    """Relative ``sys.path`` entries ("" for ``python -c``, a relative PYTHONPATH) are
    found from the working directory, which --chdir is about to make the served one:
    they mean the start directory, and are made to say so."""
    sys.path[:] = [p if os.path.isabs(p) else os.path.join(started_in, p) for p in sys.path]
    sys.path_importer_cache.clear()


def add_to_path(dirs: list[str]) -> list[str]:
    """Put ``dirs`` first on the path, in their order; those that were not on it already.

    ``prefork run`` does this in the workers and the import check, after the fork, and in
    the master only with --preload or --server-class, which import code there: the
    master, perhaps root, otherwise keeps the app's directories off its own path.
    """
    added = [d for d in dirs if d not in sys.path]
    sys.path[:0] = added
    return added


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
