"""Bad input: one 'Error:' line on stderr, exit 2, no traceback, nothing left behind."""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SERVER_FIRST, CliServer, run_cli

import prefork


def assert_one_line_error(result: object, *fragments: str) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    lines = stderr.strip().splitlines()
    assert result.returncode == 2, stderr  # type: ignore[attr-defined]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["nosuchmodule:Handler"], ["cannot import 'nosuchmodule'", "No module named"]),
        (["apps:Missing"], ["module 'apps' has no object 'Missing'"]),
        (["apps:not_a_class"], ["apps:not_a_class is neither a request handler class"]),
        (["os:path"], ["os:path is neither a request handler class"]),
        (["apps"], ["expected MODULE:OBJECT"]),
        (["apps:Echo", "-w", "0"], ["workers must be at least 1, got 0"]),
        (["apps:Echo", "-w", "lots"], ["'lots' is not a valid integer"]),
        (["apps:Echo", "-k", "gevent"], ["'gevent' is not one of"]),
        (["apps:Echo", "--graceful-timeout", "-1"], ["graceful_timeout must be at least 0"]),
        (["apps:Echo", "-b", "127.0.0.1:notaport"], ["'127.0.0.1:notaport'", "port must be"]),
        (["apps:Echo", "-b", "127.0.0.1:70000"], ["'127.0.0.1:70000'", "port must be"]),
        (["apps:Echo", "-b", "999.1.1.1:80"], ["'999.1.1.1' is not a valid IP address"]),
        (["apps:Echo", "-b", "http://127.0.0.1:80"], ["unknown scheme"]),
        (
            ["apps:Echo", "-b", "unix:/no/such/dir/app.sock"],
            ["unix:/no/such/dir/app.sock", "no such directory"],
        ),
        (["apps:Echo", "-b", "fd://999"], ["fd://999", "not an open descriptor"]),
        (["apps:Echo", "--chdir", "/no/such/dir"], ["cannot change to directory /no/such/dir"]),
        (
            ["apps:Echo", "--pid", "/no/such/dir/app.pid", "-b", "127.0.0.1:0"],
            ["cannot write pid file /no/such/dir/app.pid"],
        ),
    ],
)
def test_bad_input_is_one_line(app_dir: Path, args: list[str], fragments: list[str]) -> None:
    result = run_cli("run", *args, cwd=app_dir)
    assert_one_line_error(result, *fragments)


def test_unimportable_module_names_the_exception(app_dir: Path) -> None:
    (app_dir / "broken.py").write_text("def f(:\n")
    (app_dir / "raises.py").write_text("raise RuntimeError('no database')\n")
    assert_one_line_error(run_cli("run", "broken:H", cwd=app_dir), "SyntaxError", "broken.py")
    assert_one_line_error(run_cli("run", "raises:H", cwd=app_dir), "RuntimeError: no database")


def test_an_import_check_that_never_ends_is_bounded(app_dir: Path) -> None:
    """The check runs as the workers' user, who may stop it (SIGSTOP): the start waited
    for ever, silently."""
    (app_dir / "stops.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n")
    result = run_cli("run", "stops:H", "-b", "127.0.0.1:0", "--boot-timeout", "2", cwd=app_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "Error: cannot import 'stops': the import took over 2s (--boot-timeout)"
    )


def test_address_in_use_names_the_address(app_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli(
            "run", "apps:Echo", "-b", f"127.0.0.1:{port}", "--pid", "app.pid", cwd=app_dir
        )
    assert_one_line_error(result, f"cannot bind 127.0.0.1:{port}: address already in use")
    assert not (app_dir / "app.pid").exists()


def test_second_bind_failing_releases_the_first(app_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli(
            "run", "apps:Echo", "-b", "unix:app.sock", "-b", f"127.0.0.1:{port}", cwd=app_dir
        )
    assert_one_line_error(result, "address already in use")
    assert not (app_dir / "app.sock").exists()


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv to drop a capability")
def test_permission_denied(app_dir: Path) -> None:
    # Ports below 1024 need CAP_NET_BIND_SERVICE; as root, drop it from the bounding set.
    prefix = ["setpriv", "--bounding-set=-net_bind_service"] if os.geteuid() == 0 else []
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run(
        [*prefix, sys.executable, "-m", "prefork", "run", "apps:Echo", "-b", "127.0.0.1:80"],
        cwd=app_dir,
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{app_dir}"},
    )
    assert_one_line_error(result, "cannot bind 127.0.0.1:80: permission denied")


def test_live_unix_socket_is_refused_as_in_use(app_dir: Path) -> None:
    path = app_dir / "live.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        result = run_cli("run", "apps:Echo", "-b", f"unix:{path}", cwd=app_dir)
        assert_one_line_error(result, f"cannot bind unix:{path}: address already in use")
    assert path.exists()  # someone else's socket: not ours to remove


def test_env_var_errors_name_the_variable(app_dir: Path) -> None:
    result = run_cli("run", "apps:Echo", cwd=app_dir, env={"PREFORK_WORKERS": "many"})
    assert_one_line_error(result, "PREFORK_WORKERS", "'many' is not a valid integer")


def test_version_and_help(app_dir: Path) -> None:
    version = run_cli("--version", cwd=app_dir)
    assert version.returncode == 0
    assert prefork.__version__ in version.stdout
    help_text = run_cli("run", "--help", cwd=app_dir).stdout
    for option, default in [
        ("--workers", "CPU count"),
        ("--backlog", "2048"),
        ("--graceful-timeout", "30.0"),
        ("--bind", "127.0.0.1:8000"),
        ("--worker-class", "sync"),
        ("--threads", "16"),
    ]:
        assert option in help_text
        assert default in help_text


def test_console_script_is_installed(app_dir: Path) -> None:
    import subprocess
    import sys

    script = Path(sys.executable).parent / "prefork"
    assert script.exists(), "pip install should put a 'prefork' script beside python"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and prefork.__version__ in result.stdout


def test_config_file_precedence_cli_over_env_over_file(app_dir: Path) -> None:
    (app_dir / "prefork.toml").write_text('workers = 3\nthreads = 7\nbind = "127.0.0.1:9"\n')
    result = run_cli(
        "run",
        "apps:Echo",
        "--config",
        "prefork.toml",
        "-w",
        "5",
        "--print-config",
        cwd=app_dir,
        env={"PREFORK_THREADS": "8"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "workers = 5" in lines  # command line beats the file
    assert "threads = 8" in lines  # environment beats the file
    assert 'bind = ["127.0.0.1:9"]' in lines  # the file beats the default
    (app_dir / "pyproject.toml").write_text("[tool.prefork]\nmax_requests = 11\n")
    found = run_cli("run", "apps:Echo", "--print-config", cwd=app_dir)
    assert "max_requests = 11" in found.stdout.splitlines()


def test_bad_config_file_is_one_line(app_dir: Path) -> None:
    (app_dir / "bad.toml").write_text("wrokers = 2\n")
    assert_one_line_error(
        run_cli("run", "apps:Echo", "--config", "bad.toml", cwd=app_dir),
        "bad.toml: unknown setting 'wrokers'",
    )


def test_pid_file_of_a_running_master_is_refused_and_a_stale_one_replaced(
    serve, listener, app_dir: Path
) -> None:
    server = serve("apps:Echo", "-w", "1", "--pid", "app.pid", listen_on=listener)
    server.wait_ready(1)
    result = run_cli("run", "apps:Echo", "--pid", "app.pid", "-b", "unix:second.sock", cwd=app_dir)
    assert_one_line_error(
        result, "app.pid belongs to a running prefork master", f"(pid {server.pid})"
    )
    assert (app_dir / "app.pid").read_text() == f"{server.pid}\n"  # untouched
    assert not (app_dir / "second.sock").exists()
    (app_dir / "stale.pid").write_text("999999999\n")  # no such process
    stale = serve("apps:Echo", "-w", "1", "--pid", "stale.pid", "-b", "unix:third.sock")
    stale.wait_ready(1)
    assert (app_dir / "stale.pid").read_text() == f"{stale.pid}\n"


def test_server_class_hooks_and_overrides_apply_to_every_bind(serve, listener, app_dir: Path):
    (app_dir / "hooks.py").write_text(
        "import os\n"
        "class Hooks:\n"
        "    def on_starting(self):\n"
        "        open('hooks.log', 'a').write('on_starting %d\\n' % os.getpid())\n"
        "    def post_fork(self, worker):\n"
        "        open('hooks.log', 'a').write('post_fork %d\\n' % os.getpid())\n"
        "    def verify_request(self, request, client_address):\n"
        "        return False\n"
    )
    server = serve(
        "apps:Echo",
        "-w",
        "2",
        "--server-class",
        "hooks:Hooks",
        "-b",
        "unix:hooked.sock",
        *SERVER_FIRST,  # the client waits to be closed, sending nothing
        listen_on=listener,
    )
    workers = server.wait_ready(2)
    lines = sorted((app_dir / "hooks.log").read_text().splitlines())
    assert lines == sorted([f"on_starting {server.pid}"] + [f"post_fork {p}" for p in workers])
    import socket

    for address, family in [
        (listener.getsockname(), socket.AF_INET),
        (str(app_dir / "hooked.sock"), socket.AF_UNIX),
    ]:
        with socket.socket(family) as conn:  # verify_request refuses: closed unserved
            conn.settimeout(5)
            conn.connect(address)
            assert conn.recv(10) == b""


def test_bad_server_class_is_one_line(app_dir: Path) -> None:
    assert_one_line_error(
        run_cli(
            "run",
            "apps:Echo",
            "--server-class",
            "apps:not_a_class",
            "-b",
            "127.0.0.1:0",
            cwd=app_dir,
        ),
        "--server-class apps:not_a_class is not a class",
    )
    assert_one_line_error(
        run_cli("run", "apps:Echo", "--server-class", "nomod:X", "-b", "127.0.0.1:0", cwd=app_dir),
        "cannot import 'nomod'",
    )


# -- the standard library, imported ahead in the master ---------------------------------------
from prefork.target import Target, import_stdlib, stdlib_modules  # noqa: E402


def test_stdlib_modules_are_the_standard_librarys_only() -> None:
    names = {"colorsys", "json.decoder", "this", "antigravity", "__main__", "myapp", "click"}
    assert stdlib_modules(names) == ["colorsys", "json.decoder"]


def test_check_reports_the_stdlib_the_app_imports_and_the_master_imports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "helper_mod.py").write_text("VALUE = 1\n")
    (tmp_path / "stdapp.py").write_text(
        "import colorsys, socketserver, helper_mod\n"
        "class H(socketserver.BaseRequestHandler):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    names = Target.parse("stdapp:H").check()
    assert "colorsys" in names
    assert "helper_mod" not in names and "stdapp" not in names  # app code stays out
    assert "stdapp" not in sys.modules  # the check imported it in a child, not here
    assert import_stdlib([*names, "helper_mod", "this"]) >= 1
    assert "colorsys" in sys.modules
    assert "helper_mod" not in sys.modules and "this" not in sys.modules


def test_the_master_imports_the_stdlib_while_the_check_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The start-up overlap: the child names each standard module as its import begins,
    # and the master is told before the app's import has finished (here it cannot
    # finish until the master has heard of colorsys: it waits for a file made then).
    go = tmp_path / "go"
    (tmp_path / "slowapp.py").write_text(
        "import colorsys, os, socketserver, time\n"
        "deadline = time.monotonic() + 10\n"
        f"while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        f"if not os.path.exists({str(go)!r}):\n"
        "    raise ImportError('the master was not told while the import ran')\n"
        "class H(socketserver.BaseRequestHandler):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)  # imported afresh: named
    heard: list[list[str]] = []

    def on_stdlib(names: list[str]) -> int:
        heard.append(names)
        if "colorsys" in names:
            go.touch()
        return 0

    names = Target.parse("slowapp:H").check(timeout=30, on_stdlib=on_stdlib)
    assert go.exists(), heard  # told while the import was still waiting
    assert "colorsys" in names
    streamed = {name for batch in heard for name in batch}
    assert "slowapp" not in streamed  # the app's own modules are never named


def test_a_check_that_floods_its_pipe_fails_in_one_short_line(app_dir: Path) -> None:
    # The child runs the app's code, which can write to the pipe the master reads:
    # what the master keeps of it is bounded, and so is the error line.
    (app_dir / "floodapp.py").write_text(
        "import os, socketserver, stat\n"
        "for name in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        if int(name) > 2 and stat.S_ISFIFO(os.fstat(int(name)).st_mode):\n"
        "            os.set_blocking(int(name), True)\n"
        "            for _ in range(40):\n"
        "                os.write(int(name), b'x' * 65536)\n"
        "    except OSError:\n"
        "        pass\n"
        "class H(socketserver.BaseRequestHandler):\n    pass\n"
    )
    result = run_cli("run", "floodapp:H", "-b", "127.0.0.1:0", cwd=app_dir)
    assert_one_line_error(result, "cannot import 'floodapp'", "wrote over")
    assert len(result.stderr) < 300


def test_importing_prefork_leaves_the_garbage_collector_as_it_was() -> None:
    # prefork pauses collection while its own modules import (a start-up cost), and
    # a library user's setting, on or off, is what it finds afterwards.
    for setting in ("gc.enable()", "gc.disable()"):
        code = f"import gc; {setting}; before = gc.isenabled(); import prefork, prefork.cli; "
        code += "assert gc.isenabled() == before, before"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_library_imports_its_server_classes_when_first_used() -> None:
    # `prefork run` imports the package before its command: the server classes wait.
    code = (
        "import sys, prefork; assert 'prefork.arbiter' not in sys.modules; "
        "from prefork import PreForkThreadingUDPServer, WorkerInfo; "
        "assert 'prefork.arbiter' in sys.modules and prefork.PreForkMixIn; "
        "assert set(prefork.__all__) <= set(dir(prefork))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _reporting_app(path: Path, expression: str, per_process: bool = False) -> None:
    """An app that writes repr(expression), as its import saw it, to $REPORT (+ its pid)."""
    where = "os.environ['REPORT'] + str(os.getpid())" if per_process else "os.environ['REPORT']"
    path.write_text(
        "import gc, os, socketserver\n"
        f"with open({where}, 'w') as f:\n"
        f"    f.write(repr({expression}))\n"
        "class H(socketserver.BaseRequestHandler):\n    pass\n"
    )


def test_the_apps_code_runs_with_the_garbage_collector_on(app_dir: Path, tmp_path: Path) -> None:
    # The pause is for prefork's own imports: an app that makes cyclic garbage as it
    # imports (in the check, or in the master with --preload) must have it collected.
    _reporting_app(app_dir / "gcapp.py", "gc.isenabled()", per_process=True)
    for extra in ((), ("--preload",)):
        result = run_cli(
            "run", "gcapp:H", "-b", "127.0.0.1:0", "--check-config", *extra,
            cwd=app_dir, env={"REPORT": str(tmp_path / "gc-")},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    seen = [path.read_text() for path in tmp_path.glob("gc-*")]
    assert len(seen) == 2 and set(seen) == {"True"}, seen


def test_the_master_imports_its_server_while_the_check_imports_the_app(
    serve: Callable[..., CliServer], app_dir: Path, tmp_path: Path
) -> None:
    # A start forks the check as soon as the settings are read, and imports the modules
    # that bind and supervise meanwhile (one core each), not before it (on the way to
    # the first answer). The master's imports are frozen first, so that no collection,
    # the master's or a worker's, traverses them.
    seen = (
        "('import check' in open('/proc/self/cmdline').read(), "
        "'prefork.arbiter' in __import__('sys').modules, gc.get_freeze_count() > 5000)"
    )
    _reporting_app(app_dir / "overlapapp.py", seen, per_process=True)
    server = serve(
        "overlapapp:H", "-w", "1", "-b", "127.0.0.1:0", env={"REPORT": str(tmp_path / "r-")}
    )
    server.wait_ready(1)
    reports = [ast.literal_eval(path.read_text()) for path in tmp_path.glob("r-*")]
    assert sorted(reports) == [(False, True, True), (True, False, True)], reports


def test_the_import_check_does_not_see_systemds_variables(app_dir: Path, tmp_path: Path) -> None:
    # The check runs the app's code: with NotifyAccess=all it could speak for the service.
    seen = "[os.environ.get(n) for n in ('NOTIFY_SOCKET', 'WATCHDOG_USEC')]"
    _reporting_app(app_dir / "envapp.py", seen)
    report = tmp_path / "env"
    env = {"REPORT": str(report), "NOTIFY_SOCKET": str(tmp_path / "nosuch.sock")}
    env["WATCHDOG_USEC"] = "30000000"
    result = run_cli("run", "envapp:H", "-b", "127.0.0.1:0", "--check-config", cwd=app_dir, env=env)
    assert result.returncode == 0, result.stderr
    assert report.read_text() == "[None, None]"


def test_names_from_the_check_that_would_run_code_are_never_imported() -> None:
    # The names come from the app's process: a package's __main__ runs its command line
    # (unittest.__main__ ran unittest in the master, and exited), test packages are tools.
    names = {"unittest.__main__", "ctypes.test", "json.tests", "os; import x", "json", "..x",
             "logging.__init__"}  # fmt: skip
    assert stdlib_modules(names) == ["json"]
    assert import_stdlib(["unittest.__main__", "logging.__init__"]) == 0
    assert "unittest.__main__" not in sys.modules and "logging.__init__" not in sys.modules
