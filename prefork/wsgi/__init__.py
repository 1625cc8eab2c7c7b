"""WSGI apps served over HTTP/1.1: ``prefork run project.wsgi:application``.

``parser.py`` reads requests (llhttp, through httptools, and our limits and checks),
``body.py`` is wsgi.input, ``environ.py`` the environ and the proxies believed,
``response.py`` start_response and the framing, ``handler.py`` the connection's loop:
a socketserver request handler, so every worker class serves it unchanged.
"""

from __future__ import annotations

from .handler import WSGIRequestHandler, handler_for, is_wsgi_app

__all__ = ["WSGIRequestHandler", "handler_for", "is_wsgi_app"]
