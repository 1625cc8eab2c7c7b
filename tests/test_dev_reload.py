"""--reload: an edited module is served after the reload it triggers; a broken edit
leaves the old code serving. With watchfiles, and with the polling fallback."""

from __future__ import annotations

import types
from pathlib import Path

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
