"""``prefork status``: the master and every worker, from the status pages and psutil.

The counters (state, requests, the current request) are what the workers wrote in their
pages; the process facts (RSS, CPU %, age) come from psutil. CPU % needs two samples:
a one-shot status measures over a short window, ``--watch`` over each refresh interval.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import psutil

from .escape import printable
from .heartbeat import WorkerPage
from .statuspage import Board, StatusError, read_boards

CPU_WINDOW = 0.25  # seconds a one-shot status samples CPU time over


def fairness(counts: Sequence[int]) -> dict[str, Any]:
    """How evenly requests spread: max/min, and Jain's index (1.0 = even, 1/n = one worker
    took everything). None where it is undefined (no workers, no requests, a worker at 0)."""
    total = sum(counts)
    squares = sum(c * c for c in counts)
    return {
        "workers": len(counts),
        "requests": total,
        "max_min": round(max(counts) / min(counts), 3) if counts and min(counts) else None,
        "jain": round(total * total / (len(counts) * squares), 4) if squares else None,
    }


class StatusReader:
    """Reads one master's status; keeps psutil handles so CPU % spans successive reads."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._processes: dict[int, psutil.Process] = {}

    def prime(self) -> None:
        """Start the CPU clock of every process involved (the first sample reads 0)."""
        for board in read_boards(self.pid):
            for pid in [board.master["pid"]] + [w.pid for w in board.workers]:
                self._facts(pid)

    def read(self) -> list[dict[str, Any]]:
        return [self._board_status(board) for board in read_boards(self.pid)]

    def _board_status(self, board: Board) -> dict[str, Any]:
        master = dict(board.master)
        del master["board"]  # only pairs pages with their master
        master.pop("pages", None)  # shown as the workers' rows
        master.update(self._facts(master["pid"], uptime=True))
        workers = [self._worker_status(page) for page in board.workers]
        exited = master.pop("served_by_exited", 0)
        master["requests"] = exited + sum(w.requests for w in board.workers)
        serving = [
            w["requests"]
            for w in workers
            if w["generation"] == master["generation"] and w["state"] in ("idle", "busy")
        ]
        live = {master["pid"]} | {w["pid"] for w in workers}
        for pid in set(self._processes) - live:  # forget exited workers
            del self._processes[pid]
        return {"master": master, "workers": workers, "fairness": fairness(serving)}

    def _worker_status(self, page: WorkerPage) -> dict[str, Any]:
        status: dict[str, Any] = {
            "slot": page.slot,
            "pid": page.pid,
            "generation": page.generation,
            "state": page.state,
            "requests": page.requests,
            "active": page.active,
            "client": page.client,
            "request_age": _round(page.request_age),
            "heartbeat_age": _round(page.heartbeat_age),
        }
        status.update(self._facts(page.pid))
        return status

    def _facts(self, pid: int, uptime: bool = False) -> dict[str, Any]:
        try:
            process = self._processes.get(pid) or psutil.Process(pid)
            self._processes[pid] = process
            with process.oneshot():
                facts = {
                    "rss": process.memory_info().rss,
                    "cpu_percent": process.cpu_percent(None),
                    "uptime" if uptime else "age": _round(time.time() - process.create_time()),
                }
        except psutil.Error:  # exited between reading its page and now
            self._processes.pop(pid, None)
            return {"rss": None, "cpu_percent": None, "uptime" if uptime else "age": None}
        return facts


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


# -- text rendering ------------------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def size(rss: int | None) -> str:
    if rss is None:
        return "-"
    return f"{rss / 2**20:.1f}M"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


_COLUMNS = (
    "slot", "pid", "gen", "state", "requests", "active", "current request", "rss", "cpu%",
    "age", "heartbeat",
)  # fmt: skip


def render(status: dict[str, Any]) -> str:
    """The table. Every text comes from the status pages, which whoever runs that process
    can write: it is escaped (``printable``) before it reaches the terminal."""
    master, spread = status["master"], status["fairness"]
    reloading = f" -> {master['reloading']}" if master.get("reloading") else ""
    name, state, kind, version = (
        printable(str(master[key])) for key in ("name", "state", "worker_class", "version")
    )
    lines = [
        f"master {master['pid']} [{name}]  {state}  "
        f"up {duration(master['uptime'])}  generation {master['generation']}{reloading}  "
        f"{master['workers']} {kind} workers  prefork {version}",
        f"  binds: {printable(', '.join(master['binds']))}",
        f"  rss {size(master['rss'])}  cpu {_cpu(master['cpu_percent'])}%  "
        f"requests {master['requests']} since start",
        "  spread over {} serving workers: {} requests, max/min {}, Jain {}".format(
            spread["workers"],
            spread["requests"],
            "-" if spread["max_min"] is None else f"{spread['max_min']:.2f}",
            "-" if spread["jain"] is None else f"{spread['jain']:.3f}",
        ),
        "",
    ]
    rows = [list(_COLUMNS)]
    for w in status["workers"]:
        current = "-"
        if w["client"] is not None:
            current = f"{w['client']} {duration(w['request_age'])}"
        rows.append(
            [
                str(w["slot"]),
                str(w["pid"]),
                str(w["generation"]),
                w["state"],
                str(w["requests"]),
                str(w["active"]),
                current,
                size(w["rss"]),
                _cpu(w["cpu_percent"]),
                duration(w["age"]),
                "-" if w["heartbeat_age"] is None else f"{duration(w['heartbeat_age'])} ago",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    text_columns = {3, 6}  # left-aligned: state, current request
    for row in rows:
        cells = [
            cell.ljust(width) if i in text_columns else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def render_all(statuses: list[dict[str, Any]], as_json: bool, indent: int | None = 2) -> str:
    """Text, or JSON: one object for one master (the usual case), a list for several."""
    if as_json:
        return json.dumps(statuses[0] if len(statuses) == 1 else statuses, indent=indent)
    return "\n\n".join(render(s) for s in statuses)


def show(pid: int, as_json: bool, watch: bool, interval: float, count: int) -> None:
    """Print the status once, or every ``interval`` seconds (``count`` times; 0 = until ^C)."""
    reader = StatusReader(pid)
    reader.prime()
    if not watch:
        time.sleep(CPU_WINDOW)  # a measurement window for CPU %, not a wait for anything
        print(render_all(reader.read(), as_json))
        return
    shown = 0
    while True:
        time.sleep(interval)
        if as_json:  # one object per line, for tools
            print(render_all(reader.read(), as_json, indent=None), flush=True)
        elif sys.stdout.isatty():  # redraw in place
            print(f"\x1b[H\x1b[J{render_all(reader.read(), False)}", flush=True)
        else:
            print(render_all(reader.read(), False) + "\n", flush=True)
        shown += 1
        if count and shown >= count:
            return


__all__ = ["StatusError", "StatusReader", "fairness", "render", "show"]
