"""`python -m prefork` is the `prefork` command."""

from .cli import main

main()
