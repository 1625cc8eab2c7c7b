"""Generations: each reload's settings, listeners and pool size, kept together.

A generation owns what its workers were started with: its ``Config``, the servers
(listening sockets) it serves and its pool size. A worker respawned in generation N gets
N's settings and sockets, whatever a reload is starting meanwhile. HUP begins a new
generation beside the serving one (``begin``); it replaces it once complete
(``finish``) or is dropped (``abandon``), and then nothing of the serving generation has
changed, since nothing of it was touched. A listening socket is closed only once no
generation that still has workers uses it (``unused``). Numbers never repeat, across
abandoned reloads and upgrades alike (``newest`` travels in the USR2 handover).

A HUP that arrives while a reload is under way is remembered (``pending``) and acted on
once that reload settles; several coalesce into one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .config import MAX_WORKERS, Config
from .lifecycle import Timeouts


@dataclass(eq=False)
class Generation:
    number: int
    config: Config
    servers: list[Any]
    size: int
    started: float = 0.0  # when its reload began (monotonic)

    @property
    def timeouts(self) -> Timeouts:
        config = self.config
        return Timeouts(config.boot_timeout, config.worker_timeout, config.graceful_timeout)

    @property
    def deadline(self) -> float | None:
        """A reload's generation must be complete by then (--boot-timeout; 0: never)."""
        timeout = self.config.boot_timeout
        return self.started + timeout if timeout else None


@dataclass
class Generations:
    serving: Generation
    starting: Generation | None = None  # the generation a reload is starting
    newest: int = 0  # the highest number given so far
    pending: bool = False  # a HUP came during a reload: reload again once it settles
    known: dict[int, Generation] = field(default_factory=dict)  # that may still have workers
    closed: dict[int, Any] = field(default_factory=dict)  # the servers closed, by id (held,
    # so that no new server can take the id of a closed one)

    def __post_init__(self) -> None:
        self.newest = max(self.newest, self.serving.number)
        self.known[self.serving.number] = self.serving

    def get(self, number: int) -> Generation | None:
        return self.known.get(number)

    def begin(self, config: Config, servers: list[Any], now: float) -> Generation:
        """The next generation, beside the serving one."""
        assert self.starting is None, "one reload at a time"
        self.newest += 1
        self.starting = Generation(self.newest, config, servers, config.workers, now)
        self.known[self.newest] = self.starting
        return self.starting

    def finish(self) -> Generation:
        """The starting generation serves; the previous one is returned, to be stopped."""
        assert self.starting is not None
        old, self.serving, self.starting = self.serving, self.starting, None
        return old

    def abandon(self) -> Generation:
        """Drop the starting generation; the serving one is exactly as it was."""
        assert self.starting is not None
        abandoned, self.starting = self.starting, None
        return abandoned

    def resize(self, delta: int) -> int:
        """TTIN/TTOU: the serving generation, and the starting one too, so that the
        change holds however the reload ends. The serving size."""
        for generation in (self.serving, self.starting):
            if generation is not None:
                generation.size = min(MAX_WORKERS, max(1, generation.size + delta))
        return self.serving.size

    def current(self) -> list[Generation]:
        return [g for g in (self.serving, self.starting) if g is not None]

    def unused(self, with_workers: Iterable[int]) -> list[Any]:
        """Servers no generation that is current or has workers uses, not yet closed;
        marked closed, and generations with neither workers nor a role forgotten."""
        alive = {g.number for g in self.current()} | set(with_workers)
        in_use = {id(s) for n in alive if (g := self.known.get(n)) for s in g.servers}
        unused: dict[int, Any] = {}
        for number, generation in list(self.known.items()):
            if number in alive:
                continue
            for server in generation.servers:
                if id(server) not in in_use and id(server) not in self.closed:
                    unused[id(server)] = server
            del self.known[number]
        self.closed.update(unused)
        return list(unused.values())

    def every_server(self) -> list[Any]:
        """Every server of a known generation not closed yet (for the final close)."""
        servers = {id(s): s for g in self.known.values() for s in g.servers}
        return [s for key, s in servers.items() if key not in self.closed]
