"""Flask, Bottle and Django apps, as their users write them, served by ``prefork run``."""

from __future__ import annotations

import http.client
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from load import Load

FLASK = """
from flask import Flask, request

app = Flask(__name__)


@app.route("/")
def hello():
    return "Hello from Flask\\n"


@app.route("/form", methods=["POST"])
def form():
    return "name=%s size=%d\\n" % (request.form["name"], len(request.files["file"].read()))
"""

BOTTLE = """
import bottle

app = bottle.Bottle()


@app.route("/")
def hello():
    return "Hello from Bottle\\n"


@app.post("/echo")
def echo():
    return bottle.request.body.read()
"""

DJANGO = """
from django.conf import settings

settings.configure(
    DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, SECRET_KEY="test only",
    MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"],
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates"}],
    INSTALLED_APPS=[],
)

from django.http import HttpResponse
from django.middleware.csrf import get_token
from django.urls import path
from django.core.wsgi import get_wsgi_application


def hello(request):
    return HttpResponse("Hello from Django\\n", content_type="text/plain")


def form(request):
    if request.method == "POST":
        return HttpResponse("posted %s\\n" % request.POST["name"], content_type="text/plain")
    return HttpResponse('<input name="csrfmiddlewaretoken" value="%s">' % get_token(request))


urlpatterns = [path("", hello), path("form", form)]
application = get_wsgi_application()
"""


def _serve(serve: Any, listener: socket.socket, app_dir: Path, name: str, text: str,
           target: str, *options: str) -> Any:  # fmt: skip
    pytest.importorskip(name.replace("app", "") if name != "djangoapp" else "django")
    (app_dir / f"{name}.py").write_text(text)
    server = serve(target, "-w", "2", *options, listen_on=listener)
    server.wait_ready(2)
    return server


def _get(conn: http.client.HTTPConnection, method: str, path: str, **kw: Any) -> Any:
    conn.request(method, path, **kw)
    response = conn.getresponse()
    return response, response.read()


def _connect(listener: socket.socket) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(*listener.getsockname(), timeout=10)


@pytest.mark.parametrize("worker", ["sync", "thread"])
def test_flask(serve, listener, app_dir: Path, worker: str) -> None:
    _serve(serve, listener, app_dir, "flaskapp", FLASK, "flaskapp:app", "-k", worker)
    conn = _connect(listener)
    try:
        response, body = _get(conn, "GET", "/")
        assert (response.status, body) == (200, b"Hello from Flask\n")
        boundary = "xYzZY"
        form = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nada\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n{'x' * 50000}\r\n--{boundary}--\r\n"
        ).encode()
        if worker == "sync":
            conn.close()
            conn = _connect(listener)
        response, body = _get(conn, "POST", "/form", body=form, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
        assert body == b"name=ada size=50000\n"
    finally:
        conn.close()


def test_bottle_keep_alive_and_upload(serve, listener, app_dir: Path) -> None:
    """(A chunked upload is not tried: Bottle decodes chunked bodies itself, from a
    Transfer-Encoding header, where prefork, as gunicorn, hands it the decoded body.)"""
    _serve(serve, listener, app_dir, "bottleapp", BOTTLE, "bottleapp:app", "-k", "thread")
    conn = _connect(listener)
    try:
        response, body = _get(conn, "GET", "/")
        sock = conn.sock
        assert body == b"Hello from Bottle\n"
        response, body = _get(conn, "POST", "/echo", body=b"abc" + b"def" * 1000)
        assert body == b"abc" + b"def" * 1000 and conn.sock is sock
    finally:
        conn.close()


def test_django_csrf_round_trip(serve, listener, app_dir: Path) -> None:
    _serve(serve, listener, app_dir, "djangoapp", DJANGO, "djangoapp:application", "-k", "thread")
    conn = _connect(listener)
    try:
        response, body = _get(conn, "GET", "/")
        assert body == b"Hello from Django\n"
        response, body = _get(conn, "GET", "/form")
        token = re.search(rb'value="([^"]+)"', body).group(1).decode()  # type: ignore[union-attr]
        cookie = response.getheader("Set-Cookie").split(";")[0]
        response, body = _get(conn, "POST", "/form", body=f"csrfmiddlewaretoken={token}&name=ada",
                              headers={"Cookie": cookie, "Content-Type":
                                       "application/x-www-form-urlencoded",
                                       "Referer": "http://127.0.0.1/"})  # fmt: skip
        assert (response.status, body) == (200, b"posted ada\n")
        response, body = _get(conn, "POST", "/form", body="name=mallory", headers={
            "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert response.status == 403  # no token: Django's CSRF check says no
    finally:
        conn.close()


def test_hup_under_load_serves_the_new_code_with_no_failure(serve, listener, app_dir: Path):
    server = _serve(serve, listener, app_dir, "flaskapp", FLASK, "flaskapp:app", "-k", "thread")
    with Load(listener.getsockname(), "http") as load:
        load.wait_for_requests(50)
        (app_dir / "flaskapp.py").write_text(FLASK.replace("Hello from Flask", "Hello again"))
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload complete: generation 2 serving" in server.log, timeout=20)
        load.wait_for_requests(50)
    assert load.report.failures == []
    assert set(load.report.answers) == {b"Hello from Flask", b"Hello again"}
    conn = _connect(listener)
    try:
        assert _get(conn, "GET", "/")[1] == b"Hello again\n"
    finally:
        conn.close()


DJANGO_ADMIN = """
import os
from django.conf import settings

HERE = os.path.dirname(os.path.abspath(__file__))
settings.configure(
    DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, SECRET_KEY="test only",
    INSTALLED_APPS=["django.contrib.admin", "django.contrib.auth",
                    "django.contrib.contenttypes", "django.contrib.sessions",
                    "django.contrib.messages"],
    MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware",
                "django.middleware.common.CommonMiddleware",
                "django.middleware.csrf.CsrfViewMiddleware",
                "django.contrib.auth.middleware.AuthenticationMiddleware",
                "django.contrib.messages.middleware.MessageMiddleware"],
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True, "OPTIONS": {"context_processors": [
                    "django.template.context_processors.request",
                    "django.contrib.auth.context_processors.auth",
                    "django.contrib.messages.context_processors.messages"]}}],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                           "NAME": os.path.join(HERE, "db.sqlite3")}},
    STATIC_URL="/static/", USE_TZ=True,
)

from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]


def prepare():
    from django.contrib.auth.models import User
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    User.objects.create_superuser("admin", "admin@example.com", "a long password")
"""


def test_django_admin_login_with_its_csrf_round_trip(serve, listener, app_dir: Path) -> None:
    pytest.importorskip("django")
    (app_dir / "djangoadmin.py").write_text(DJANGO_ADMIN)
    subprocess.run([sys.executable, "-c", "import djangoadmin; djangoadmin.prepare()"],
                   cwd=app_dir, check=True, timeout=120)  # fmt: skip
    server = serve("djangoadmin:application", "-w", "2", "-k", "thread", listen_on=listener)
    server.wait_ready(2)
    conn = _connect(listener)
    try:
        response, body = _get(conn, "GET", "/admin/login/")
        assert response.status == 200, body[:300]
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body).group(1)  # type: ignore[union-attr]
        cookie = response.getheader("Set-Cookie").split(";")[0]
        form = f"csrfmiddlewaretoken={token.decode()}&username=admin&password=a+long+password"
        response, body = _get(conn, "POST", "/admin/login/?next=/admin/", body=form, headers={
            "Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded",
            "Origin": f"http://127.0.0.1:{listener.getsockname()[1]}",
            "Host": f"127.0.0.1:{listener.getsockname()[1]}"})  # fmt: skip
        assert response.status == 302 and response.getheader("Location") == "/admin/", body[:500]
        session = [c.split(";")[0] for c in response.headers.get_all("Set-Cookie")
                   if c.startswith("sessionid=")][0]  # fmt: skip
        response, body = _get(conn, "GET", "/admin/", headers={"Cookie": f"{cookie}; {session}"})
        assert response.status == 200 and b"Site administration" in body
    finally:
        conn.close()
