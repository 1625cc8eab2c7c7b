"""Text that came from a client or a worker, made safe for a log line or a terminal.

A client chooses its Unix socket path, its request bytes and, through them, parts of
exception messages; a compromised worker writes what it likes into its status page and
pipe. Any of that may hold terminal escape sequences or line breaks that forge log
lines. ``printable`` keeps printable text as it is and writes everything else as a
Python escape (``\\x1b``, ``\\n``, ``\\udcff``), so the result is one line of visible text.
"""

from __future__ import annotations

import traceback


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped; unchanged when it has none."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def printable_lines(text: str) -> str:
    """As ``printable``, line by line: a traceback keeps its line breaks."""
    return "\n".join(printable(line) for line in text.split("\n"))


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable_traceback(exc: BaseException) -> str:
    """A traceback as ``traceback.format_exception`` writes it, made printable: frames
    keep their line breaks, and each exception's "Type: message" is one line, whatever
    the message holds (it may quote what a client sent, line breaks and all, which
    would otherwise forge log lines)."""
    parts: list[str] = []
    _format_chain(exc, parts, set())
    return "".join(parts).rstrip("\n")


def _format_chain(exc: BaseException, parts: list[str], seen: set[int]) -> None:
    seen.add(id(exc))
    if exc.__cause__ is not None and id(exc.__cause__) not in seen:
        _format_chain(exc.__cause__, parts, seen)
        parts.append("\nThe above exception was the direct cause of the following exception:\n\n")
    elif (
        exc.__context__ is not None
        and not exc.__suppress_context__
        and id(exc.__context__) not in seen
    ):
        _format_chain(exc.__context__, parts, seen)
        parts.append("\nDuring handling of the above exception, another exception occurred:\n\n")
    if exc.__traceback__ is not None:
        parts.append("Traceback (most recent call last):\n")
        for frame in traceback.format_tb(exc.__traceback__):
            parts.append(printable_lines(frame.rstrip("\n")) + "\n")
    message = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
    parts.append(printable(message) + "\n")
