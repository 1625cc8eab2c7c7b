"""Server classes nobody here wrote, served as they are, each driven by its real client:
xmlrpc.server's SimpleXMLRPCServer (subclasses that register functions in ``__init__``),
http.server's HTTPServer family, wsgiref's WSGIServer and dnslib's DNS servers, from the
CLI (``--server-class``, or named as the app) and from the library, through HUP, USR2 and
TERM under a little load."""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, wait_until
from test_cli import assert_one_line_error
from test_mixin import serving
from test_reload import reload_and_wait

import prefork

SERVERS = '''
import os, socketserver
from xmlrpc.server import SimpleXMLRPCServer, SimpleXMLRPCRequestHandler
from wsgiref.simple_server import WSGIServer


class Rpc(SimpleXMLRPCServer):
    """Its functions registered in __init__, with SimpleXMLRPCServer's own keywords."""

    def __init__(self, address, requestHandler=SimpleXMLRPCRequestHandler):
        super().__init__(address, requestHandler, logRequests=False, allow_none=True)
        self.register_function(pow)
        self.register_function(os.getpid, "pid")
        self.register_function(lambda: None, "nothing")


class Plain(SimpleXMLRPCServer):
    pass


class NoDefaultHandler(socketserver.TCPServer):
    pass


class Broken(socketserver.TCPServer):
    def __init__(self, address, handler=None):
        raise RuntimeError("no database\\nat all")


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("%s %d" % (environ["SERVER_PORT"], os.getpid())).encode()]


class Wsgi(WSGIServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_app(application)
'''

DNS = """
from dnslib.fixedresolver import FixedResolver
from dnslib.server import DNSLogger, UDPServer


class Dns(UDPServer):
    def __init__(self, server_address, handler):
        super().__init__(server_address, handler)
        self.resolver = FixedResolver(". 60 IN A 127.0.0.7")
        self.logger = DNSLogger(logf=lambda text: None)
"""


@pytest.fixture
def servers_app(app_dir: Path) -> Path:
    (app_dir / "servers_app.py").write_text(SERVERS)
    return app_dir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Calls:
    """Client threads calling ``call`` in a loop, bounded in count and time; every
    failure is kept with its exception's type. The count bound is far above what the
    time bound lets them make: a test waits for more calls after a slow step (an
    upgrade), and a budget spent during it (3,000 once did) would fail that wait."""

    def __init__(self, call: Callable[[int], Any], clients: int = 3, limit: int = 60_000) -> None:
        self.call, self.done, self.failures = call, 0, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + 40
        self._threads = [
            threading.Thread(target=self._client, args=(limit // clients,), daemon=True)
            for _ in range(clients)
        ]

    def _client(self, count: int) -> None:
        for i in range(count):
            if self._stop.is_set() or time.monotonic() > self._deadline:
                return
            try:
                self.call(i)
                error = None
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.done += 1
                if error:
                    self.failures.append(error)

    def wait_for(self, count: int) -> None:
        target = self.done + count
        wait_until(lambda: self.done >= target, timeout=20, message=f"{count} more calls")

    def __enter__(self) -> Calls:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def rpc(port: int) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/", allow_none=True)


_AT_CONNECT = ("ConnectionRefusedError", "ConnectionResetError", "RemoteDisconnected")


def wrong_answers(failures: list[str]) -> list[str]:
    """What a final stop must not cost a client: a wrong answer or a fault. A new
    connection is refused once the listener is closed, or reset if it lands in the
    queue as the last worker closes it (a known race of the final stop)."""
    return [f for f in failures if not f.startswith(_AT_CONNECT)]


# -- xmlrpc.server --------------------------------------------------------------------------
def test_xmlrpc_server_class_serves_through_hup_and_term(serve, servers_app: Path) -> None:
    port = free_port()
    server = serve(
        "xmlrpc.server:SimpleXMLRPCRequestHandler",
        "--server-class",
        "servers_app:Rpc",
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
    )
    first = server.wait_ready(2)
    assert rpc(port).pow(2, 10) == 1024
    assert rpc(port).nothing() is None  # allow_none, a SimpleXMLRPCServer keyword
    with Calls(lambda i: rpc(port).pow(i, 2)) as calls:
        calls.wait_for(30)
        reload_and_wait(server, signal.SIGHUP, 2)
        calls.wait_for(30)
    assert calls.failures == [], calls.failures[:5]
    assert rpc(port).pid() not in first  # the new generation answers
    with Calls(lambda i: rpc(port).pow(i, 2)) as calls:
        calls.wait_for(20)
        server.signal(signal.SIGTERM)
        assert server.wait_exit(20) == 0
    assert wrong_answers(calls.failures) == [], calls.failures[:5]


def test_a_server_class_named_as_the_app_is_built_with_its_own_handler(
    serve, servers_app: Path
) -> None:
    """``prefork run servers_app:Rpc``: the master builds it (its code is the master's),
    so a HUP reloads it by re-executing, as with --preload."""
    port = free_port()
    server = serve("servers_app:Rpc", "-w", "2", "-b", f"127.0.0.1:{port}")
    server.wait_ready(2)
    assert rpc(port).pow(3, 3) == 27
    with Calls(lambda i: rpc(port).pow(i, 2)) as calls:
        calls.wait_for(20)
        reload_and_wait(server, signal.SIGHUP, 2)
        calls.wait_for(20)
    assert calls.failures == [], calls.failures[:5]
    assert "the app's code is in the master: reloading by re-executing it" in server.log
    assert rpc(port).pid() != server.pid


def test_a_plain_simplexmlrpcserver_subclass_serves(serve, servers_app: Path) -> None:
    port = free_port()
    server = serve("servers_app:Plain", "-w", "1", "-b", f"127.0.0.1:{port}")
    server.wait_ready(1)
    with pytest.raises(xmlrpc.client.Fault, match='method "anything" is not supported'):
        rpc(port).anything()  # answered by SimpleXMLRPCServer's dispatcher


def test_server_classes_that_cannot_serve_say_so_in_one_line(servers_app: Path) -> None:
    def run(*args: str) -> Any:
        return run_cli("run", *args, "-b", "127.0.0.1:0", cwd=servers_app)

    assert_one_line_error(
        run("servers_app:NoDefaultHandler"),
        "servers_app:NoDefaultHandler needs a request handler class",
    )
    assert_one_line_error(
        run("servers_app:Rpc", "--server-class", "servers_app:Plain"),
        "servers_app:Rpc is a server class, and --server-class names another",
    )
    assert_one_line_error(
        run("xmlrpc.server:SimpleXMLRPCRequestHandler", "--server-class", "servers_app:Broken"),
        "constructing servers_app:Broken for 127.0.0.1:0 failed: RuntimeError: no database at all",
    )
    assert_one_line_error(
        run_cli(
            "run", "apps:Echo", "--server-class", "servers_app:Rpc", "-b", "udp://127.0.0.1:0",
            cwd=servers_app,
        ),
        "--server-class servers_app:Rpc cannot serve a datagram bind",
    )  # fmt: skip
    assert_one_line_error(
        run("apps:Echo", "--server-class", "socketserver:ThreadingTCPServer", "-k", "fork"),
        "--server-class socketserver:ThreadingTCPServer is a ThreadingMixIn server",
    )


def test_library_mixin_passes_socketservers_arguments_by_keyword_and_forwards_the_rest(
    listener: socket.socket,
) -> None:
    from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

    class Rpc(prefork.PreForkMixIn, SimpleXMLRPCServer):
        pass

    server = Rpc(
        ("127.0.0.1", 0),
        SimpleXMLRPCRequestHandler,
        bind_and_activate=False,  # not SimpleXMLRPCServer's third argument, logRequests
        allow_none=True,
        logRequests=False,
        workers=1,
    )
    try:
        assert server.socket.getsockname() == ("0.0.0.0", 0)  # not bound
        assert server.allow_none and not server.logRequests and server.prefork_config.workers == 1
    finally:
        server.server_close()

    adopted = Rpc.from_socket(  # fd://, systemd: a socket bound elsewhere
        listener, SimpleXMLRPCRequestHandler, allow_none=True, logRequests=False, workers=1
    )
    adopted.register_function(lambda: None, "nothing")
    with serving(adopted):
        port = listener.getsockname()[1]
        assert rpc(port).nothing() is None


# -- http.server and wsgiref ----------------------------------------------------------------
def get(port: int, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_httpserver_class_binds_by_prefork_rules_reuse_port_and_unix_file(
    serve, servers_app: Path
) -> None:
    """HTTPServer.server_bind calls TCPServer.server_bind directly, past any mix-in:
    --reuse-port and the Unix socket file must not depend on where PreForkMixIn sits."""
    port = free_port()
    sock_path = servers_app / "http.sock"
    (servers_app / "index.html").write_text("hello")
    args = ["http.server:SimpleHTTPRequestHandler", "--server-class", "http.server:HTTPServer"]
    server = serve(
        *args, "-w", "1", "-b", f"127.0.0.1:{port}", "-b", f"unix:{sock_path}", "--reuse-port"
    )
    server.wait_ready(1)
    assert get(port, "/index.html") == (200, b"hello")
    with socket.socket() as sibling:  # binds only if prefork's socket has SO_REUSEPORT too
        sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sibling.bind(("127.0.0.1", port))
    server.signal(signal.SIGTERM)
    assert server.wait_exit(20) == 0
    assert not sock_path.exists()  # removed at the stop: the next start binds it again
    again = serve(*args, "-w", "1", "-b", f"unix:{sock_path}")
    again.wait_ready(1)


def test_wsgiserver_class_keeps_its_environment_across_usr2(serve, servers_app: Path) -> None:
    """An upgrade adopts the sockets: WSGIServer's server_bind (its environment) must run
    for an adopted socket as for a bound one."""
    port = free_port()
    server = serve(
        "wsgiref.simple_server:WSGIRequestHandler",
        "--server-class",
        "servers_app:Wsgi",
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
    )
    server.wait_ready(2)
    status, body = get(port)
    assert status == 200 and body.split()[0] == str(port).encode()
    with Calls(lambda i: get(port)) as calls:
        calls.wait_for(20)
        reload_and_wait(server, signal.SIGUSR2, 2)
        calls.wait_for(20)
    assert calls.failures == [], calls.failures[:5]
    status, body = get(port)
    assert status == 200 and body.split()[0] == str(port).encode()


# -- dnslib -----------------------------------------------------------------------------------
def dns_query(port: int, name: str = "example.test") -> str:
    from dnslib import DNSRecord

    answer = DNSRecord.parse(DNSRecord.question(name).send("127.0.0.1", port, timeout=5))
    return str(answer.a.rdata)


def test_dnslib_udp_server_serves_through_hup_and_term(serve, servers_app: Path) -> None:
    pytest.importorskip("dnslib")
    (servers_app / "dns_app.py").write_text(DNS)
    port = free_port()
    server = serve(
        "dnslib.server:DNSHandler",
        "--server-class",
        "dns_app:Dns",
        "-w",
        "2",
        "-b",
        f"udp://127.0.0.1:{port}",
    )
    server.wait_ready(2)
    assert dns_query(port) == "127.0.0.7"
    with Calls(lambda i: dns_query(port, f"n{i}.test")) as calls:
        calls.wait_for(30)
        reload_and_wait(server, signal.SIGHUP, 2)
        calls.wait_for(30)
    assert calls.failures == [], calls.failures[:5]
    server.signal(signal.SIGTERM)
    assert server.wait_exit(20) == 0
    # dnslib's own class, with its own two-argument __init__, boots too
    bare = serve(
        "dnslib.server:DNSHandler", "--server-class", "dnslib.server:UDPServer", "-w", "1",
        "-b", f"udp://127.0.0.1:{free_port()}",
    )  # fmt: skip
    bare.wait_ready(1)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


def test_httpserver_handlers_serve_unix_binds_with_a_named_client(serve, servers_app: Path) -> None:
    """socketserver gives a stream Unix handler "" for the client; http.server's
    address_string() indexes it (IndexError on every request)."""
    (servers_app / "index.html").write_text("over unix")
    path = str(servers_app / "http.sock")
    server = serve("http.server:SimpleHTTPRequestHandler", "-w", "1", "-b", f"unix:{path}")
    server.wait_ready(1)
    conn = UnixHTTPConnection(path)
    conn.request("GET", "/index.html")
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"over unix")
    conn.close()
    logged = '"GET /index.html HTTP/1.1" 200'
    wait_until(lambda: logged in server.log, message=lambda: server.log)
    assert "unix: - - [" in server.log
    assert "IndexError" not in server.log


# -- prometheus_client ------------------------------------------------------------------------
def test_prometheus_client_metrics_handler_serves_through_hup_and_term(
    serve, servers_app: Path
) -> None:
    pytest.importorskip("prometheus_client")
    port = free_port()
    server = serve("prometheus_client:MetricsHandler", "-w", "2", "-b", f"127.0.0.1:{port}")
    server.wait_ready(2)
    status, body = get(port, "/metrics")
    assert status == 200 and b"python_info" in body
    with Calls(lambda i: get(port, "/metrics")) as calls:
        calls.wait_for(20)
        reload_and_wait(server, signal.SIGHUP, 2)
        calls.wait_for(20)
        server.signal(signal.SIGTERM)
        assert server.wait_exit(20) == 0
    assert wrong_answers(calls.failures) == [], calls.failures[:5]


# -- the logging cookbook's socket receiver -------------------------------------------------
RECEIVER = '''
import logging, pickle, socketserver, struct


class LogRecordStreamHandler(socketserver.StreamRequestHandler):
    """The logging cookbook's, as it is."""

    def handle(self):
        while True:
            chunk = self.connection.recv(4)
            if len(chunk) < 4:
                break
            slen = struct.unpack(">L", chunk)[0]
            chunk = self.connection.recv(slen)
            while len(chunk) < slen:
                chunk = chunk + self.connection.recv(slen - len(chunk))
            obj = self.unPickle(chunk)
            record = logging.makeLogRecord(obj)
            self.handleLogRecord(record)

    def unPickle(self, data):
        return pickle.loads(data)

    def handleLogRecord(self, record):
        if self.server.logname is not None:
            name = self.server.logname
        else:
            name = record.name
        logger = logging.getLogger(name)
        logger.handle(record)


class LogRecordDatagramHandler(socketserver.DatagramRequestHandler):
    """What logging.handlers.DatagramHandler sends: one length-prefixed pickle."""

    def handle(self):
        record = logging.makeLogRecord(pickle.loads(self.packet[4:]))
        logging.getLogger(record.name).handle(record)


class Receiver(socketserver.ThreadingTCPServer):
    """The cookbook's LogRecordSocketReceiver takes (host, port, handler), not
    socketserver's (address, handler): its state, as a class."""

    allow_reuse_address = True
    logname = None
'''


def test_logging_socket_and_datagram_handlers_reach_the_receiver(serve, servers_app: Path) -> None:
    import logging
    import logging.handlers

    (servers_app / "receiver.py").write_text(RECEIVER)
    tcp, udp = free_port(), free_port()
    stream = serve(
        "receiver:LogRecordStreamHandler", "--server-class", "receiver:Receiver", "-w", "2",
        "-b", f"127.0.0.1:{tcp}",
    )  # fmt: skip
    datagram = serve("receiver:LogRecordDatagramHandler", "-w", "2", "-b", f"udp://127.0.0.1:{udp}")
    stream.wait_ready(2)
    datagram.wait_ready(2)
    sender = logging.getLogger("prefork-test-sender")
    sender.propagate = False
    handlers = [
        logging.handlers.SocketHandler("127.0.0.1", tcp),
        logging.handlers.DatagramHandler("127.0.0.1", udp),
    ]
    try:
        for handler in handlers:
            sender.addHandler(handler)
        sender.warning("first over %s", "both")
        wait_until(lambda: "first over both" in stream.log and "first over both" in datagram.log)
        stream.signal(signal.SIGHUP)
        datagram.signal(signal.SIGHUP)
        for number in range(20):  # during the reloads: a persistent sender, reconnecting
            sender.warning("during the reload %d", number)
        for server in (stream, datagram):
            wait_until(
                lambda server=server: "reload complete: generation 2 serving" in server.log,
                timeout=20,
            )
        sender.warning("after the reload")
        wait_until(lambda: "after the reload" in stream.log and "after the reload" in datagram.log)
    finally:
        for handler in handlers:
            sender.removeHandler(handler)
            handler.close()
