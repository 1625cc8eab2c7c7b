"""Trust boundaries: the master as root, workers as nobody, and someone hostile between.

The attacker here is the workers' user (a compromised app) or another local user: they
may write to the directories of the logs, the pid file and the sockets, to their own
heartbeat page and status pipe, and they choose their client addresses. Each test plants
what they would and checks that root's files stay as they were and the service serves.
Every test runs as root with the workers as nobody (the ``as_nobody`` fixture).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DROP_TO_NOBODY, Interpreter, echo_line, run_cli, wait_until

NOBODY = 65534

APP = r'''
import gc, os, socketserver, struct, time

def worker():
    from prefork.workers.base import Worker
    return next(o for o in gc.get_objects() if isinstance(o, Worker))

class Hostile(socketserver.StreamRequestHandler):
    """Does to its own worker's page and pipe what a compromised app could."""
    def handle(self):
        what = self.rfile.readline().strip().decode()
        me = worker()
        page = me.spec.heartbeat._map
        if what in ("inf", "nan", "-inf", "1e300"):
            struct.pack_into("d", page, 0, float(what))  # the heartbeat
            self.wfile.write(b"written\n"); self.wfile.flush()
            time.sleep(3)  # the loop would overwrite it at its next turn
        elif what == "client":  # a request from a client with terminal escapes, too long
            from prefork.heartbeat import _CLIENT_OFFSET, _REQUEST_OFFSET
            evil = (b"\x1b]0;owned\x07\x1b[2J" * 40)[:200]
            page[_CLIENT_OFFSET:_CLIENT_OFFSET + len(evil)] = evil
            struct.pack_into("dQH", page, _REQUEST_OFFSET, time.monotonic(), 7, 65535)
            time.sleep(3)
        elif what.startswith("pid "):  # who it claims to be, in the identity the master wrote
            struct.pack_into("q", page, 248, int(what[4:]))
        elif what.startswith("pipe "):
            data = what[5:].encode()
            os.write(me.spec.status_fd, data)
        self.wfile.write(b"done\n")

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
'''


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("these tests run the master as root")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory nobody can read (pytest's tmp_path is root's alone), with the app,
    and in it a directory owned by nobody: the attacker's."""
    path = Path(tempfile.mkdtemp(prefix="prefork-trust-"))
    path.chmod(0o755)
    (path / "hostile.py").write_text(APP)
    theirs = path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def secret(tmp_path: Path) -> Iterator[Path]:
    """A root-owned 0600 file in a root-only directory: /etc/shadow, for the tests."""
    path = tmp_path / "shadow"
    path.write_text("root:$6$secret:19000:0:99999:7:::\n")
    path.chmod(0o600)
    before = _facts(path)
    yield path
    assert _facts(path) == before, "the secret file was changed"


def _facts(path: Path) -> tuple[int, int, int, str]:
    info = os.stat(path)
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode), path.read_text()


def plant(link: Path, target: Path) -> Path:
    """A symlink as nobody would make it: it belongs to nobody."""
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)
    return link


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def ask(address: object, line: bytes = b"ping", timeout: float = 10.0) -> bytes:
    return echo_line(address, line, timeout).strip()


# -- paths root touches -------------------------------------------------------------------
@pytest.mark.parametrize("option", ["--log-file", "--access-log"])
def test_a_planted_symlink_log_is_refused_not_followed(
    open_dir: Path, secret: Path, as_nobody: Interpreter, option: str
):
    link = plant(open_dir / "theirs" / "app.log", secret)
    result = run_cli(
        "run", "hostile:Echo", "-b", "127.0.0.1:0", "--user", "nobody", option, str(link),
        cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    line = one_line(result)
    assert str(link) in line and "symbolic link" in line
    assert link.is_symlink()


@pytest.mark.parametrize("mode", ["a", "w"])
def test_a_log_config_file_handler_never_opens_a_planted_symlink(
    open_dir: Path, secret: Path, as_nobody: Interpreter, mode: str
):
    """logging's FileHandler opens its path with open(), following a symlink: as root,
    mode "w" would empty the secret and mode "a" would hand every worker a descriptor
    appending the app's log lines to it."""
    link = plant(open_dir / "theirs" / "app.log", secret)
    (open_dir / "logging.json").write_text(
        json.dumps({
            "handlers": {"file": {"class": "logging.FileHandler", "filename": str(link),
                                  "mode": mode}},
            "loggers": {"app": {"handlers": ["file"]}},
        })
    )  # fmt: skip
    result = run_cli(
        "run", "hostile:Echo", "-b", "127.0.0.1:0", "--user", "nobody",
        "--log-config", "logging.json", cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    line = one_line(result)
    assert str(link) in line and "symbolic link" in line, line
    assert link.is_symlink()


def test_a_log_config_file_is_made_for_the_workers_and_reopened_by_them(
    serve, open_dir: Path, secret: Path, as_nobody: Interpreter
):
    """The file root creates for a handler is the workers' (they reopen it at USR1);
    a symlink planted after rotation is refused, not followed, and the app keeps
    serving with its lines on stderr."""
    (open_dir / "noisy.py").write_text(
        "import logging, socketserver\n"
        "class Noisy(socketserver.StreamRequestHandler):\n"
        "    def handle(self):\n"
        "        line = self.rfile.readline().strip().decode()\n"
        "        logging.getLogger('app').warning('app logged %s', line)\n"
        "        self.wfile.write(b'ok\\n')\n"
    )
    app_log = open_dir / "theirs" / "app.log"
    (open_dir / "logging.json").write_text(
        json.dumps({
            "handlers": {"file": {"class": "logging.FileHandler", "filename": str(app_log)}},
            "loggers": {"app": {"handlers": ["file"]}},
        })
    )  # fmt: skip
    server = serve(
        "noisy:Noisy", "-w", "1", "-b", "127.0.0.1:0", "--user", "nobody",
        "--log-config", "logging.json", cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    server.wait_ready(1)
    address = _tcp_address(server)
    assert ask(address, b"one") == b"ok"
    wait_until(lambda: "app logged one" in app_log.read_text())
    assert app_log.stat().st_uid == NOBODY
    app_log.rename(app_log.with_suffix(".1"))
    plant(app_log, secret)
    server.signal(signal.SIGUSR1)
    sent = iter(f"two-{n}" for n in range(10**6))  # until one is written after the reopen

    def logged_on_stderr() -> str | None:
        word = next(sent)
        assert ask(address, word.encode()) == b"ok"
        return word if f"app logged {word}" in server.log else None

    word = wait_until(logged_on_stderr, 10, message=lambda: server.log)
    assert "symbolic link" in server.log
    assert app_log.is_symlink() and word not in app_log.with_suffix(".1").read_text()
    assert server.proc.poll() is None


def test_an_existing_file_of_someone_else_is_never_given_away(
    open_dir: Path, secret: Path, as_nobody: Interpreter
):
    """A hard link to the secret (what protected_hardlinks=0 allows) where the log goes:
    prefork gives away only the files it creates itself."""
    os.link(secret, open_dir / "theirs" / "app.log")
    result = run_cli(
        "run", "hostile:Echo", "-b", "127.0.0.1:0", "--user", "nobody",
        "--log-file", str(open_dir / "theirs" / "app.log"),
        cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    assert "exists and belongs to uid 0, not to uid 65534" in one_line(result)


def test_a_symlinked_directory_of_theirs_is_not_followed(
    open_dir: Path, secret: Path, as_nobody: Interpreter
):
    plant(open_dir / "theirs" / "logs", secret.parent)  # .../theirs/logs -> root's directory
    log = open_dir / "theirs" / "logs" / "shadow"
    result = run_cli(
        "run", "hostile:Echo", "-b", "127.0.0.1:0", "--user", "nobody", "--log-file", str(log),
        cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    assert "refusing to follow the symbolic link logs" in one_line(result)


def test_a_planted_symlink_at_the_socket_path_is_not_bound_through(
    open_dir: Path, secret: Path, as_nobody: Interpreter
):
    link = plant(open_dir / "theirs" / "app.sock", secret)
    result = run_cli(
        "run", "hostile:Echo", "-b", f"unix:{link}", "--user", "nobody", "--socket-mode", "666",
        cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    assert "address already in use" in one_line(result)


def test_root_binds_no_socket_where_the_workers_user_could_swap_a_directory(
    open_dir: Path, as_nobody: Interpreter
):
    """bind() walks the path again: with theirs/sub root's but theirs nobody's, nobody
    swapped sub for a symlink to a root-only directory (renameat2 RENAME_EXCHANGE in a
    loop) and root, whose bind as nobody had failed, made the socket file there. Now the
    socket is made as the workers' user or not at all, and without --user not at all."""
    sub = open_dir / "theirs" / "sub"
    sub.mkdir()  # root's, 755: nobody may not make files in it
    base = ("run", "hostile:Echo", "-b", f"unix:{sub / 'app.sock'}", "-b", "127.0.0.1:0")
    line = one_line(run_cli(*base, "--user", "nobody", cwd=open_dir, interpreter=as_nobody))
    assert "permission denied" in line
    line = one_line(run_cli(*base, cwd=open_dir, interpreter=as_nobody))
    assert "refusing to bind unix:" in line and "theirs belongs to uid 65534" in line
    assert list(sub.iterdir()) == []


SQUATTER = """
import socket, sys, time
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(0)
filler = socket.socket(socket.AF_UNIX)
filler.connect(sys.argv[1])  # the backlog is full now: a blocking connect would wait
print("ready", flush=True)
time.sleep(60)
"""


def test_a_squatter_with_a_full_backlog_does_not_hold_the_master(
    open_dir: Path, as_nobody: Interpreter
):
    """The stale-socket probe connected blocking: the root master waited in connect()
    for as long as the squatter liked."""
    path = open_dir / "theirs" / "busy.sock"
    squatter = subprocess.Popen(
        [*DROP_TO_NOBODY, as_nobody.python, "-c", SQUATTER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "ready\n"
        result = run_cli(
            "run", "hostile:Echo", "-b", f"unix:{path}", "--user", "nobody",
            cwd=open_dir, interpreter=as_nobody, timeout=15,
        )  # fmt: skip
        assert "address already in use" in one_line(result)
    finally:
        squatter.kill()
        squatter.wait(10)
        squatter.stdout.close()


def test_the_pid_file_replaces_a_planted_symlink_and_goes_only_if_still_ours(
    serve, open_dir: Path, secret: Path, as_nobody: Interpreter
):
    pid_file = plant(open_dir / "theirs" / "app.pid", secret)
    server = serve(
        "hostile:Echo", "-w", "1", "-b", "127.0.0.1:0", "--user", "nobody",
        "--pid", str(pid_file), cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    server.wait_ready(1)
    assert not pid_file.is_symlink() and pid_file.read_text() == f"{server.pid}\n"
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not pid_file.exists()


def test_root_never_chowns_through_a_symlink_swapped_over_the_socket(
    serve, open_dir: Path, secret: Path, as_nobody: Interpreter
):
    """A second process, as nobody, replaces the socket file with a symlink to the
    secret the moment it appears, in a tight loop, while the master binds again and
    again. The old master won this race 7 times in 7."""
    path = open_dir / "theirs" / "app.sock"
    racer = subprocess.Popen(
        [*DROP_TO_NOBODY, as_nobody.python, "-c", RACER, str(path), str(secret), "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for attempt in range(6):
            server = serve(
                "hostile:Echo", "-w", "1", "-b", f"unix:{path}", "-b", "127.0.0.1:0",
                "--user", "nobody", "--socket-mode", "666", cwd=open_dir,
                interpreter=as_nobody,
            )  # fmt: skip
            wait_until(lambda s=server: "booted" in s.log or s.proc.poll() is not None, 15)
            server.stop()
            assert _facts(secret)[:3] == (0, 0, 0o600), f"chowned at attempt {attempt}"
            if path.is_symlink():  # the racer's: the next bind would find the path taken
                path.unlink()
    finally:
        racer.terminate()
        swaps, _ = racer.communicate(timeout=30)
    assert int(swaps) > 0, "the racer never saw a socket to swap: the race did not run"


RACER = """
import os, signal, stat, sys, time
path, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
swap, deadline, swaps = path + ".swap", time.monotonic() + seconds, 0
running = [True]
signal.signal(signal.SIGTERM, lambda *_: running.clear())
lstat, rename, is_socket = os.lstat, os.rename, stat.S_ISSOCK
os.symlink(target, swap)  # made ahead: the swap itself is one rename
while running and time.monotonic() < deadline:
    try:
        if is_socket(lstat(path).st_mode):
            rename(swap, path)
            swaps += 1
            os.symlink(target, swap)
    except OSError:
        pass
print(swaps, flush=True)
"""


def test_reopen_hup_and_usr2_refuse_a_symlink_planted_meanwhile(
    serve, open_dir: Path, secret: Path, as_nobody: Interpreter
):
    """The workers' user rotates the logs its own way: moves them and plants symlinks
    to the secret, then waits for USR1 (logrotate), a HUP that adds a bind, and USR2."""
    theirs = open_dir / "theirs"
    log, access, config = theirs / "app.log", theirs / "access.log", open_dir / "prefork.toml"
    config.write_text('bind = ["127.0.0.1:0"]\n')
    server = serve(
        "hostile:Echo", "-w", "1", "--user", "nobody", "--config", str(config),
        "--log-file", str(log), "--access-log", str(access),
        cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    wait_until(lambda: log.exists() and "booted" in log.read_text(), 15)
    for path in (log, access):
        path.rename(path.with_suffix(".1"))
        plant(path, secret)
    server.signal(signal.SIGUSR1)  # the master reopens both: refused, not followed
    wait_until(lambda: "symbolic link" in server.log, 10, message=lambda: server.log)
    assert log.is_symlink() and access.is_symlink()
    plant(theirs / "new.sock", secret)
    config.write_text(f'bind = ["127.0.0.1:0", "unix:{theirs / "new.sock"}"]\n')
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload abandoned" in server.log, 10, message=lambda: server.log)
    server.signal(signal.SIGUSR2)  # refused as the log, the link vetoes no upgrade
    wait_until(lambda: "upgraded in place" in server.log, 20, message=lambda: server.log)
    after = server.log.rsplit("re-executing", 1)[1]
    assert "cannot open log file" in after and "symbolic link" in after
    assert server.proc.poll() is None  # the same master, still serving


# -- the master never trusts what a worker writes -------------------------------------------
def _hostile_server(serve, open_dir: Path, as_nobody: Interpreter, *extra: str):
    server = serve(
        "hostile:Hostile", "-w", "2", "-b", "127.0.0.1:0", "--user", "nobody", *extra,
        cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    server.wait_ready(2)
    return server, _tcp_address(server)


def _tcp_address(server) -> tuple[str, int]:
    import psutil

    ports = {
        c.laddr.port
        for c in psutil.Process(server.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert len(ports) == 1, ports
    return "127.0.0.1", ports.pop()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e300"])
def test_a_heartbeat_from_nowhere_gets_its_worker_killed_not_the_master(
    serve, open_dir: Path, as_nobody: Interpreter, value: str
):
    """The master looks at a page when its worker's deadline comes (--timeout after its
    last beat): an impossible value there gets the worker killed then, never an
    exception in the master."""
    server, address = _hostile_server(serve, open_dir, as_nobody, "--timeout", "2")
    with socket.create_connection(address, timeout=10) as hostile:
        hostile.sendall(value.encode() + b"\n")
        assert hostile.makefile("rb").readline() == b"written\n"
        wait_until(lambda: "impossible time" in server.log, 10, message=lambda: server.log)
    assert ask(address, b"ping") == b"done"  # the pool serves on
    assert server.proc.poll() is None
    assert server.log.count("impossible time") == 1
    assert "Traceback" not in server.log


def test_a_forged_request_record_is_clamped_and_escaped(
    serve, open_dir: Path, as_nobody: Interpreter
):
    server, address = _hostile_server(serve, open_dir, as_nobody, "--timeout", "1")
    with socket.create_connection(address, timeout=10) as hostile:
        hostile.sendall(b"client\n")
        wait_until(
            lambda: "timed out: its request from" in server.log, 10, message=lambda: server.log
        )
        status = run_cli("status", str(server.pid), cwd=open_dir, interpreter=as_nobody)
    line = next(x for x in server.log.splitlines() if "timed out: its request from" in x)
    assert "\x1b" not in server.log and "\x07" not in server.log
    assert "\\x1b]0;owned\\x07" in line
    assert (
        status.returncode == 0 and "\x1b" not in status.stdout and "Traceback" not in status.stderr
    )
    assert ask(address, b"ping") == b"done"


@pytest.mark.parametrize("claim", ["-5", "1", "0"])
def test_a_worker_cannot_pass_for_another_process_in_status(
    serve, open_dir: Path, as_nobody: Interpreter, claim: str
):
    """Status as root names the PIDs an operator may then kill: they come from the
    master's records, not from what a worker wrote into its page."""
    server, address = _hostile_server(serve, open_dir, as_nobody)
    for _ in range(4):  # both workers, whichever takes each connection
        assert ask(address, f"pid {claim}".encode()) == b"done"
    result = run_cli("status", "--json", str(server.pid), cwd=open_dir, interpreter=as_nobody)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    shown = sorted(w["pid"] for w in json.loads(result.stdout)["workers"])
    assert shown == sorted(server.worker_pids())


FAKE_MASTER = r"""
import os, sys, time
from prefork.heartbeat import Heartbeat
from prefork.statuspage import MasterPage
page, worker = MasterPage(), Heartbeat()
worker.identify(1, 1, 1, 7)
facts = dict(board=7, name="app:H", version="0.1.0", state="serving", generation=1,
             reloading=None, workers=1, worker_class="sync", binds=["127.0.0.1:80"],
             served_by_exited=0, pages=[[1, 1, 1, worker.fileno()]])
page.publish({**facts, "pid": int(sys.argv[1]) or os.getpid()})
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("claimed", ["itself", "another"])
def test_a_process_that_fakes_a_master_page_is_not_believed(
    as_nobody: Interpreter, open_dir: Path, claimed: str
):
    """Any user can make a memfd named prefork-master: root's status showed PID 1 as a
    worker of that process, with PID 1's memory and age."""
    claim = "0" if claimed == "itself" else "1"
    fake = subprocess.Popen(
        [*DROP_TO_NOBODY, as_nobody.python, "-c", FAKE_MASTER, claim],
        env={**os.environ, "PYTHONPATH": as_nobody.path},
        cwd=open_dir,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "ready\n"
        result = run_cli("status", "--json", str(fake.pid), cwd=open_dir)
        if claimed == "itself":
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["workers"] == []  # PID 1 is not its child
        else:
            assert result.returncode != 0 and "says it is PID 1" in result.stderr
    finally:
        fake.kill()
        fake.wait(10)
        fake.stdout.close()


def test_status_pipe_messages_out_of_turn_steer_nothing(
    serve, open_dir: Path, as_nobody: Interpreter
):
    server, address = _hostile_server(serve, open_dir, as_nobody)
    assert ask(address, b"pipe H") == b"done"  # a reload, though --reload is off
    assert ask(address, b"pipe M") == b"done"  # a recycle, though --max-requests is off
    assert ask(address, b"pipe R") == b"done"  # ready again
    wait_until(lambda: "which it may not; ignored" in server.log, 10)
    assert ask(address, b"ping") == b"done"
    assert "reloading" not in server.log and "will be replaced" not in server.log
    assert server.log.count("which it may not; ignored") <= 2  # once per worker at most
    assert ask(address, b"pipe " + b"x" * 150) in (b"done", b"")  # a flood: killed
    wait_until(lambda: "out of turn; killing it" in server.log, 10, message=lambda: server.log)
    wait_until(lambda: len(server.booted()) == 2, 10)
    assert ask(address, b"ping") == b"done"
    assert server.proc.poll() is None and "Traceback" not in server.log


def test_a_message_honoured_once_cannot_be_repeated_for_ever(
    serve, open_dir: Path, as_nobody: Interpreter
):
    """Under --max-requests a worker writing RETIRE without pause kept the root master at
    90% CPU and was never killed: after the first, the rest were dropped in silence."""
    server, address = _hostile_server(serve, open_dir, as_nobody, "--max-requests", "100000")
    assert ask(address, b"pipe " + b"M" * 150) in (b"done", b"")
    wait_until(lambda: "out of turn; killing it" in server.log, 10, message=lambda: server.log)
    wait_until(lambda: len(server.booted()) == 2, 10)  # replaced
    assert ask(address, b"ping") == b"done"
    assert server.proc.poll() is None and "Traceback" not in server.log


# -- settings that leave the workers more than they look ------------------------------------
def test_group_without_user_says_workers_keep_root(serve, open_dir: Path, as_nobody: Interpreter):
    server = serve(
        "hostile:Echo", "-w", "1", "-b", "127.0.0.1:0", "--group", "nogroup",
        cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    server.wait_ready(1)
    assert "--group without --user: workers keep the master's user, root (uid 0)" in server.log


def test_settings_someone_else_could_change_are_refused_at_start(
    open_dir: Path, as_nobody: Interpreter
):
    """Whoever writes the config file chooses --user, --preload and --server-class: as
    root, prefork reads settings only from files only root can change."""
    theirs = open_dir / "theirs"
    config = theirs / "prefork.toml"
    config.write_text("workers = 1\n")
    base = ("run", "hostile:Echo", "-b", "127.0.0.1:0", "--user", "nobody")
    line = one_line(run_cli(*base, "--config", str(config), cwd=open_dir, interpreter=as_nobody))
    assert "refusing to read settings from" in line and f"{theirs} belongs to uid 65534" in line
    (theirs / "pyproject.toml").write_text("[tool.prefork]\nworkers = 1\n")
    line = one_line(run_cli(*base, cwd=theirs, interpreter=as_nobody))  # the start directory
    assert "pyproject.toml as root" in line


def test_a_config_directory_swapped_later_is_refused_on_hup_and_usr2(
    serve, open_dir: Path, as_nobody: Interpreter
):
    """The file and its directory are root's, the directory above is the workers': they
    rename the directory away, put their own with server_class = their code, and wait
    for the next HUP or USR2. The code must never run as root."""
    theirs = open_dir / "theirs"
    conf = theirs / "conf"
    conf.mkdir()
    (conf / "p.toml").write_text("workers = 1\n")
    os.chown(theirs, 0, 0)  # root's at start: trusted then
    server = serve(
        "hostile:Echo", "-b", "127.0.0.1:0", "--user", "nobody", "--config", str(conf / "p.toml"),
        cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    server.wait_ready(1)
    os.chown(theirs, NOBODY, NOBODY)  # now the workers' (an operator's mistake, say)
    conf.rename(theirs / "conf.old")
    conf.mkdir()
    (conf / "p.toml").write_text('server_class = "pwn:S"\n')
    marker = open_dir / "pwned"
    (open_dir / "pwn.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass S: pass\n")
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload abandoned" in server.log, 10, message=lambda: server.log)
    server.signal(signal.SIGUSR2)
    wait_until(lambda: "upgrade abandoned" in server.log, 20, message=lambda: server.log)
    assert "refusing to read settings" in server.log.rsplit("upgrade abandoned", 1)[1]
    assert not marker.exists() and server.proc.poll() is None


def test_preload_of_code_someone_else_could_change_is_refused(
    open_dir: Path, as_nobody: Interpreter
):
    theirs = open_dir / "theirs"
    (theirs / "mine.py").write_text(
        "import socketserver\nclass H(socketserver.BaseRequestHandler): pass\n"
    )
    for option in (("--preload",), ("--server-class", "mine:H")):
        target = "mine:H" if option == ("--preload",) else "hostile:Echo"
        result = run_cli(
            "run", target, "-b", "127.0.0.1:0", "--user", "nobody", *option,
            cwd=theirs if option == ("--preload",) else open_dir,
            env={"PYTHONPATH": f"{as_nobody.path}{os.pathsep}{theirs}"}, interpreter=as_nobody,
        )  # fmt: skip
        line = one_line(result)
        assert f"{option[0]} would import" in line and "runs as root" in line


def _owned_by_nobody(path: Path) -> Path:
    os.chown(path, NOBODY, NOBODY)
    return path


@pytest.mark.parametrize("option", ["--preload", "--server-class"])
def test_code_the_master_imports_is_checked_module_by_module(
    open_dir: Path, as_nobody: Interpreter, option: str
):
    """Only the top-level module was checked: a root-owned package whose one submodule
    was nobody's, or a root-only module that imports a standard one which nobody had
    planted in the start directory (first on the master's path), ran nobody's code as
    root."""
    marker = open_dir / "pwned"
    evil = f"open({str(marker)!r}, 'w').write(str(__import__('os').getuid()))\n"
    package = open_dir / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .handlers import H, S\n")
    (package / "handlers.py").write_text(
        evil + "import socketserver\nclass H(socketserver.BaseRequestHandler): pass\n"
        "class S(socketserver.TCPServer): pass\n"
    )
    _owned_by_nobody(package / "handlers.py")
    root_lib = open_dir / "rootlib"
    root_lib.mkdir()
    (root_lib / "rootmod.py").write_text(
        "import xmlrpc.client, socketserver\n"
        "class H(socketserver.BaseRequestHandler): pass\n"
        "class S(socketserver.TCPServer): pass\n"
    )
    start_dir = open_dir / "theirs"  # the workers' user's: it plants a standard module
    planted = start_dir / "xmlrpc"
    planted.mkdir()
    _owned_by_nobody(planted)
    (planted / "__init__.py").write_text(evil)
    _owned_by_nobody(planted / "__init__.py")
    for module, cwd in (("pkg", open_dir), ("rootmod", start_dir)):
        args = ("--preload",) if option == "--preload" else ("--server-class", f"{module}:S")
        target = f"{module}:H" if option == "--preload" else "hostile:Echo"
        result = run_cli(
            "run", target, "-b", "127.0.0.1:0", "--user", "nobody", *args, cwd=cwd,
            env={"PYTHONPATH": os.pathsep.join([as_nobody.path, str(root_lib), str(open_dir)])},
            interpreter=as_nobody,
        )  # fmt: skip
        line = one_line(result)
        assert "into the master, which runs as root" in line, line
        assert "belongs to uid 65534" in line, line
        assert not marker.exists(), f"{module}: nobody's code ran as uid {marker.read_text()}"


def test_an_upgrade_serving_on_as_before_refuses_a_server_class_planted_meanwhile(
    open_dir: Path, as_nobody: Interpreter
):
    """After USR2's check passed, a --server-class module planted in the app's directory
    makes the new image's own start refuse it; the image then serves on with the old
    settings (cli.as_before), which import the server class again when the sockets are
    adopted: the refused start had left the directory first on the path, with no import
    guard, and the planted module ran as root. (Here as the new image does it, in one
    process, with the planted file in place from the start.)"""
    marker = open_dir / "pwned"
    start_dir = open_dir / "theirs"
    planted = start_dir / "rootserver.py"
    planted.write_text(
        f"open({str(marker)!r}, 'w').write(str(__import__('os').getuid()))\n"
        "import socketserver\nclass S(socketserver.TCPServer): pass\n"
    )
    _owned_by_nobody(planted)
    root_lib = open_dir / "rootlib"
    root_lib.mkdir()
    (root_lib / "rootserver.py").write_text(
        "import socketserver\nclass S(socketserver.TCPServer): pass\n"
    )
    code = f"""
import socket, socketserver
from prefork import cli
from prefork.errors import PreforkError
from prefork.handover import Handover
given = dict(user="nobody", server_class="rootserver:S", pythonpath=({str(start_dir)!r},))
try:
    cli.prepare("hostile:Echo", given, {str(open_dir)!r}, False, [], [])
except PreforkError as exc:
    print("the new start:", exc)
settings = dict(user="nobody", server_class="rootserver:S", pythonpath=[{str(start_dir)!r}])
handover = Handover(1, -1, -1, settings=settings, app_dir={str(start_dir)!r})
try:
    start = cli.as_before("hostile:Echo", handover, {str(open_dir)!r})
    cli.server_class(socketserver.TCPServer, start.config, socket.AF_INET)
    print("served on")
except PreforkError as exc:
    print("as before:", exc)
"""
    path = os.pathsep.join([as_nobody.path, str(root_lib), str(open_dir)])
    result = subprocess.run(
        [as_nobody.python, "-c", code], cwd=open_dir, capture_output=True, text=True,
        timeout=60, env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    assert not marker.exists(), f"nobody's code ran as uid {marker.read_text()}"
    lines = result.stdout.splitlines()
    refused = [line for line in lines if "rootserver" in line and "runs as root" in line]
    assert len(lines) == len(refused) == 2, result.stdout + result.stderr


def test_a_fifo_planted_as_the_log_is_refused_even_with_a_reader(
    open_dir: Path, as_nobody: Interpreter
):
    """A FIFO someone holds open without reading would block every line the master logs."""
    fifo = open_dir / "theirs" / "app.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads
    try:
        result = run_cli(
            "run", "hostile:Echo", "-b", "127.0.0.1:0", "--user", "nobody",
            "--log-file", str(fifo), cwd=open_dir, interpreter=as_nobody,
        )  # fmt: skip
    finally:
        os.close(reader)
    assert "not a regular file" in one_line(result)


def test_chdir_through_a_planted_symlink_is_refused(
    open_dir: Path, secret: Path, as_nobody: Interpreter
):
    link = plant(open_dir / "theirs" / "app", secret.parent)
    result = run_cli(
        "run", "hostile:Echo", "-b", "127.0.0.1:0", "--user", "nobody", "--chdir", str(link),
        cwd=open_dir, interpreter=as_nobody,
    )  # fmt: skip
    assert "refusing to follow the symbolic link app" in one_line(result)


def test_a_pid_file_naming_someone_elses_fake_master_is_stale(
    serve, open_dir: Path, as_nobody: Interpreter
):
    """Anyone can call a process "prefork: master"; only one of ours blocks a start."""
    fake = subprocess.Popen(
        [*DROP_TO_NOBODY, "bash", "-c", 'exec -a "prefork: master [x]" sleep 60'],
    )
    try:
        wait_until(lambda: _cmdline(fake.pid).startswith("prefork: master"), 5)
        pid_file = open_dir / "theirs" / "app.pid"
        pid_file.write_text(f"{fake.pid}\n")
        server = serve(
            "hostile:Echo", "-w", "1", "-b", "127.0.0.1:0", "--user", "nobody",
            "--pid", str(pid_file), cwd=open_dir, interpreter=as_nobody,
        )  # fmt: skip
        server.wait_ready(1)
        assert pid_file.read_text() == f"{server.pid}\n"
    finally:
        fake.kill()
        fake.wait(5)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_modules_the_master_imports_later_never_come_from_the_start_directory(
    serve, open_dir: Path, as_nobody: Interpreter
):
    """Some standard modules are imported only when first needed (importlib.abc for the
    import guard, subprocess and tempfile for an upgrade, shutil through them): with
    --server-class the start directory is first on the master's path by then, and a
    shutil.py the workers' user planted there ran as root."""
    marker = open_dir / "pwned"
    evil = f"open({str(marker)!r}, 'w').write(str(__import__('os').getuid()))\n"
    start_dir = open_dir / "theirs"
    for name in ("shutil", "subprocess", "tempfile", "datetime", "psutil", "tomllib", "random"):
        (start_dir / f"{name}.py").write_text(evil)
        _owned_by_nobody(start_dir / f"{name}.py")
    root_lib = open_dir / "rootlib"
    root_lib.mkdir()
    (root_lib / "rootserver.py").write_text(
        "import socketserver\nclass S(socketserver.TCPServer): pass\n"
    )
    # As the prefork command starts (and USR2 re-executes): without the start directory
    # first on sys.path, which `python -m` would put there.
    command = "import sys; del sys.path[0]; from prefork.cli import main; main()"
    path = os.pathsep.join([as_nobody.path, str(root_lib), str(open_dir)])
    result = subprocess.run(
        [as_nobody.python, "-c", command, "run", "hostile:Echo", "-b", "127.0.0.1:0",
         "--user", "nobody", "--server-class", "rootserver:S", "--check-config"],
        cwd=start_dir, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    assert not marker.exists(), f"nobody's code ran as uid {marker.read_text()}"
    assert result.returncode == 0, result.stderr
    # And a running master, through what makes it import more: USR2 (subprocess,
    # tempfile), HUP, --max-rss (psutil), --max-requests-jitter (random). `python -m` puts
    # the start directory (root's here) first; --pythonpath makes the workers' user's
    # directory the app's.
    server = serve(
        "hostile:Echo", "-w", "1", "-b", "127.0.0.1:0", "--user", "nobody",
        "--server-class", "rootserver:S", "--pythonpath", str(start_dir), "--max-rss", "500",
        "--max-requests", "1000", "--max-requests-jitter", "10",
        cwd=open_dir, interpreter=as_nobody, env={"PYTHONPATH": path},
    )  # fmt: skip
    server.wait_ready(1)
    for sig, done in [
        (signal.SIGUSR2, "reload complete: generation 2"),
        (signal.SIGHUP, "reload complete: generation 3"),
    ]:
        server.signal(sig)
        wait_until(lambda d=done: d in server.log, 30, message=lambda: server.log)
    assert not marker.exists(), f"nobody's code ran as uid {marker.read_text()}"
    assert "refusing to import" not in server.log, server.log
