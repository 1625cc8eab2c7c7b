"""The hello app in Django: a one-module project, configured in code (see __init__.py).

No database, no installed apps, no middleware (a project's usual stack would add its
own cost to both servers alike; what is compared is the server under the framework).
DEBUG off, as deployed; any Host accepted, as the benchmark sends 127.0.0.1:PORT.
"""

from __future__ import annotations

from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.views.decorators.http import require_GET, require_POST

BODY = b"Hello, world!\n"  # as benchmarks/wsgi_app.py

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="benchmark only: nothing is signed",
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    DATABASES={},
)


@require_GET
def hello(request: HttpRequest) -> HttpResponse:
    response = HttpResponse(BODY, content_type="text/plain")
    response["Content-Length"] = str(len(BODY))  # Django adds none without middleware
    return response


@require_POST
def upload(request: HttpRequest) -> HttpResponse:
    answer = f"{len(request.body)}\n"  # request.body: CONTENT_LENGTH bytes of wsgi.input
    response = HttpResponse(answer, content_type="text/plain")
    response["Content-Length"] = str(len(answer))
    return response


urlpatterns = [path("", hello), path("upload", upload)]

app = get_wsgi_application()  # django.setup(): after configure, as manage.py would
