"""Runnable examples; each module's docstring has its ``prefork run`` line."""
