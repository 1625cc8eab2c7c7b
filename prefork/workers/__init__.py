"""Worker models. The server's bases choose one, as they choose serve_forever's behaviour."""

from __future__ import annotations

import socketserver
from typing import Any

from .base import Worker, WorkerPlan, WorkerSpec
from .fork import ForkWorker
from .sync import SyncWorker
from .thread import ThreadWorker

# The stdlib mix-in each worker model pairs with (None: plain synchronous server).
SERVER_MIXINS: dict[str, type | None] = {
    "sync": None,
    "thread": socketserver.ThreadingMixIn,
    "fork": socketserver.ForkingMixIn,
}


WORKER_CLASSES: dict[str, type[Worker]] = {
    "sync": SyncWorker,
    "thread": ThreadWorker,
    "fork": ForkWorker,
}


def worker_model(server: Any) -> str:
    """'thread', 'fork' or 'sync', from the server's bases, as serve_forever would behave."""
    if isinstance(server, socketserver.ThreadingMixIn):
        return "thread"
    if isinstance(server, socketserver.ForkingMixIn):
        return "fork"
    return "sync"


def make_worker(spec: WorkerSpec) -> Worker:
    model = worker_model(spec.plan.servers[0])
    if model == "thread":
        return ThreadWorker(spec, spec.plan.threads)
    return WORKER_CLASSES[model](spec)


__all__ = [
    "SERVER_MIXINS",
    "ForkWorker",
    "SyncWorker",
    "ThreadWorker",
    "Worker",
    "WorkerPlan",
    "WorkerSpec",
    "WORKER_CLASSES",
    "make_worker",
    "worker_model",
]
