"""The lorascope command line, installed as ``lorascope.cli`` (``lorascope ...`` and
``python -m lorascope ...``)."""

from lorascope.cli.main import main

__all__ = ["main"]
