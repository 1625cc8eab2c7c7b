"""``python -m prefork`` and the ``prefork`` console script: the command of cli.py."""

from __future__ import annotations

import gc


def main() -> None:
    # Importing click and the whole server and building the command make thousands of
    # objects, none of them garbage: collections meanwhile are wasted time on the way to
    # the first answered request (10-15% of the imports). Only for these imports: the
    # app's code (the import check, --preload) runs with the collector on.
    gc.disable()
    try:
        from .cli import main as command
    finally:
        gc.enable()
    command()


if __name__ == "__main__":
    main()
