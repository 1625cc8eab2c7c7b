"""TimedConnection on real loopback sockets: every byte a handler writes arrives, in
whatever buffer it is given, and the client timeout bounds waiting on reads and writes."""

from __future__ import annotations

import array
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from prefork.listeners import set_client_timeout
from prefork.workers.connection import ClientTimeout, accept_on, timed_connection


def pair(limit: float, deferred: bool = False) -> tuple[socket.socket, socket.socket]:
    """(server side as a TimedConnection accepted the way workers accept, client side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        set_client_timeout(listener, limit)
        client = socket.create_connection(listener.getsockname(), timeout=15)
        accept = accept_on(listener, timed_connection(limit, deferred), None)
        server, _ = accept()
    return server, client


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = pair(2.0)
    with server, client:
        yield server, client


def read_all(client: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = client.recv(1 << 16)
        assert chunk, "the connection ended early"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "data",
    [
        b"short line\n",
        bytearray(b"a bytearray\n"),
        memoryview(b"0123456789")[2:7],
        array.array("i", range(1000)),  # len() is items, not bytes
        bytes(range(256)) * 40_000,  # 10 MB: more than the send buffer takes at once
    ],
    ids=["bytes", "bytearray", "memoryview", "array", "large"],
)
def test_sendall_delivers_every_byte(connection, data) -> None:
    server, client = connection
    expected = bytes(memoryview(data).cast("B"))
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(read_all(client, len(expected))))
    reader.start()
    server.sendall(data)
    reader.join(timeout=30)
    assert received == [expected]


def test_a_reader_that_stops_reading_ends_the_write(connection) -> None:
    server, client = connection  # the client reads nothing: the send buffer fills
    started = time.monotonic()
    with pytest.raises(ClientTimeout):
        server.sendall(b"x" * (64 << 20))
    assert time.monotonic() - started < 10  # ~2 s, the client timeout


def test_reads_take_what_is_there_and_time_out_on_silence(connection) -> None:
    server, client = connection
    client.sendall(b"hello")
    assert server.recv(100) == b"hello"
    buffer = bytearray(100)
    client.sendall(b"again")
    assert server.recv_into(buffer) == 5 and buffer[:5] == b"again"
    started = time.monotonic()
    with pytest.raises(ClientTimeout, match="silent"):
        server.recv(100)
    assert 1.5 < time.monotonic() - started < 10


def test_a_deferred_first_read_does_not_wait() -> None:
    server, client = pair(5.0, deferred=True)
    with server, client:
        started = time.monotonic()
        with pytest.raises(ClientTimeout, match="deferral"):
            server.recv(100)  # the client sent nothing: under deferral it has been silent
        assert time.monotonic() - started < 1
        client.sendall(b"late")  # later reads wait as usual
        assert server.recv(100) == b"late"


def test_a_handlers_non_blocking_socket_gets_eagain(connection) -> None:
    server, _ = connection
    server.setblocking(False)
    with pytest.raises(BlockingIOError) as raised:
        server.recv(100)
    assert not isinstance(raised.value, ClientTimeout)
    with pytest.raises(BlockingIOError) as raised:
        server.sendall(b"x" * (64 << 20))
    assert not isinstance(raised.value, ClientTimeout)
