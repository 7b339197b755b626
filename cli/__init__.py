"""The ``oneencoder`` command line, installed as ``oneencoder.cli``: one file per command group."""
