"""Heartbeat: a worker's latest sign of life in shared memory.

One monotonic timestamp in an anonymous MAP_SHARED mapping created by the master before
the fork. The worker writes it once per loop turn (no syscall: the clock is read through
the vDSO); the master reads it to find stuck workers. No file, so no slow disk can fake
a timeout.
"""

from __future__ import annotations

import mmap
import struct
import time

_STAMP = struct.Struct("d")


class Heartbeat:
    def __init__(self) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE)
        self.beat()

    def beat(self) -> None:
        _STAMP.pack_into(self._map, 0, time.monotonic())

    def last(self) -> float:
        return float(_STAMP.unpack_from(self._map, 0)[0])

    def close(self) -> None:
        self._map.close()
