"""WSGI apps served by ``prefork run MODULE:APP``, driven by real clients over loopback:
http.client, curl, raw sockets for what clients do not send."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, wait_until
from test_cli import assert_one_line_error

APP = r"""
import hashlib, json, os, time

CALLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")


def app(environ, start_response):
    with open(CALLS, "a") as calls:
        calls.write(environ["PATH_INFO"] + "\n")
    path = environ["PATH_INFO"]
    if path == "/fail":
        raise RuntimeError("the app failed")
    if path == "/slow":
        time.sleep(float(environ.get("QUERY_STRING") or "0.5"))
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"part %d\n" % n for n in range(3))
    if path == "/file":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](open(environ["QUERY_STRING"], "rb"))
    if path == "/noread":
        start_response("401 Unauthorized", [("Content-Length", "0")])
        return []
    if path == "/errors":
        environ["wsgi.errors"].write("a line for the log\n")
    body = environ["wsgi.input"].read()
    answer = {
        "method": environ["REQUEST_METHOD"], "path": path,
        "query": environ["QUERY_STRING"], "script_name": environ["SCRIPT_NAME"],
        "remote_addr": environ["REMOTE_ADDR"], "scheme": environ["wsgi.url_scheme"],
        "protocol": environ["SERVER_PROTOCOL"], "content_length": environ.get("CONTENT_LENGTH"),
        "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
        "body_length": len(body), "body_sha": hashlib.sha256(body).hexdigest(),
        "pid": os.getpid(),
    }
    data = json.dumps(answer).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]
"""


@pytest.fixture
def wsgi_app(app_dir: Path) -> Path:
    (app_dir / "wsgiapp.py").write_text(APP)
    return app_dir


def calls(app_dir: Path) -> list[str]:
    path = app_dir / "calls.log"
    return path.read_text().split() if path.exists() else []


def start(serve: Any, listener: socket.socket, *options: str, workers: int = 1) -> Any:
    server = serve("wsgiapp:app", "-w", str(workers), *options, listen_on=listener)
    server.wait_ready(workers)
    return server


def connect(listener: socket.socket) -> http.client.HTTPConnection:
    host, port = listener.getsockname()
    return http.client.HTTPConnection(host, port, timeout=10)


def ask(listener: socket.socket, path: str, **kw: Any) -> dict:
    """One request on a connection of its own: the app's JSON answer."""
    conn = connect(listener)
    try:
        return get_json(conn, path, **kw)[1]
    finally:
        conn.close()


def get_json(conn: http.client.HTTPConnection, path: str, **kw: Any) -> tuple[Any, dict]:
    conn.request(kw.pop("method", "GET"), path, **kw)
    response = conn.getresponse()
    return response, json.loads(response.read())


def raw_exchange(listener: socket.socket, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(listener.getsockname(), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_keep_alive_reuses_one_connection_in_thread_workers(serve, listener, wsgi_app):
    start(serve, listener, "-k", "thread")
    conn = connect(listener)
    response, first = get_json(conn, "/one?a=1")
    sock = conn.sock
    assert response.status == 200 and response.getheader("Connection") is None
    _, second = get_json(conn, "/two", method="POST", body=b"x" * 100)
    assert conn.sock is sock  # the same connection
    assert (first["path"], first["query"], second["body_length"]) == ("/one", "a=1", 100)
    assert first["headers"]["HTTP_HOST"].startswith("127.0.0.1")
    assert first["protocol"] == "HTTP/1.1" and first["remote_addr"] == "127.0.0.1"
    conn.close()


def test_a_sync_worker_serves_one_request_per_connection(serve, listener, wsgi_app):
    start(serve, listener)
    conn = connect(listener)
    response, _ = get_json(conn, "/")
    assert response.getheader("Connection") == "close"
    conn.close()


@pytest.mark.parametrize("worker", ["sync", "thread", "fork"])
def test_chunked_and_big_uploads_arrive_whole(serve, listener, wsgi_app, worker):
    start(serve, listener, "-k", worker)
    body = bytes(range(256)) * 4096  # 1 MB
    conn = connect(listener)
    _, answer = get_json(conn, "/up", method="POST", body=iter([body[:1000], body[1000:]]),
                         encode_chunked=True, headers={"Transfer-Encoding": "chunked"})  # fmt: skip
    assert answer["body_length"] == len(body)
    assert answer["body_sha"] == hashlib.sha256(body).hexdigest()
    conn.close()
    conn = connect(listener)
    _, answer = get_json(conn, "/up", method="PUT", body=body)
    assert (answer["body_length"], answer["content_length"]) == (len(body), str(len(body)))
    conn.close()


def test_expect_100_continue_is_answered_when_the_app_reads(serve, listener, wsgi_app):
    start(serve, listener, "-k", "thread")
    with socket.create_connection(listener.getsockname(), timeout=10) as sock:
        sock.sendall(b"POST /read HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")  # fmt: skip
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200 OK") and b'"body_length": 5' in reply
    # An app that answers without reading: no 100 Continue, and the connection ends.
    reply = raw_exchange(listener, b"POST /noread HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                                   b"Expect: 100-continue\r\n\r\n")  # fmt: skip
    assert reply.startswith(b"HTTP/1.1 401 Unauthorized") and b"100 Continue" not in reply
    assert b"Connection: close" in reply


def test_head_stream_and_errors(serve, listener, wsgi_app, app_dir: Path):
    server = start(serve, listener, "-k", "thread")
    conn = connect(listener)
    conn.request("HEAD", "/head")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b""
    assert int(response.getheader("Content-Length")) > 0  # what a GET would have
    conn.request("GET", "/stream")
    response = conn.getresponse()
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.read() == b"part 0\npart 1\npart 2\n"
    conn.request("GET", "/fail")
    response = conn.getresponse()
    assert response.status == 500 and response.read() == b"500 Internal Server Error\n"
    conn.close()
    ask(listener, "/errors")
    wait_until(lambda: "RuntimeError: the app failed" in server.log)
    wait_until(lambda: "a line for the log" in server.log)


def test_http_1_0_clients_get_framed_or_closed_responses(serve, listener, wsgi_app):
    start(serve, listener, "-k", "thread")
    reply = raw_exchange(listener, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"chunked" not in head and b"Connection: close" in head
    assert body == b"part 0\npart 1\npart 2\n"


def test_sendfile_sends_a_file_wrapper_whole(serve, listener, wsgi_app, app_dir: Path):
    big = app_dir / "big.bin"
    big.write_bytes(bytes(range(256)) * 12288)  # 3 MB
    start(serve, listener, "-k", "thread")
    conn = connect(listener)
    conn.request("GET", f"/file?{big}")
    response = conn.getresponse()
    assert response.getheader("Content-Length") == str(big.stat().st_size)
    assert response.read() == big.read_bytes()
    _, answer = get_json(conn, "/after")  # the connection is still good
    assert answer["path"] == "/after"
    conn.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_keep_alive_and_upload(serve, listener, wsgi_app, app_dir: Path):
    start(serve, listener, "-k", "thread")
    host, port = listener.getsockname()
    upload = app_dir / "upload.bin"
    upload.write_bytes(b"z" * 200_000)
    result = subprocess.run(
        ["curl", "-sS", "-v", f"http://{host}:{port}/a", f"http://{host}:{port}/b",
         "-F", f"file=@{upload}"],
        capture_output=True, timeout=30, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Re-using existing connection" in result.stderr or "reusing" in result.stderr.lower()
    answers = [json.loads(line) for line in result.stdout.replace("}{", "}\n{").splitlines()]
    assert answers[0]["path"] == "/a" and answers[1]["body_length"] > 200_000


REFUSED = [
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
]


def test_malformed_requests_get_a_status_and_never_reach_the_app(
    serve, listener, wsgi_app, app_dir: Path
):
    server = start(serve, listener, "-k", "thread")
    for raw, status in REFUSED:
        reply = raw_exchange(listener, raw)
        assert reply.startswith(b"HTTP/1.1 %d " % status), (raw[:60], reply[:100])
        assert b"Connection: close" in reply
    # Smuggling: a second request hidden in a body whose length is disputed never runs.
    raw_exchange(listener, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                           b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")  # fmt: skip
    assert calls(app_dir) == []
    assert server.proc.poll() is None and "Traceback" not in server.log


def test_pipelined_requests_are_answered_in_order(serve, listener, wsgi_app):
    start(serve, listener, "-k", "thread")
    requests = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    reply = raw_exchange(listener, requests)
    paths = [json.loads(part.partition(b"\r\n\r\n")[2])["path"]
             for part in reply.split(b"HTTP/1.1 200 OK")[1:]]  # fmt: skip
    assert paths == ["/1", "/2", "/3"]


def test_forwarded_headers_are_believed_from_allowed_proxies_only(serve, listener, wsgi_app):
    start(serve, listener, "-k", "thread")
    headers = {"X-Forwarded-For": "203.0.113.9, 10.0.0.1", "X-Forwarded-Proto": "https"}
    answer = ask(listener, "/", headers=headers)
    assert (answer["remote_addr"], answer["scheme"]) == ("10.0.0.1", "https")


def test_forwarded_headers_are_ignored_from_other_peers(serve, listener, wsgi_app):
    start(serve, listener, "-k", "thread", "--forwarded-allow-ips", "10.9.9.9")
    headers = {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=1.2.3.4;proto=https"}
    answer = ask(listener, "/", headers=headers)
    assert (answer["remote_addr"], answer["scheme"]) == ("127.0.0.1", "http")
    assert answer["headers"]["HTTP_X_FORWARDED_FOR"] == "203.0.113.9"  # passed on as it came


def test_root_path_sets_script_name(serve, listener, wsgi_app):
    start(serve, listener, "-k", "thread", "--root-path", "/app")
    answer = ask(listener, "/app/inner%20x?q=1")
    assert (answer["script_name"], answer["path"]) == ("/app", "/inner x")


def test_term_with_keep_alive_clients_ends_at_once_and_cuts_no_request(serve, listener, wsgi_app):
    """Idle kept-alive connections are closed at once; the request in progress is
    answered (with Connection: close): the stop does not wait for --graceful-timeout."""
    server = start(serve, listener, "-k", "thread", "--graceful-timeout", "20", workers=2)
    idle = [connect(listener) for _ in range(6)]
    for conn in idle:
        get_json(conn, "/warm")
    busy = connect(listener)
    result: dict[str, Any] = {}

    def slow_request() -> None:
        busy.request("GET", "/slow?1.0")
        response = busy.getresponse()
        result["status"], result["connection"] = response.status, response.getheader("Connection")
        result["body"] = response.read()

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_until(lambda: "/slow" in calls(Path(server.log_path).parent))
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0
    took = time.monotonic() - started
    thread.join(10)
    busy.close()
    assert result["status"] == 200 and result["connection"] == "close"
    assert json.loads(result["body"])["path"] == "/slow"
    assert took < 5, f"the stop took {took:.1f}s"
    for conn in idle:
        conn.close()


def test_the_access_log_has_a_combined_line_per_request_escaped(
    serve, listener, wsgi_app, app_dir: Path
):
    log = app_dir / "access.log"
    start(serve, listener, "-k", "thread", "--access-log", str(log))
    conn = connect(listener)
    get_json(conn, "/one?x=1", headers={"User-Agent": 'evil" agent', "Referer": "http://r/"})
    get_json(conn, "/two", method="POST", body=b"abc")
    conn.close()
    raw_exchange(listener, b"GET / HTTP/1.1\r\n\r\n")  # refused: no Host
    wait_until(lambda: log.exists() and log.read_text().count("\n") == 3)
    one, two, refused = log.read_text().splitlines()
    pattern = (
        r"127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "
        r'"GET /one\?x=1 HTTP/1\.1" 200 \d+ "http://r/" "evil\\" agent"'
    )
    assert re.fullmatch(pattern, one), one
    assert '"POST /two HTTP/1.1" 200' in two
    assert re.search(r'"-" 400 - "-" "-"$', refused), refused


def test_access_log_format_and_json(serve, listener, wsgi_app, app_dir: Path):
    log = app_dir / "access.log"
    fmt = "%(m)s %(U)s %(s)s %({x-req}i)s %({content-type}o)s %(D)sus"  # U: decoded
    start(serve, listener, "-k", "thread", "--access-log", str(log), "--access-log-format", fmt)
    ask(listener, "/p%1b[31m", headers={"X-Req": "abc"})
    wait_until(lambda: log.exists() and log.read_text().strip())
    assert re.fullmatch(r"GET /p\\x1b\[31m 200 abc application/json \d+us\n", log.read_text())


def test_access_log_as_json(serve, listener, wsgi_app, app_dir: Path):
    log = app_dir / "access.log"
    start(serve, listener, "-k", "thread", "--access-log", str(log), "--log-format", "json")
    ask(listener, "/j?k=v")
    wait_until(lambda: log.exists() and log.read_text().strip())
    line = json.loads(log.read_text())
    assert (line["method"], line["path"], line["query"], line["status"]) == (
        "GET",
        "/j",
        "k=v",
        200,
    )


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--access-log-format", "%(h"], "access_log_format"),
        (["--forwarded-allow-ips", "10.0.0.1,nonsense"], "'nonsense' is not an IP address"),
        (["--limit-request-line", "0"], "limit_request_line must be at least 1"),
        (["-b", "udp://127.0.0.1:0"], "WSGI"),
    ],
)
def test_bad_wsgi_settings_are_one_line(wsgi_app: Path, options: list[str], says: str):
    result = run_cli("run", "wsgiapp:app", "-b", "127.0.0.1:0", *options, cwd=wsgi_app)
    assert_one_line_error(result, says)


EXC_INFO = """
import sys


def app(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    if environ["PATH_INFO"] == "/late":
        write(b"half a body")  # the head is out: exc_info must now re-raise
    try:
        raise ValueError("went wrong after start_response")
    except ValueError:
        start_response("503 Try Later", [("Content-Type", "text/plain")], sys.exc_info())
    return [b"sorry\\n"]
"""


def test_start_response_with_exc_info_replaces_an_unsent_response(serve, listener, app_dir):
    """PEP 3333: start_response(..., exc_info) replaces what was not sent yet, and once
    the head is out re-raises: the connection then ends, the response cut."""
    (app_dir / "excapp.py").write_text(EXC_INFO)
    server = serve("excapp:app", "-w", "1", "-k", "thread", listen_on=listener)
    server.wait_ready(1)
    reply = raw_exchange(listener, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503 Try Later\r\n") and reply.endswith(b"\r\n\r\nsorry\n")
    reply = raw_exchange(listener, b"GET /late HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"half a body" in reply
    assert b"sorry" not in reply and not reply.endswith(b"0\r\n\r\n")  # cut, not ended
    wait_until(lambda: "went wrong after start_response" in server.log)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR2])
def test_a_reload_with_keep_alive_clients_retires_the_old_workers_at_once(
    serve, listener, wsgi_app, signum: int
):
    """Idle kept-alive connections hold no old worker: after a HUP or USR2 they are
    closed, the old generation leaves long before --graceful-timeout, and a client
    reconnecting is served by the new one."""
    server = start(serve, listener, "-k", "thread", "--graceful-timeout", "30", workers=2)
    old = set(server.worker_pids())
    idle = [connect(listener) for _ in range(6)]
    try:
        old_pids = {get_json(conn, "/warm")[1]["pid"] for conn in idle}
        assert old_pids <= old
        started = time.monotonic()
        server.signal(signum)
        wait_until(lambda: "reload complete: generation 2 serving" in server.log, timeout=20)
        wait_until(lambda: old.isdisjoint(server.worker_pids()), timeout=10)
        assert time.monotonic() - started < 10
        answer = ask(listener, "/after")
        assert answer["pid"] not in old
    finally:
        for conn in idle:
            conn.close()
    assert server.proc.poll() is None


# Our conformance corpus: a valid request, and what the app must see of it.
ENVIRONS = [
    (b"GET /a%20b/%C3%A9?x=1&y=%20 HTTP/1.1\r\nHost: h\r\n\r\n",
     {"path": "/a b/\xc3\xa9", "query": "x=1&y=%20", "protocol": "HTTP/1.1"}),
    (b"GET /a%2Fb HTTP/1.1\r\nHost: h\r\n\r\n", {"path": "/a/b"}),
    (b"GET http://example.com/p?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
     {"path": "/p", "query": "q=1"}),
    (b"GET /frag#part HTTP/1.1\r\nHost: h\r\n\r\n", {"path": "/frag", "query": ""}),
    (b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", {"method": "OPTIONS", "path": "*"}),
    (b"GET /old HTTP/1.0\r\n\r\n", {"protocol": "HTTP/1.0", "headers": {}}),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-Many: 1\r\nX-Many: 2\r\nX_Under: no\r\n"
     b"X-Space:   padded \t \r\n\r\n",
     {"headers": {"HTTP_HOST": "h", "HTTP_X_MANY": "1,2", "HTTP_X_SPACE": "padded"}}),
    (b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
     b"hello", {"content_length": "5", "body_length": 5, "headers": {"HTTP_HOST": "h"}}),
    (b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n",
     {"content_length": None, "body_length": 5,
      "headers": {"HTTP_HOST": "h", "HTTP_TRANSFER_ENCODING": "chunked"}}),
    (b"GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: caf\xe9\r\n\r\n",
     {"headers": {"HTTP_HOST": "h", "HTTP_USER_AGENT": "caf\xe9"}}),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), ENVIRONS, ids=[str(i) for i in range(len(ENVIRONS))])
def test_a_valid_request_gives_the_app_its_environ(
    serve, listener, wsgi_app, raw: bytes, expected: dict
):
    start(serve, listener, "-k", "thread", "--forwarded-allow-ips", "10.9.9.9")
    reply = _one_exchange(listener, raw)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), reply[:200]
    answer = json.loads(body)
    for key, value in expected.items():
        assert answer[key] == value, (key, answer)


def _one_exchange(listener: socket.socket, raw: bytes) -> bytes:
    """Send one request and read its one response (by its Content-Length)."""
    with socket.create_connection(listener.getsockname(), timeout=10) as sock:
        sock.sendall(raw)
        reader = sock.makefile("rb")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = reader.readline()
            if not line:
                break
            head += line
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        return head + reader.read(length)


def test_keep_alive_0_says_close_on_every_response(serve, listener, wsgi_app):
    start(serve, listener, "-k", "thread", "--keep-alive", "0")
    conn = connect(listener)
    response, _ = get_json(conn, "/")
    assert response.getheader("Connection") == "close"
    conn.close()
