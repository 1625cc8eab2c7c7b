"""Logging set-up for ``prefork run``: the ``prefork`` loggers to stderr.

The library itself never configures logging; it only logs to ``prefork.*`` loggers.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("prefork")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False  # the app's own root logger set-up stays the app's
