"""Bind parsing is pure: a table of cases, plus hypothesis for the error contract."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefork.errors import BindError
from prefork.listeners import BindSpec, describe_address, parse_bind


@pytest.mark.parametrize(
    ("text", "kind", "address"),
    [
        ("127.0.0.1:8000", "tcp", ("127.0.0.1", 8000)),
        ("tcp://127.0.0.1:0", "tcp", ("127.0.0.1", 0)),
        ("localhost:65535", "tcp", ("localhost", 65535)),
        (":8000", "tcp", ("0.0.0.0", 8000)),
        ("[::1]:8080", "tcp", ("::1", 8080)),
        ("[::]:1", "tcp", ("::", 1)),
        ("udp://127.0.0.1:53", "udp", ("127.0.0.1", 53)),
        ("udp://[::1]:5353", "udp", ("::1", 5353)),
        ("unix:/run/app.sock", "unix", "/run/app.sock"),
        ("unix:relative.sock", "unix", "relative.sock"),
        ("unix:@abstract", "unix", "\0abstract"),
        ("unix-dgram:/run/app.dgram", "unix-dgram", "/run/app.dgram"),
        ("fd://3", "fd", 3),
    ],
)
def test_parse_bind(text: str, kind: str, address: object) -> None:
    assert parse_bind(text) == BindSpec(kind, address, text)  # type: ignore[arg-type]


def test_family_and_stream() -> None:
    assert parse_bind("[::1]:1").family == socket.AF_INET6
    assert parse_bind("127.0.0.1:1").family == socket.AF_INET
    assert parse_bind("unix-dgram:x").family == socket.AF_UNIX
    assert parse_bind("unix:x").stream and not parse_bind("udp://1.2.3.4:5").stream


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("127.0.0.1:notaport", "port must be a number from 0 to 65535"),
        ("127.0.0.1:70000", "port must be a number from 0 to 65535"),
        ("127.0.0.1:-1", "port must be a number"),
        ("127.0.0.1:", "port must be a number"),
        ("999.1.1.1:80", "'999.1.1.1' is not a valid IP address"),
        ("1.2.3:80", "is not a valid IP address"),
        ("[::zz]:80", "is not a valid IP address"),
        ("::1:80", "put an IPv6 address in brackets"),
        ("[::1]80", "expected [IPV6]:PORT"),
        ("8000", "expected HOST:PORT"),
        ("ftp://host:21", "unknown scheme"),
        ("bad host:80", "is not a host name or address"),
        ("unix:", "the Unix socket path is empty"),
        ("fd://three", "expected fd://N"),
        ("fd://", "expected fd://N"),
    ],
)
def test_bad_binds_name_the_value(text: str, complaint: str) -> None:
    with pytest.raises(BindError) as caught:
        parse_bind(text)
    assert complaint in str(caught.value)
    assert repr(text) in str(caught.value)
    assert "\n" not in str(caught.value)


@given(st.text(max_size=60))
def test_any_text_parses_or_fails_with_one_line_naming_it(text: str) -> None:
    try:
        spec = parse_bind(text)
    except BindError as exc:
        assert "\n" not in str(exc).replace(repr(text), "")
        assert repr(text) in str(exc)
    else:
        assert spec.text == text


@given(st.integers(min_value=0, max_value=65535), st.tuples(*[st.integers(0, 255)] * 4))
def test_every_ipv4_address_and_port_round_trips(port: int, octets: tuple[int, ...]) -> None:
    host = ".".join(map(str, octets))
    assert parse_bind(f"{host}:{port}").address == (host, port)
    assert parse_bind(f"udp://{host}:{port}").kind == "udp"


@pytest.mark.parametrize(
    ("address", "sock_type", "text"),
    [
        (("127.0.0.1", 8000), socket.SOCK_STREAM, "127.0.0.1:8000"),
        (("::1", 8000, 0, 0), socket.SOCK_STREAM, "[::1]:8000"),
        (("127.0.0.1", 53), socket.SOCK_DGRAM, "udp://127.0.0.1:53"),
        ("/run/app.sock", socket.SOCK_STREAM, "unix:/run/app.sock"),
        ("\0abstract", socket.SOCK_DGRAM, "unix-dgram:@abstract"),
        (b"/run/bytes.sock", socket.SOCK_STREAM, "unix:/run/bytes.sock"),
    ],
)
def test_describe_address_uses_the_bind_syntax(address, sock_type, text) -> None:
    class Bound:
        server_address = address
        socket = type("Sock", (), {"type": sock_type})()

    assert describe_address(Bound()) == text
    if not text.startswith("unix-dgram:@") and "[" not in text:
        assert parse_bind(text).text == text  # and that syntax parses back
