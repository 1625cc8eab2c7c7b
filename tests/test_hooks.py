"""The hooks gunicorn users reach for, in real processes: post_worker_init (after the
app's import, in the worker), worker_abort (a stuck worker, before its kill), child_exit
(every exit, with its status) and nworkers_changed (TTIN/TTOU)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from conftest import SERVER_FIRST, wait_until

HOOKS = """
import os

def note(*words):
    with open("hooks.log", "a") as log:
        log.write(" ".join(str(w) for w in words) + "\\n")

class Hooks:
    def post_fork(self, worker):
        note("post_fork", worker.nr, os.getpid())

    def post_worker_init(self, worker):
        import sys
        note("post_worker_init", worker.nr, os.getpid(), "hookapp" in sys.modules)

    def worker_abort(self, worker):
        note("worker_abort", worker.nr, os.getpid())

    def child_exit(self, worker, exit_code):
        note("child_exit", worker.nr, worker.pid, exit_code, os.getpid())

    def nworkers_changed(self, new, old):
        note("nworkers_changed", new, old, os.getpid())
"""

APP = """
import socketserver, time
from hooks import note

note("imported")

class Stuck(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        time.sleep(60)  # in Python: a signal's handler runs when the sleep is interrupted
"""


def lines(app_dir: Path) -> list[list[str]]:
    path = app_dir / "hooks.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_post_worker_init_child_exit_and_nworkers_changed(serve, listener, app_dir: Path):
    (app_dir / "hooks.py").write_text(HOOKS)
    (app_dir / "hookapp.py").write_text(APP)
    server = serve("hookapp:Stuck", "-w", "2", "--server-class", "hooks:Hooks", listen_on=listener)
    workers = server.wait_ready(2)
    inits = [line for line in lines(app_dir) if line[0] == "post_worker_init"]
    # In each worker, after the app's import (which post_fork precedes)
    assert sorted(int(line[2]) for line in inits) == sorted(workers)
    assert {line[3] for line in inits} == {"True"}
    server.signal(signal.SIGTTIN)
    server.wait_ready(3)
    wait_until(lambda: ["nworkers_changed", "3", "2", str(server.pid)] in lines(app_dir))
    os.kill(workers[0], signal.SIGKILL)
    wait_until(
        lambda: any(
            line[:1] == ["child_exit"] and line[2:] == [str(workers[0]), "-9", str(server.pid)]
            for line in lines(app_dir)
        ),
        message=lambda: str(lines(app_dir)),
    )


def test_worker_abort_runs_in_a_stuck_worker_before_its_kill(serve, listener, app_dir: Path):
    (app_dir / "hooks.py").write_text(HOOKS)
    (app_dir / "hookapp.py").write_text(APP)
    server = serve(
        "hookapp:Stuck", "-w", "1", "--server-class", "hooks:Hooks", "--timeout", "1",
        *SERVER_FIRST, listen_on=listener,
    )  # fmt: skip
    [worker] = server.wait_ready(1)
    with socket.create_connection(listener.getsockname(), timeout=10) as conn:
        conn.sendall(b"hold\n")
        wait_until(
            lambda: ["worker_abort", "1", str(worker)] in lines(app_dir),
            timeout=10,
            message=lambda: server.log,
        )
        wait_until(
            lambda: any(
                line[:1] == ["child_exit"] and line[2] == str(worker) and line[3] == "-9"
                for line in lines(app_dir)
            ),  # fmt: skip
            timeout=10,
        )
