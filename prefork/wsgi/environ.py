"""The WSGI environ of a request (PEP 3333), and which proxies are believed.

What is the same for every request of a server (its name and port, SCRIPT_NAME, the
wsgi.* keys) is made once per server (``ServerEnviron``); a request copies it and adds
its own.

**Behind a proxy** (``--forwarded-allow-ips``, gunicorn's name and default: loopback
only; ``*`` believes every peer): only when the connection comes from one of those
addresses are ``X-Forwarded-Proto``/``X-Forwarded-For`` and ``Forwarded`` believed.
``wsgi.url_scheme`` then follows the proxy's ``proto``, and ``REMOTE_ADDR`` becomes the
nearest address in the chain that is not itself an allowed proxy (reading from the
right: what the client wrote on the left could be anything). From any other peer the
headers are passed on to the app as they came, and believed for nothing.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import unquote_to_bytes

from .parser import Request


class Proxies:
    """The addresses --forwarded-allow-ips believes: exact ones, networks, or all."""

    def __init__(self, allowed: str) -> None:
        parts = [part.strip() for part in allowed.split(",") if part.strip()]
        self.everyone = "*" in parts
        self.exact: frozenset[str] = frozenset()
        networks = []
        exact = set()
        for part in parts:
            if part == "*":
                continue
            if "/" in part:
                networks.append(ipaddress.ip_network(part, strict=False))
            else:
                exact.add(str(ipaddress.ip_address(part)))
        self.exact, self.networks = frozenset(exact), tuple(networks)
        self.anyone = self.everyone or bool(exact) or bool(networks)

    def believe(self, address: str) -> bool:
        if self.everyone or address in self.exact:
            return True
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


class ServerEnviron:
    """One server's constant part of the environ, and how a request's is made."""

    def __init__(self, server: Any, errors: Any, file_wrapper: Any, multithread: bool) -> None:
        config = server.prefork_config
        address = server.server_address
        if isinstance(address, tuple):
            name, port = str(address[0]), str(address[1])
        else:  # a Unix socket: its path, and no port
            name, port = str(address or "localhost"), ""
        self.root_path = (config.root_path or "").rstrip("/")
        self.base: dict[str, Any] = {
            "SERVER_NAME": name,
            "SERVER_PORT": port,
            "SCRIPT_NAME": self.root_path,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": errors,
            "wsgi.multithread": multithread,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": file_wrapper,
        }
        self.proxies = Proxies(config.forwarded_allow_ips)

    def make(self, request: Request, client_address: Any, body: Any) -> dict[str, Any]:
        environ = self.base.copy()
        target = request.target
        if target[:1] != b"/" and b"://" in target[:10]:  # absolute form: drop the authority
            target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
        path, _, query = target.partition(b"?")
        path = path.partition(b"#")[0]
        path_info = (
            unquote_to_bytes(path).decode("latin-1") if b"%" in path else path.decode("latin-1")
        )
        if self.root_path and (
            path_info == self.root_path or path_info.startswith(self.root_path + "/")
        ):
            path_info = path_info[len(self.root_path) :]
        environ["REQUEST_METHOD"] = request.method
        environ["PATH_INFO"] = path_info
        environ["QUERY_STRING"] = query.partition(b"#")[0].decode("latin-1")
        environ["RAW_URI"] = request.target.decode("latin-1")
        environ["SERVER_PROTOCOL"] = "HTTP/" + request.version
        environ["wsgi.input"] = body
        for name, value in request.headers:
            key = name.decode("latin-1").upper().replace("-", "_")
            text = value.decode("latin-1")
            if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
                environ[key] = text
                continue
            key = "HTTP_" + key
            environ[key] = f"{environ[key]},{text}" if key in environ else text
        if isinstance(client_address, tuple) and len(client_address) >= 2:
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = (
                str(client_address[0]),
                str(client_address[1]),
            )
        else:
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = "", ""
        if (
            self.proxies.anyone
            and ("HTTP_FORWARDED" in environ or "HTTP_X_FORWARDED_FOR" in environ
                 or "HTTP_X_FORWARDED_PROTO" in environ)
            and self.proxies.believe(environ["REMOTE_ADDR"])
        ):  # fmt: skip
            self._believe_proxy(environ)
        return environ

    def _believe_proxy(self, environ: dict[str, Any]) -> None:
        proto: str | None = None
        chain: list[str] = []
        forwarded = environ.get("HTTP_FORWARDED")
        if forwarded:
            proto, chain = _parse_forwarded(forwarded)
        else:
            proto = environ.get("HTTP_X_FORWARDED_PROTO", "").rpartition(",")[2].strip() or None
            chain = [p.strip() for p in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        if proto in ("http", "https"):
            environ["wsgi.url_scheme"] = proto
        for hop in reversed([h for h in chain if h]):
            environ["REMOTE_ADDR"] = hop
            if not self.proxies.believe(hop):
                break  # the nearest address that is not an allowed proxy


def _parse_forwarded(value: str) -> tuple[str | None, list[str]]:
    """RFC 7239: the ``for`` of each element, and the last element's ``proto``."""
    proto: str | None = None
    chain: list[str] = []
    for element in value.split(","):
        for pair in element.split(";"):
            key, _, item = pair.strip().partition("=")
            item = item.strip().strip('"')
            if key.lower() == "for":
                if item.startswith("["):  # "[2001:db8::1]:4711"
                    item = item[1:].partition("]")[0]
                elif item.count(":") == 1:
                    item = item.partition(":")[0]
                chain.append(item)
            elif key.lower() == "proto":
                proto = item.lower()
    return proto, chain


class ErrorStream:
    """wsgi.errors: what the app writes there reaches prefork's log, a line at a time."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._log.error("%s", line)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._partial:
            self._log.error("%s", self._partial)
            self._partial = ""
