"""A root master imports only code that no one but root could have changed.

With ``--preload`` or ``--server-class`` the master imports code itself, and it may be
root while its workers run as another user. Checking only where the app's top-level
module lies is not enough: a package whose one submodule belongs to the workers' user,
the start directory first on ``sys.path`` (a ``xmlrpc/`` planted there shadows the
standard library's), a ``__pycache__`` someone else can write. So, for as long as it is
installed, every module the master is about to run is checked where the import system
found it: its file, its cached bytecode, a namespace package's directories, and every
directory on the way to them (``paths.changeable_by_others``). A refusal is an
ImportError, which the import that asked for it reports in one line.

Trusted, besides root and the master's own user: whoever owns prefork's own code and the
interpreter, which root runs already; trusting them for the app's code gives them
nothing new. Workers and the import check (other processes, after a fork) import freely.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from .paths import changeable_by_others


class RootImportGuard(importlib.abc.MetaPathFinder):
    """Asks the other finders, then checks the place of what they found."""

    def __init__(self, also_trusted: frozenset[int]) -> None:
        self.pid = os.getpid()
        self.also_trusted = also_trusted

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if os.getpid() != self.pid:
            return None  # a worker or a check, forked: it is not the root master
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec: importlib.machinery.ModuleSpec | None = find(fullname, path, target)
            if spec is not None:
                self._check(fullname, spec)
                return spec
        return None

    def _check(self, name: str, spec: importlib.machinery.ModuleSpec) -> None:
        places = list(spec.submodule_search_locations or []) if spec.origin is None else []
        if spec.has_location and spec.origin:
            places.append(spec.origin)
            if spec.cached and os.path.exists(spec.cached):
                places.append(spec.cached)
        for place in places:
            why = changeable_by_others(place, also_trusted=self.also_trusted)
            if why:
                raise ImportError(
                    f"refusing to import {name} into the master, which runs as root: {why}",
                    name=name,
                )


def install() -> RootImportGuard:
    """Guard this process's imports from now on (idempotent)."""
    for finder in sys.meta_path:
        if isinstance(finder, RootImportGuard):
            return finder
    guard = RootImportGuard(_owners_of_what_root_runs())
    sys.meta_path.insert(0, guard)
    return guard


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, RootImportGuard)]


def _owners_of_what_root_runs() -> frozenset[int]:
    owners: set[int] = set()
    for path in (os.path.dirname(os.path.abspath(__file__)), os.path.realpath(sys.executable)):
        owners |= _owners_on_the_way(path)
    return frozenset(owners)


def _owners_on_the_way(path: str) -> set[int]:
    owners: set[int] = set()
    while True:
        with contextlib.suppress(OSError):
            owners.add(os.stat(path).st_uid)
        parent = os.path.dirname(path)
        if parent == path:
            return owners
        path = parent
