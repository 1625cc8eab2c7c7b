"""The hello app in Bottle, written as Bottle's own tutorial would (see __init__.py)."""

from __future__ import annotations

from bottle import Bottle, request, response

BODY = b"Hello, world!\n"  # as benchmarks/wsgi_app.py

app = Bottle()


@app.get("/")
def hello() -> bytes:
    response.content_type = "text/plain"  # Bottle's default is text/html; charset=UTF-8
    return BODY  # Bottle sets Content-Length for a bytes body


@app.post("/upload")
def upload() -> str:
    response.content_type = "text/plain"
    body = request.body.read()  # the whole body: Bottle reads CONTENT_LENGTH bytes of wsgi.input
    return f"{len(body)}\n"
