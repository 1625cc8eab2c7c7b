"""Where the app is imported from: the directory ``prefork run`` starts in and
``--pythonpath``, never ``--chdir``'s, which is a served tree."""

from __future__ import annotations

import http.client
import signal
import socket
from pathlib import Path

import pytest
from conftest import ROOT, echo_line, run_cli, wait_until
from test_cli import assert_one_line_error

PLANTED = """
import pathlib
pathlib.Path({marker!r}).write_text("the served tree's http/__init__.py ran")
"""


@pytest.mark.parametrize("pythonpath", ["absolute", "relative"])
def test_a_served_directory_is_never_imported_from(
    serve, listener: socket.socket, app_dir: Path, pythonpath: str
) -> None:
    """``--chdir /srv/files`` put the served tree first on sys.path: an
    ``http/__init__.py`` in it ran as code (and broke http.server). A relative
    PYTHONPATH entry meant the served tree too, once the master had changed to it."""
    served, marker = app_dir / "files", app_dir / "planted-ran"
    (served / "http").mkdir(parents=True)
    (served / "http" / "__init__.py").write_text(PLANTED.format(marker=str(marker)))
    (served / "index.html").write_text("served")
    env = {"PYTHONPATH": f"{ROOT}:."} if pythonpath == "relative" else None
    server = serve(
        "http.server:SimpleHTTPRequestHandler", "-w", "1", "--chdir", str(served),
        listen_on=listener, env=env,
    )  # fmt: skip
    server.wait_ready(1)
    conn = http.client.HTTPConnection(*listener.getsockname()[:2], timeout=5)
    conn.request("GET", "/index.html")
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"served")
    conn.close()
    assert not marker.exists(), marker.read_text()


def test_pythonpath_says_where_the_app_lives(serve, listener: socket.socket, app_dir: Path):
    lib, more = app_dir / "lib", app_dir / "more"
    lib.mkdir()
    more.mkdir()
    (lib / "libapp.py").write_text("from apps import Echo\n")
    (more / "moreapp.py").write_text("from libapp import Echo\n")
    assert_one_line_error(
        run_cli("run", "libapp:Echo", "-b", "127.0.0.1:0", cwd=app_dir),
        "cannot import 'libapp'",
    )
    # Repeatable, or comma-separated as gunicorn takes it; relative to the start directory.
    for args, env in [
        (["--pythonpath", "lib"], None),
        (["--pythonpath", "lib,more"], None),
        ([], {"PREFORK_PYTHONPATH": "more lib"}),
    ]:
        server = serve("moreapp:Echo" if "more" in str(args) + str(env) else "libapp:Echo",
                       "-w", "1", *args, listen_on=listener, env=env)  # fmt: skip
        server.wait_ready(1)
        assert echo_line(listener.getsockname(), b"found") == b"found"
        server.stop()


VERSIONED = """
import socketserver


class Versioned(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%s\\n")
"""


@pytest.mark.parametrize("preload", [False, True])
def test_an_app_on_the_pythonpath_is_reloaded_by_hup_and_usr2(
    serve, listener: socket.socket, app_dir: Path, preload: bool
) -> None:
    """--pythonpath is where the app is imported from in every generation: the workers'
    (HUP) and, with --preload, a new master image's (USR2)."""
    lib = app_dir / "lib"
    lib.mkdir()
    (lib / "versioned.py").write_text(VERSIONED % "v1")
    options = ["--preload"] if preload else []
    server = serve("versioned:Versioned", "-w", "1", "--pythonpath", "lib", *options,
                   listen_on=listener)  # fmt: skip
    server.wait_ready(1)
    address = listener.getsockname()
    assert echo_line(address) == b"v1"
    for generation, (signum, version) in enumerate(
        [(signal.SIGHUP, "v2"), (signal.SIGUSR2, "v3")], start=2
    ):
        (lib / "versioned.py").write_text(VERSIONED % version)
        server.signal(signum)
        wait_until(
            lambda g=generation: f"reload complete: generation {g} serving" in server.log,
            timeout=20, message=lambda: server.log,
        )  # fmt: skip
        wait_until(lambda v=version: echo_line(address) == v.encode(), timeout=10)
    assert server.proc.poll() is None
