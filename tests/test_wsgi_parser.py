"""The HTTP request reader against gunicorn's request vectors (../shared/http-corpus),
and our own: what is parsed, what is refused, and with which status.

Where we differ from gunicorn on purpose, the case is listed with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT

from prefork.wsgi.parser import BadRequest, Limits, Request, RequestReader

CORPUS = ROOT.parent / "shared" / "http-corpus" / "gunicorn"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="no ../shared/http-corpus here")

# Valid to gunicorn, refused by us (llhttp's strictness, or RFC 9112's "reject").
REFUSED_ON_PURPOSE = {
    "009": "Content-Length with Transfer-Encoding: refused (RFC 9112 6.3, smuggling)",
    "013": "chunk extensions with a space after ';': llhttp refuses them",
    "027": "bytes outside ASCII in the target: llhttp refuses them",
    "031": "a method llhttp does not know (-BLARGH): refused",
    "031compat": "as 031",
    "031compat2": "as 031",
    "compat_obs_fold": "obs-fold: refused (RFC 9112 5.2 allows it, smuggling)",
    "compat_obs_fold_huge": "as compat_obs_fold",
    "028": "a space before the colon: refused (RFC 9112 5.1 says so)",
    "rfc9112_target_authority_connect_01": "CONNECT is not served (405)",
    "rfc9112_target_authority_ipv6_01": "as the other CONNECT",
    "099": "the file holds 8,599 of the body's 17,914 bytes: cut short, refused at the end",
}
# Cases whose first request is served, then the connection ends (what follows is not).
ENDS_AFTER_FIRST = {
    "019": "data after Connection: close is not read",
    "021": "as 019",
}
# gunicorn options for things that are not parsing (PROXY protocol: issue 17; header_map).
NOT_PARSER = {"proxy_protocol", "forwarded_allow_ips", "header_map", "secure_scheme_headers"}
# Invalid to gunicorn, served by us: say why.
SERVED_ON_PURPOSE = {
    "rfc9110_trailer_forbidden_host_01": "trailers are read and dropped, never passed on",
    "rfc9110_trailer_forbidden_cl_01": "as the Host trailer",
    "rfc9110_trailer_forbidden_te_01": "as the Host trailer",
    "008": "an 8,189-byte field line: within --limit-request-field-size (name, ': ', value)",
    "012": "a 97-byte field line under a limit of 98: gunicorn counts more than the line",
}


DEFAULTS = Limits()


def _read(raw: bytes, limits: Limits = DEFAULTS, chunk: int = 0) -> list[Request | BadRequest]:
    reader = RequestReader(limits)
    pieces = [raw[i : i + chunk] for i in range(0, len(raw), chunk)] if chunk else [raw]
    for piece in pieces:
        reader.feed(piece)
    reader.feed_eof()
    return list(reader.pending)


def _limits(settings: dict) -> Limits:
    return Limits(
        settings.get("limit_request_line") or 4094,
        settings.get("limit_request_fields") or 100,
        settings.get("limit_request_field_size") or 8190,
    )


def _bytes(value: object) -> bytes:
    if isinstance(value, dict):
        return value["latin1"].encode("latin-1")
    return str(value).encode("latin-1")


def _lacks_host(want: dict) -> bool:
    hosts = [n for n, _ in want["headers"] if _bytes(n).lower() == b"host"]
    return want["version"] == [1, 1] and len(hosts) != 1


def _other_coding(want: dict) -> bool:
    codings = [
        _bytes(v).lower() for n, v in want["headers"] if _bytes(n).lower() == b"transfer-encoding"
    ]
    return bool(codings) and codings != [b"chunked"]


def _cases(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).glob("*.raw")) if CORPUS.is_dir() else []


@needs_corpus
@pytest.mark.parametrize("case", _cases("valid"), ids=lambda p: p.stem)
@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_gunicorns_valid_requests(case: Path, chunk: int) -> None:
    spec = json.loads(case.with_suffix(".json").read_text())
    if NOT_PARSER & set(spec["settings"]):
        pytest.skip("needs a gunicorn option that is not about parsing")
    got = _read(case.read_bytes(), _limits(spec["settings"]), chunk)
    if case.stem in REFUSED_ON_PURPOSE:
        assert any(isinstance(item, BadRequest) for item in got), REFUSED_ON_PURPOSE[case.stem]
        return
    expected = spec["expected"]
    if any(_lacks_host(want) or _other_coding(want) for want in expected):
        # RFC 9112 3.2: a request without Host "MUST" get a 400; 6.1: a transfer coding
        # we do not decode gets a 501 (gunicorn serves both)
        errors = [item for item in got if isinstance(item, BadRequest)]
        assert errors and errors[0].status in (400, 501), got
        return
    if case.stem in ENDS_AFTER_FIRST:
        expected = expected[:1]
        got = got[:1]
    requests = [item for item in got if isinstance(item, Request)]
    assert len(requests) == len(expected), got
    for request, want in zip(requests, expected, strict=True):
        assert request.method == want["method"]
        assert request.target == _bytes(want["uri"]["raw"])
        assert request.version == "{}.{}".format(*want["version"])
        names = [(n.lower(), v) for n, v in request.headers]
        wanted = [(_bytes(n).lower(), _bytes(v)) for n, v in want["headers"]]
        assert names == [(n, v) for n, v in wanted if b"_" not in n]
        assert bytes(request.body) == _bytes(want["body"])
        assert request.complete


@needs_corpus
@pytest.mark.parametrize("case", _cases("invalid"), ids=lambda p: p.stem)
@pytest.mark.parametrize("chunk", [0, 3])
def test_gunicorns_invalid_requests_are_refused(case: Path, chunk: int) -> None:
    spec = json.loads(case.with_suffix(".json").read_text())
    if NOT_PARSER & set(spec["settings"]):
        pytest.skip("needs a gunicorn option that is not about parsing")
    if spec["settings"].get("limit_request_field_size") == 0:
        pytest.skip("gunicorn's 0 means its own default; ours refuses 0 as a setting")
    got = _read(case.read_bytes(), _limits(spec["settings"]), chunk)
    if case.stem in SERVED_ON_PURPOSE:
        return
    assert any(isinstance(item, BadRequest) for item in got), (spec["expected"], got)
    first_bad = next(i for i, item in enumerate(got) if isinstance(item, BadRequest))
    # A request before the bad one was complete in itself (pipelined), or carries the
    # error its body broke off with: never served as if whole.
    assert all(isinstance(r, Request) and (r.complete or r.error) for r in got[:first_bad])


# Our own: (name, raw request, the status it must get)
REFUSED = [
    ("cl and te", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te and cl", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 3\r\n\r\n0\r\n\r\n", 400),
    ("two content-lengths", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
     b"Content-Length: 4\r\n\r\nabcd", 400),
    ("same content-length twice", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
     b"Content-Length: 3\r\n\r\nabc", 400),
    ("content-length not a number",
     b"POST / HTTP/1.1\r\n"
     b"Host: a\r\nContent-Length: 3a\r\n\r\n", 400),
    ("content-length with a sign",
     b"POST / HTTP/1.1\r\n"
     b"Host: a\r\nContent-Length: +3\r\n\r\nabc", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    ("bare cr", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400),
    ("bare lf in the request line", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    ("space in a name", b"GET / HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n", 400),
    ("space before the colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n", 400),
    ("nul in a value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", 400),
    ("gzip coding", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("chunked twice",
     b"POST / HTTP/1.1\r\n"
     b"Host: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
    ("unknown coding", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 501),
    ("te in http/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("bad chunk size",
     b"POST / HTTP/1.1\r\n"
     b"Host: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("no host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("two content-types", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Type: a/b\r\n"
     b"Content-Type: c/d\r\n\r\n", 400),
    ("http/2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("http/0.9", b"GET /\r\n\r\n", 505),
    ("asterisk not options", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target not a path", b"GET index.html HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    ("long target", b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    ("long field", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: " + b"b" * 9000 + b"\r\n\r\n", 431),
    ("many fields", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    ("endless field", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: " + b"b" * 2_000_000, 431),
    ("cut head", b"GET / HTTP/1.1\r\nHost: a\r\n", 400),
    ("cut body", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc", 400),
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
]  # fmt: skip


@pytest.mark.parametrize(("name", "raw", "status"), REFUSED, ids=[r[0] for r in REFUSED])
@pytest.mark.parametrize("chunk", [0, 1, 5])
def test_malformed_and_smuggling_requests_get_their_status(
    name: str, raw: bytes, status: int, chunk: int
) -> None:
    got = _read(raw, chunk=chunk if len(raw) < 20000 else 65536)
    errors = [item for item in got if isinstance(item, BadRequest)]
    assert errors, got
    assert errors[0].status == status, errors[0].reason
    for item in got:  # a request whose head was accepted before is marked broken
        if isinstance(item, Request) and not item.complete:
            assert item.error is not None


def test_pipelined_requests_come_in_order_with_their_bodies() -> None:
    raw = (
        b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Trailer: dropped\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: a\r\nX_Under: dropped\r\n\r\n"
    )
    for chunk in (0, 1, 4):
        got = _read(raw, chunk=chunk)
        assert [(r.target, bytes(r.body)) for r in got] == [  # type: ignore[union-attr]
            (b"/1", b"hello"), (b"/2", b"abc"), (b"/3", b""),
        ]  # fmt: skip
        assert got[1].headers == [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")]  # type: ignore[union-attr]
        assert got[2].headers == [(b"Host", b"a")]  # type: ignore[union-attr]


def test_a_bad_request_after_good_ones_comes_after_them() -> None:
    got = _read(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
    assert isinstance(got[0], Request) and got[0].target == b"/1"
    assert isinstance(got[1], BadRequest) and got[1].status == 400
