"""Text that came from a client or a worker, made safe for a log line or a terminal.

A client chooses its Unix socket path, its request bytes and, through them, parts of
exception messages; a compromised worker writes what it likes into its status page and
pipe. Any of that may hold terminal escape sequences or line breaks that forge log
lines. ``printable`` keeps printable text as it is and writes everything else as a
Python escape (``\\x1b``, ``\\n``, ``\\udcff``), so the result is one line of visible text.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped; unchanged when it has none."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def printable_lines(text: str) -> str:
    """As ``printable``, line by line: a traceback keeps its line breaks."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
