"""The typed errors of prefork and the exit codes workers use to talk to the master.

The library raises these; only ``prefork.cli`` turns them into a message and an exit code.
Every message is one line that names the culprit.
"""

from __future__ import annotations

# A worker's exit status tells the master why it left. Statuses at or above
# EXIT_BOOT_ERROR mean "never got ready": the master must not respawn in a tight loop.
EXIT_OK = 0
EXIT_BOOT_ERROR = 3
EXIT_IMPORT_ERROR = 4


class PreforkError(Exception):
    """Base class of every error prefork raises on purpose."""


class ConfigError(PreforkError, ValueError):
    """A setting has an impossible value."""


class BindError(PreforkError, OSError):
    """An address could not be parsed, bound or listened on."""


class AppImportError(PreforkError, ImportError):
    """MODULE:OBJECT could not be imported, or is neither a handler class nor a server class."""


class BootError(PreforkError):
    """No worker ever became ready: the pool cannot start."""
