"""The ``moelora-dist`` commands, one module per command (``main.py`` dispatches)."""
