"""The same hello app in three WSGI frameworks, for gunicorn and prefork alike.

Each module here imports only its framework and exposes a module-level WSGI callable
``app``: ``GET /`` answers ``Hello, world!\\n`` (text/plain, with a Content-Length) as
benchmarks/wsgi_app.py does; ``POST /upload`` reads the whole request body and answers
its length in bytes as a line of text (``10240\\n``). This package imports nothing, so
a server loading one app loads no other framework.
"""

# Each NAME is both the package the app needs (checked before a scenario runs) and
# the module's stem: benchmarks.frameworks.NAME_app:app.
FRAMEWORKS = ("flask", "django", "bottle")
