"""The twelve ready-made server classes.

PreFork{,Threading,Forking}{TCP,UDP,UnixStream,UnixDatagram}Server: the mix-in in
front of the stdlib's own classes, in the order the stdlib composes its mix-ins.
"""

from __future__ import annotations

import socketserver

from .mixin import PreForkMixIn


class PreForkTCPServer(PreForkMixIn, socketserver.TCPServer):
    pass


class PreForkUDPServer(PreForkMixIn, socketserver.UDPServer):
    pass


class PreForkUnixStreamServer(PreForkMixIn, socketserver.UnixStreamServer):
    pass


class PreForkUnixDatagramServer(PreForkMixIn, socketserver.UnixDatagramServer):
    pass


class PreForkThreadingTCPServer(PreForkMixIn, socketserver.ThreadingMixIn, socketserver.TCPServer):
    pass


class PreForkThreadingUDPServer(PreForkMixIn, socketserver.ThreadingMixIn, socketserver.UDPServer):
    pass


class PreForkThreadingUnixStreamServer(
    PreForkMixIn, socketserver.ThreadingMixIn, socketserver.UnixStreamServer
):
    pass


class PreForkThreadingUnixDatagramServer(
    PreForkMixIn, socketserver.ThreadingMixIn, socketserver.UnixDatagramServer
):
    pass


class PreForkForkingTCPServer(PreForkMixIn, socketserver.ForkingMixIn, socketserver.TCPServer):
    pass


class PreForkForkingUDPServer(PreForkMixIn, socketserver.ForkingMixIn, socketserver.UDPServer):
    pass


class PreForkForkingUnixStreamServer(
    PreForkMixIn, socketserver.ForkingMixIn, socketserver.UnixStreamServer
):
    pass


class PreForkForkingUnixDatagramServer(
    PreForkMixIn, socketserver.ForkingMixIn, socketserver.UnixDatagramServer
):
    pass
