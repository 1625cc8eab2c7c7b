"""``python -m prefork`` and the ``prefork`` console script: the command of cli.py."""

from __future__ import annotations

from . import collector


def main() -> None:
    # Click, the command and the settings' half of the server: paused and then frozen
    # (collector.py says why). The app's code (the import check, --preload) runs with
    # the collector on.
    with collector.paused(freeze=True):
        from .cli import main as command
    command()


if __name__ == "__main__":
    main()
