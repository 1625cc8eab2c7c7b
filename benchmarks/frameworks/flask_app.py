"""The hello app in Flask, written as Flask's own quickstart would (see __init__.py)."""

from __future__ import annotations

from flask import Flask, Response, request

BODY = b"Hello, world!\n"  # as benchmarks/wsgi_app.py

app = Flask(__name__)


@app.get("/")
def hello() -> Response:
    # content_type, not mimetype: Flask would add "; charset=utf-8" to a text mimetype
    return Response(BODY, content_type="text/plain")


@app.post("/upload")
def upload() -> Response:
    body = request.get_data(cache=False)  # the whole body, read from wsgi.input
    return Response(f"{len(body)}\n", content_type="text/plain")
