"""The server class ``prefork run`` serves a bind with, composed from the app's own.

    [the app's server class] + PreForkMixIn + [ThreadingMixIn | ForkingMixIn] + the stdlib server

An app's server class (``--server-class``, or a ``MODULE:OBJECT`` that names one) comes
first, so that whatever it overrides wins over prefork's defaults: its ``handle_error``,
its ``verify_request``, its own ``on_starting`` hook. PreForkMixIn goes where the class's
own chain reaches the standard library's classes, so its defaults stand in for those only.
What prefork must do whatever the class's order (take its settings out of the arguments,
bind by its rules, tune the listener, remove its socket file) runs in front of the class,
in the composed class's own methods, each then calling the class's chain; the class's
chain meeting PreForkMixIn's again is harmless (each step happens once).

A class that already is a PreForkMixIn keeps the order its author gave it.
"""

from __future__ import annotations

import inspect
import socketserver
from typing import Any

from .errors import ConfigError
from .mixin import PreForkMixIn

_MIXINS = (socketserver.ThreadingMixIn, socketserver.ForkingMixIn)


def server_class(
    base: type[socketserver.BaseServer],
    mixin: type | None,
    app_class: Any = None,
    what: str = "",
    namespace: dict[str, Any] | None = None,
    own_handler: bool = False,
) -> type[PreForkMixIn]:
    """The class to serve a ``base`` bind (TCPServer, UDPServer, UnixStreamServer...)
        with, the worker class's ``mixin`` (None for sync), and the app's server class if
        it gave one (``what`` names it in refusals): a socketserver server class, or a mix-in
    of hooks and overrides. ``own_handler``: the app named the
        server class alone, whose constructor must then find its handler itself (a
        default, as SimpleXMLRPCServer's). ConfigError, one line, for what cannot compose."""
    namespace = dict(namespace or {})
    if app_class is None:
        bases: tuple[type, ...] = (PreForkMixIn, *([mixin] if mixin else []), base)
        return _built(type, f"PreFork{base.__name__}", bases, namespace, what)  # type: ignore[no-any-return]
    if not isinstance(app_class, type):
        raise ConfigError(f"{what} is not a class")
    # A class that is no server (a mix-in of hooks and overrides) composes the same way.
    if getattr(app_class, "socket_type", base.socket_type) != base.socket_type:  # type: ignore[attr-defined]
        kind = "datagram" if base.socket_type == socketserver.UDPServer.socket_type else "stream"  # type: ignore[attr-defined]
        raise ConfigError(f"{what} cannot serve a {kind} bind ({base.__name__})")
    own = [m for m in _MIXINS if issubclass(app_class, m)]
    if own:
        if mixin is not None and mixin not in own:
            raise ConfigError(
                f"{what} is a {own[0].__name__} server, which decides how it serves: "
                f"leave --worker-class out, or make it match"
            )
        mixin = None  # the class's own decides, as serve_forever would
    if own_handler:
        _refuse_if_it_needs_a_handler(app_class, what)
    rest, name = ([mixin] if mixin else []) + [base], app_class.__name__
    if issubclass(app_class, PreForkMixIn):
        return _built(type, name, (app_class, *rest), namespace, what)  # type: ignore[no-any-return]
    return _built(_in_front_of, name, (app_class, PreForkMixIn, *rest), namespace, what)  # type: ignore[no-any-return]


def _built(
    make: Any, name: str, bases: tuple[type, ...], namespace: dict[str, Any], what: str
) -> Any:
    try:
        return make(name, bases, namespace)
    except TypeError as exc:  # no consistent order of the classes
        raise ConfigError(f"{what} cannot be composed with {bases[-1].__name__}: {exc}") from None


def _in_front_of(name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> type:
    """A class whose own methods run prefork's part first, then the classes' chain
    (``super()`` here is the app's class: it runs first, with everything it overrides)."""

    class Composed(*bases):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._prefork_setup(kwargs)
            super().__init__(*args, **kwargs)
            self._prefork_adopt_if_unbound()

        def server_bind(self) -> None:
            self._prefork_front_bind(super().server_bind)

        def server_activate(self) -> None:
            super().server_activate()
            self._prefork_tune_listener(self._prefork_keep_binders_options)

        def server_close(self) -> None:
            super().server_close()
            self._prefork_forget_socket_file()

    for key, value in namespace.items():
        setattr(Composed, key, value)
    Composed.__name__ = Composed.__qualname__ = name
    Composed.__module__ = bases[0].__module__
    return Composed


def _refuse_if_it_needs_a_handler(app_class: type, what: str) -> None:
    """A server class named alone is constructed with its address only."""
    try:
        signature = inspect.signature(app_class)
    except (TypeError, ValueError):
        return  # not introspectable (a C extension's): constructing it will say
    try:
        signature.bind(("127.0.0.1", 0))
    except TypeError:
        raise ConfigError(
            f"{what} needs a request handler class, which it has no default for: name "
            f"one, as in `prefork run MODULE:Handler --server-class {what}`"
        ) from None
