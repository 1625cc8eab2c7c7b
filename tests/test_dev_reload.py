"""--reload: an edited module is served after the reload it triggers; a broken edit
leaves the old code serving. With watchfiles, and with the polling fallback."""

from __future__ import annotations

import types
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, echo_line, wait_until

from prefork import reloader

LIVE_APP = """
import socketserver
VERSION = {version!r}
class Version(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(VERSION.encode() + b"\\n")
"""


def edit(path: Path, text: str) -> None:
    """Write as an editor does: a new file renamed over the old one."""
    tmp = path.with_suffix(".swp")
    tmp.write_text(text)
    tmp.replace(path)


@pytest.mark.parametrize("watcher", ["watchfiles", "polling"])
def test_an_edited_module_is_served_after_a_reload(serve, listener, app_dir: Path, watcher):
    live = app_dir / "live.py"
    live.write_text(LIVE_APP.format(version="one"))
    pythonpath = f"{ROOT}:{app_dir}"
    if watcher == "polling":  # as if watchfiles were not installed
        shadow = app_dir / "shadow"
        shadow.mkdir()
        (shadow / "watchfiles.py").write_text("raise ImportError('not installed')\n")
        pythonpath = f"{shadow}:{pythonpath}"
    env = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": pythonpath}
    server = serve("live:Version", "-w", "2", "--reload", listen_on=listener, env=env)
    server.wait_ready(2)
    address = listener.getsockname()
    how = "with watchfiles" if watcher == "watchfiles" else "polling every second"
    wait_until(lambda: f"module files {how}" in server.log, message=lambda: server.log)
    assert echo_line(address) == b"one"

    edit(live, LIVE_APP.format(version="two"))
    wait_until(lambda: echo_line(address) == b"two", timeout=20, message=lambda: server.log)
    assert "--reload: live.py changed; asking the master to reload" in server.log
    wait_until(lambda: "reload complete: generation 2" in server.log, message=lambda: server.log)

    edit(live, "this is not Python\n")  # a broken save: the old code keeps serving
    wait_until(lambda: "reload abandoned" in server.log, timeout=20, message=lambda: server.log)
    assert echo_line(address) == b"two"

    edit(live, LIVE_APP.format(version="three"))  # fixed: the next save reloads
    wait_until(lambda: echo_line(address) == b"three", timeout=20, message=lambda: server.log)


# Deprecations are errors in the workers, except CPython's warning at a fork from a
# multi-threaded process (3.12+), which is shown at every fork instead: as an error it
# would be swallowed by os.fork() itself, and the test would see nothing.
WARNINGS_VISIBLE = "error::DeprecationWarning,always:This process:DeprecationWarning"


def test_a_fork_worker_watches_from_its_loop_and_forks_beside_no_thread(
    serve, listener, app_dir: Path
) -> None:
    # A fork worker forks a child per connection: a watcher thread running then would
    # be forked beside (CPython 3.12+ warns at each fork). It polls from its loop.
    live = app_dir / "live.py"
    live.write_text(LIVE_APP.format(version="one"))
    env = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": WARNINGS_VISIBLE}
    server = serve("live:Version", "-w", "1", "-k", "fork", "--reload", listen_on=listener, env=env)
    [worker] = server.wait_ready(1)
    address = listener.getsockname()
    for _ in range(3):
        assert echo_line(address) == b"one"
    assert "DeprecationWarning" not in server.log
    assert psutil.Process(worker).num_threads() == 1

    edit(live, LIVE_APP.format(version="two"))
    wait_until(lambda: echo_line(address) == b"two", timeout=20, message=lambda: server.log)
    wait_until(lambda: "reload complete: generation 2" in server.log, message=lambda: server.log)
    for _ in range(3):
        assert echo_line(address) == b"two"
    log = server.log
    assert "polling every second from the loop" in log
    assert "DeprecationWarning" not in log and "Traceback" not in log, log


def test_the_loop_watch_acts_once_the_files_are_quiet(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text("x = 1\n")
    now = [0.0]
    seen: list[set[str]] = []
    watch = reloader.LoopWatch({str(app)}, seen.append, clock=lambda: now[0])

    def turn_at(t: float) -> None:
        now[0] = t
        watch()

    app.write_text("x = 22\n")
    turn_at(0.5)  # not yet: it looks once per POLL_INTERVAL
    assert seen == []
    turn_at(1.0)  # sees the change, waits DEBOUNCE for more
    app.write_text("x = 333\n")
    turn_at(1.3)  # the editor is still writing: another DEBOUNCE
    turn_at(1.5)
    assert seen == []
    turn_at(1.6)  # quiet for DEBOUNCE: one batch
    assert seen == [{str(app)}]
    turn_at(5.0)
    assert seen == [{str(app)}]  # nothing more without a change


def test_module_files_are_the_apps_own(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text("")
    fake = types.SimpleNamespace(__file__=str(app))
    files = reloader.module_files([fake, types, reloader, pytest])
    assert files == {str(app.resolve())}  # not the stdlib, prefork, or installed packages


def test_poller_sees_changes_and_deletions(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 1\n")
    poller = reloader.Poller([str(a), str(b)])
    assert poller.changed() == set()
    a.write_text("x = 22\n")
    assert poller.changed() == {str(a)}
    assert poller.changed() == set()
    b.unlink()
    assert poller.changed() == {str(b)}
