"""Heartbeat: a worker's latest sign of life, and its current request, in shared memory.

An anonymous MAP_SHARED page created by the master before the fork. The worker writes
it with no syscall (the clock is read through the vDSO): a beat once per loop turn, and
at each request its start time and client, then its end. The master reads it to find
stuck workers and to say what they were stuck on. No file, so no slow disk can fake a
timeout.

Layout: beat (double), request start (double; 0 = idle), requests served (uint64),
client length (uint16), client address (UTF-8, at most CLIENT_MAX bytes), and one byte
the master writes: 1 = on TERM, drain the kernel's queue before leaving.
"""

from __future__ import annotations

import mmap
import struct
import time

_BEAT = struct.Struct("d")
_REQUEST = struct.Struct("dQH")  # at offset 8
_REQUEST_OFFSET = 8
_CLIENT_OFFSET = _REQUEST_OFFSET + _REQUEST.size
CLIENT_MAX = 200
_DRAIN_OFFSET = _CLIENT_OFFSET + CLIENT_MAX  # one byte the master sets before a final stop


def describe_client(client_address: object) -> str:
    """'127.0.0.1:5555', '[::1]:5555', or what a Unix socket gives (often empty)."""
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        host, port = client_address[0], client_address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(client_address, bytes):
        client_address = client_address.decode("utf-8", "replace")
    return str(client_address) or "a Unix socket peer"


class Heartbeat:
    def __init__(self) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE)
        self.beat()

    # -- the worker's side -----------------------------------------------------------------
    def beat(self) -> None:
        _BEAT.pack_into(self._map, 0, time.monotonic())

    def request_started(self, client_address: object, served: int) -> None:
        client = describe_client(client_address).encode("utf-8", "replace")[:CLIENT_MAX]
        self._map[_CLIENT_OFFSET : _CLIENT_OFFSET + len(client)] = client
        _REQUEST.pack_into(self._map, _REQUEST_OFFSET, time.monotonic(), served, len(client))

    def request_finished(self, served: int) -> None:
        _REQUEST.pack_into(self._map, _REQUEST_OFFSET, 0.0, served, 0)

    # -- the master's side ----------------------------------------------------------------
    def last(self) -> float:
        return float(_BEAT.unpack_from(self._map, 0)[0])

    def current_request(self) -> tuple[float, str] | None:
        """(seconds it has run, client) of the request in progress, or None when idle."""
        started, _, length = _REQUEST.unpack_from(self._map, _REQUEST_OFFSET)
        if not started:
            return None
        client = self._map[_CLIENT_OFFSET : _CLIENT_OFFSET + length].decode("utf-8", "replace")
        return time.monotonic() - started, client

    def request_drain(self) -> None:
        """Master: the next TERM is the final stop, so serve what is queued first."""
        self._map[_DRAIN_OFFSET] = 1

    def drain_requested(self) -> bool:
        return self._map[_DRAIN_OFFSET] == 1

    def requests_served(self) -> int:
        return int(_REQUEST.unpack_from(self._map, _REQUEST_OFFSET)[1])

    def close(self) -> None:
        self._map.close()
