"""Checks of setting values, one line each: types, ranges and text.

Pure functions on values and type hints; ``Config`` runs them on every field at
construction, whatever the source (command line, environment, config file, library).
"""

from __future__ import annotations

import math
import typing
from typing import Any, Literal

from .errors import ConfigError


def check_range(name: str, value: Any, least: float | None, most: float | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if least is not None and value < least:
        raise ConfigError(f"{name} must be at least {number(least)}, got {value!r}")
    if most is not None and value > most:
        raise ConfigError(f"{name} must be at most {number(most)}, got {value!r}")


def check_least_if_on(name: str, value: float, least: float) -> None:
    """0 turns it off; anything else is at least ``least``."""
    if 0 < value < least:
        raise ConfigError(f"{name} must be 0 (off) or at least {number(least)}, got {value!r}")


def number(value: float) -> str:
    """1e9 -> '1,000,000,000': bounds read as the numbers they are."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,}"


def check_text(name: str, value: Any) -> None:
    """Text settings must be text: a byte that is not UTF-8 (Python hands it over as a
    lone surrogate) or a NUL would fail far from here, in a system call or a log line."""
    for text in value if isinstance(value, tuple) else (value,):
        if isinstance(text, str) and not is_clean_text(text):
            raise ConfigError(f"{name}: {ascii(text)} is not valid UTF-8 text")


def is_clean_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\0" not in text


def check_type(name: str, value: Any, hint: Any) -> None:
    """Reject a value of the wrong type with a message naming the setting."""
    if not is_instance(value, hint):
        raise ConfigError(f"{name} must be {describe_type(hint)}, got {value!r}")


def is_instance(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, tuple) and all(is_instance(v, args[0]) for v in value)
    if args:  # Optional[X] / X | None
        return any(is_instance(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if isinstance(value, bool) and hint is not bool:
        return False  # True is an int to Python, never a worker count to us
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def describe_type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a tuple of {describe_type(args[0])}"
    if args:
        return " or ".join(describe_type(a) for a in args)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, "None"
    )


def check_addresses(name: str, value: str) -> None:
    """A comma-separated list of IP addresses and networks (CIDR), or ``*``."""
    import ipaddress  # only where such a setting is checked

    for part in (p.strip() for p in value.split(",")):
        if not part or part == "*":
            continue
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not an IP address or network") from None
