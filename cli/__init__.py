"""The lorascope command line (installed as ``lorascope.cli``)."""
