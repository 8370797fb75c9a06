"""The `ovseg` command line (a front end: it only turns arguments into calls of the layers below)."""

from .main import main

__all__ = ["main"]
