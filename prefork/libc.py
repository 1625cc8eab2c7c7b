"""The C library, for the few calls the os module lacks (prctl, setfsuid, setfsgid)."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    # The interpreter's own symbols, libc's among them: no find_library, which runs
    # ldconfig in a subprocess (20 ms of every start) and imports subprocess to do it.
    return ctypes.CDLL(None, use_errno=True)
